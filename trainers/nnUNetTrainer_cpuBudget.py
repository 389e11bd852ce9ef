from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin, CpuBudgetXLMixin


class nnUNetTrainer_cpuBudget(CpuBudgetMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the shared CPU budget: the baseline of every CPU-scale comparison."""


class nnUNetTrainer_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the long CPU budget (five times the steps of ``_cpuBudget``)."""


class nnUNetTrainer_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainer):
    """Vanilla nnU-Net with the extra-long CPU budget (three times the steps of ``_cpuBudgetLong``)."""
