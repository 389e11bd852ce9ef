from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_proto.training.budgets import (CpuBudgetDoubleMixin, CpuBudgetLongDoubleMixin, CpuBudgetLongMixin,
                                             CpuBudgetMixin, CpuBudgetXLMixin)


class nnUNetTrainer_cpuBudget(CpuBudgetMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the shared CPU budget: the baseline of every CPU-scale comparison."""


class nnUNetTrainer_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the long CPU budget (five times the steps of ``_cpuBudget``)."""


class nnUNetTrainer_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the extra-long CPU budget (three times the steps of ``_cpuBudgetLong``)."""


class nnUNetTrainer_cpuBudgetDouble(CpuBudgetDoubleMixin, nnUNetTrainer):
    """Vanilla nnU-Net for twice the ``_cpuBudget`` steps (source + own steps of a two-stage run): the baseline of
    ``nnUNetTrainerMPER_fromVanilla_cpuBudget`` and the fully labelled upper bound of the semi-supervised ones."""


class nnUNetTrainer_cpuBudgetLongDouble(CpuBudgetLongDoubleMixin, nnUNetTrainer):
    """Vanilla nnU-Net for twice the ``_cpuBudgetLong`` steps: the baseline of ``nnUNetTrainerMPER_fromVanilla_cpuBudgetLong``
    (its source run plus its own steps)."""
