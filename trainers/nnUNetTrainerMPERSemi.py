"""nnUNetTrainerMPERSemi_<N>labeled: MPER inside BCP's semi-supervised pipeline (MPER's own setting).

Phases: copy-paste warm-up among labelled patches (linear path only) -> prototypes initialised by
k-means on eval-mode embeddings of labelled voxels, teacher initialised from the student ->
self-training with bidirectional copy-paste, MPER's ramped prototype losses on the
mixed batches, and prototype EMA updates from labelled voxels and from pseudo-labelled voxels
whose teacher confidence exceeds 0.9.
"""

from nnunetv2_proto.losses import MPERObjective, VoxelWeightedDiceCE
from nnunetv2_proto.semi.labeled_subset import LABELED_LIST_FILE
from nnunetv2_proto.trainers.nnUNetTrainerMPER import nnUNetTrainerMPER
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin, SemiSupervisedCpuBudgetMixin
from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
from nnunetv2_proto.training.schedules import (MPER_SEMI_SUPERVISED_FROM_TRAINED_PHASES, MPER_SEMI_SUPERVISED_PHASES,
                                               PhasePlan)
from nnunetv2_proto.training.semi_supervised import SemiSupervisedMixin


class nnUNetTrainerMPERSemi(SemiSupervisedMixin, nnUNetTrainerMPER):
    """Base of the semi-supervised MPER variants; pick one that says how many cases are labelled."""

    # one plan for both: prototypes are initialised and ramped in as self-training starts
    phase_plan: PhasePlan = MPER_SEMI_SUPERVISED_PHASES

    def build_objective(self) -> MPERObjective:
        return self.mper_objective(self.mixed_batch_loss(), VoxelWeightedDiceCE(self.full_resolution_loss))


class nnUNetTrainerMPERSemi_3labeled(nnUNetTrainerMPERSemi):
    num_labeled = 3


class nnUNetTrainerMPERSemi_4labeled(nnUNetTrainerMPERSemi):
    num_labeled = 4


class nnUNetTrainerMPERSemi_7labeled(nnUNetTrainerMPERSemi):
    num_labeled = 7


class nnUNetTrainerMPERSemi_8labeled(nnUNetTrainerMPERSemi):
    num_labeled = 8


class nnUNetTrainerMPERSemi_16labeled(nnUNetTrainerMPERSemi):
    num_labeled = 16


class nnUNetTrainerMPERSemi_labeledList(nnUNetTrainerMPERSemi):
    labeled_list_file = LABELED_LIST_FILE


class nnUNetTrainerMPERSemi_8labeled_cpuBudget(SemiSupervisedCpuBudgetMixin, nnUNetTrainerMPERSemi_8labeled):
    pass


class nnUNetTrainerMPERSemi_8labeled_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainerMPERSemi_8labeled):
    """Two-stage: student, teacher and prototypes start from the finished labelled-only run
    (``nnUNetTrainer_8labeled``, same labelled cases)."""
    source_trainer = "nnUNetTrainer_8labeled"
    phase_plan: PhasePlan = MPER_SEMI_SUPERVISED_FROM_TRAINED_PHASES


class nnUNetTrainerMPERSemi_8labeled_fromLabeled_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPERSemi_8labeled_fromLabeled):
    source_trainer = "nnUNetTrainer_8labeled_cpuBudget"


class nnUNetTrainerMPERSemi_8labeled_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin,
                                                                nnUNetTrainerMPERSemi_8labeled_fromLabeled):
    source_trainer = "nnUNetTrainer_8labeled_cpuBudgetLong"


class nnUNetTrainerMPERSemi_labeledList_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainerMPERSemi_labeledList):
    """The two-stage recipe for patient-counted protocols (ACDC): starts from ``nnUNetTrainer_labeledList``."""
    source_trainer = "nnUNetTrainer_labeledList"
    phase_plan: PhasePlan = MPER_SEMI_SUPERVISED_FROM_TRAINED_PHASES


class nnUNetTrainerMPERSemi_labeledList_fromLabeled_cpuBudget(CpuBudgetMixin,
                                                              nnUNetTrainerMPERSemi_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudget"


class nnUNetTrainerMPERSemi_labeledList_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin,
                                                                  nnUNetTrainerMPERSemi_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetLong"


class nnUNetTrainerMPERSemi_labeledList_fromLabeledXL_cpuBudgetLong(CpuBudgetLongMixin,
                                                                    nnUNetTrainerMPERSemi_labeledList_fromLabeled):
    """ACDC's two-stage run: 1000 steps of self-training from a 3000-step labelled-only source."""
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetXL"
