"""Vanilla nnU-Net on the labelled subset only: the lower bound of every semi-supervised comparison.

``_<N>labeled`` takes N cases of the fold's training split by a seeded choice (recorded in
fold_X/labeled_split.json); ``_labeledList`` reads nnUNet_preprocessed/<dataset>/labeled_cases.json
(a list, or {"<fold>": [...]}) -- use it for protocols that count patients, like ACDC's.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_proto.semi.labeled_subset import LABELED_LIST_FILE
from nnunetv2_proto.training.budgets import (CpuBudgetDoubleMixin, CpuBudgetLongDoubleMixin, CpuBudgetLongMixin,
                                             CpuBudgetMixin, CpuBudgetXLMixin, CpuBudgetXLPlusLongMixin)
from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
from nnunetv2_proto.training.semi_supervised import LabeledSubsetMixin


class nnUNetTrainer_3labeled(LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 3


class nnUNetTrainer_4labeled(LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 4


class nnUNetTrainer_7labeled(LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 7


class nnUNetTrainer_8labeled(LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 8


class nnUNetTrainer_16labeled(LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 16


class nnUNetTrainer_labeledList(LabeledSubsetMixin, nnUNetTrainer):
    labeled_list_file = LABELED_LIST_FILE


class nnUNetTrainer_8labeled_cpuBudget(CpuBudgetMixin, nnUNetTrainer_8labeled):
    pass


class nnUNetTrainer_8labeled_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer_8labeled):
    """The LA labelled-only baseline (and two-stage source) at the long CPU budget, where 200 steps are
    far from the labelled-only plateau."""


class nnUNetTrainer_labeledList_cpuBudget(CpuBudgetMixin, nnUNetTrainer_labeledList):
    pass


class nnUNetTrainer_labeledList_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer_labeledList):
    """The ACDC labelled-patient baseline (and the two-stage source) at the long CPU budget."""


class nnUNetTrainer_labeledList_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainer_labeledList):
    """The ACDC labelled-patient baseline (and two-stage source) at 3000 steps: at 1000, 2D ACDC's right
    ventricle is still unlearnt in some seeds, so a source that short would leave the teacher a class short."""


class nnUNetTrainer_8labeled_cpuBudgetDouble(CpuBudgetDoubleMixin, nnUNetTrainer_8labeled):
    """The labelled-only baseline of the two-stage ``..._8labeled_fromLabeled_cpuBudget`` runs: their source
    (``nnUNetTrainer_8labeled_cpuBudget``) and their self-training together take these 400 steps."""


class nnUNetTrainer_8labeled_cpuBudgetLongDouble(CpuBudgetLongDoubleMixin, nnUNetTrainer_8labeled):
    """The same for ``..._8labeled_fromLabeled_cpuBudgetLong`` (2000 steps)."""


class nnUNetTrainer_labeledList_cpuBudgetDouble(CpuBudgetDoubleMixin, nnUNetTrainer_labeledList):
    """The same for ``..._labeledList_fromLabeled_cpuBudget``."""


class nnUNetTrainer_labeledList_cpuBudgetLongDouble(CpuBudgetLongDoubleMixin, nnUNetTrainer_labeledList):
    """The same for ``..._labeledList_fromLabeled_cpuBudgetLong`` (2000 steps)."""


class nnUNetTrainer_labeledList_cpuBudgetXLPlusLong(CpuBudgetXLPlusLongMixin, nnUNetTrainer_labeledList):
    """The same for ``..._labeledList_fromLabeledXL_cpuBudgetLong`` (3000 + 1000 steps)."""


# The restart control of the two-stage protocol: the second stage of a ``..._fromLabeled`` run without the
# unlabelled cases (same source, fresh optimiser and learning-rate schedule, same steps). The difference
# between a semi-supervised two-stage run and this one is what the unlabelled data did; the difference
# between this one and ``<Source>Double`` is what restarting the schedule did.
class nnUNetTrainer_8labeled_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainer_8labeled):
    source_trainer = "nnUNetTrainer_8labeled"


class nnUNetTrainer_8labeled_fromLabeled_cpuBudget(CpuBudgetMixin, nnUNetTrainer_8labeled_fromLabeled):
    source_trainer = "nnUNetTrainer_8labeled_cpuBudget"


class nnUNetTrainer_8labeled_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer_8labeled_fromLabeled):
    source_trainer = "nnUNetTrainer_8labeled_cpuBudgetLong"


class nnUNetTrainer_labeledList_fromLabeled(StartFromTrainedModelMixin, nnUNetTrainer_labeledList):
    source_trainer = "nnUNetTrainer_labeledList"


class nnUNetTrainer_labeledList_fromLabeled_cpuBudget(CpuBudgetMixin, nnUNetTrainer_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudget"


class nnUNetTrainer_labeledList_fromLabeled_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetLong"


class nnUNetTrainer_labeledList_fromLabeledXL_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer_labeledList_fromLabeled):
    source_trainer = "nnUNetTrainer_labeledList_cpuBudgetXL"
