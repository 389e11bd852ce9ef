"""nnUNetTrainerMPERSemi_<N>labeled: MPER inside BCP's semi-supervised pipeline (MPER's own setting).

Phases: copy-paste warm-up among labelled patches (linear path only; its last epoch samples
labelled embeddings) -> prototypes initialised by k-means, teacher initialised from the
student -> self-training with bidirectional copy-paste, MPER's ramped prototype losses on the
mixed batches, and prototype EMA updates from labelled voxels and from pseudo-labelled voxels
whose teacher confidence exceeds 0.9.
"""

from nnunetv2_proto.losses import MPERObjective, WeightedDiceCE
from nnunetv2_proto.semi.labeled_subset import LABELED_LIST_FILE
from nnunetv2_proto.trainers.nnUNetTrainerMPER import nnUNetTrainerMPER
from nnunetv2_proto.trainers.proto_cpu_budget import CpuBudgetMixin
from nnunetv2_proto.trainers.proto_semi_supervised import SemiSupervisedMixin


class nnUNetTrainerMPERSemi(SemiSupervisedMixin, nnUNetTrainerMPER):
    """Base of the semi-supervised MPER variants; pick one that says how many cases are labelled."""

    def build_objective(self) -> MPERObjective:
        return MPERObjective(self.mixed_batch_loss(), WeightedDiceCE(), self.label_layout,
                             self.mper_config.temperature, self.weight_prototype_seg, self.weight_ppc,
                             self.weight_ppd, self.weight_consistency, self.consistency_kind,
                             voxel_targets=lambda target: (target.labels, target.weights))

    def voxel_targets(self, target):
        return target.labels, target.weights > 0, target.update_mask


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


class nnUNetTrainerMPERSemi_8labeled_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPERSemi_8labeled):
    # 10% of 200 iterations would hand self-training to a teacher trained for 20 steps
    warmup_fraction = 0.3
