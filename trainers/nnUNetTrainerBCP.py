"""nnUNetTrainerBCP_<N>labeled: bidirectional copy-paste with a mean teacher, vanilla nnU-Net network.

The same semi-supervised pipeline as nnUNetTrainerMPERSemi without prototypes, so the gain
of each part can be measured. Loss: nnU-Net's own Dice + CE (as the plans build it) with voxel
weights (1 from labelled patches, 0.5 from pseudo-labelled ones) on every deep-supervision output.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_proto.semi.labeled_subset import LABELED_LIST_FILE
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin, SemiSupervisedCpuBudgetMixin
from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
from nnunetv2_proto.training.schedules import SEMI_SUPERVISED_FROM_TRAINED_PHASES, PhasePlan
from nnunetv2_proto.training.semi_supervised import SemiSupervisedMixin


class nnUNetTrainerBCP(SemiSupervisedMixin, nnUNetTrainer):
    """Base of the BCP variants; pick one that says how many cases are labelled."""

    def build_objective(self):
        return self.mixed_batch_loss()

    def forward_and_loss(self, data, target, voxels):
        loss = self.objective(self.network(data), voxels)
        return loss, {"seg": loss}, None


class nnUNetTrainerBCP_3labeled(nnUNetTrainerBCP):
    num_labeled = 3


class nnUNetTrainerBCP_4labeled(nnUNetTrainerBCP):
    num_labeled = 4


class nnUNetTrainerBCP_7labeled(nnUNetTrainerBCP):
    num_labeled = 7


class nnUNetTrainerBCP_8labeled(nnUNetTrainerBCP):
    num_labeled = 8


class nnUNetTrainerBCP_16labeled(nnUNetTrainerBCP):
    num_labeled = 16


class nnUNetTrainerBCP_labeledList(nnUNetTrainerBCP):
    labeled_list_file = LABELED_LIST_FILE


class nnUNetTrainerBCP_8labeled_cpuBudget(SemiSupervisedCpuBudgetMixin, nnUNetTrainerBCP_8labeled):
    pass


class nnUNetTrainerBCP_8labeled_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainerBCP_8labeled):
    """BCP's two-stage recipe: student and teacher start from the finished labelled-only run
    (``nnUNetTrainer_8labeled``, same labelled cases); self-training from the first step."""
    source_trainer = "nnUNetTrainer_8labeled"
    phase_plan: PhasePlan = SEMI_SUPERVISED_FROM_TRAINED_PHASES


class nnUNetTrainerBCP_8labeled_fromLabeled_cpuBudget(CpuBudgetMixin, nnUNetTrainerBCP_8labeled_fromLabeled):
    source_trainer = "nnUNetTrainer_8labeled_cpuBudget"


class nnUNetTrainerBCP_8labeled_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerBCP_8labeled_fromLabeled):
    """The two-stage run from a labelled-only source whose curve has levelled off (1000 + 1000 steps)."""
    source_trainer = "nnUNetTrainer_8labeled_cpuBudgetLong"


class nnUNetTrainerBCP_labeledList_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainerBCP_labeledList):
    """The two-stage recipe for patient-counted protocols (ACDC): starts from ``nnUNetTrainer_labeledList``."""
    source_trainer = "nnUNetTrainer_labeledList"
    phase_plan: PhasePlan = SEMI_SUPERVISED_FROM_TRAINED_PHASES


class nnUNetTrainerBCP_labeledList_fromLabeled_cpuBudget(CpuBudgetMixin, nnUNetTrainerBCP_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudget"


class nnUNetTrainerBCP_labeledList_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin,
                                                             nnUNetTrainerBCP_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetLong"


class nnUNetTrainerBCP_labeledList_fromLabeledXL_cpuBudgetLong(CpuBudgetLongMixin,
                                                               nnUNetTrainerBCP_labeledList_fromLabeled):
    """ACDC's two-stage run: 1000 steps of self-training from a 3000-step labelled-only source."""
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetXL"
