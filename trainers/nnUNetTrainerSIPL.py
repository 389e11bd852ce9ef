"""nnUNetTrainerSIPL: the final 1x1 conv becomes SIPL's IPL head, guided by SMG pseudo masks.

Loss: nnU-Net's own (deep supervision unchanged) + alpha * sum over SMG layers of Dice+CE of
the pseudo masks. The SMG filter threshold tau follows ``tau_schedule`` (0.1 rising to 0.5 over
the first 5% of training, epoch 50 of nnU-Net's 1000, as in the paper) and is held in a network
buffer, so checkpoints and ``--c`` carry it.
"""

from __future__ import annotations

from dataclasses import replace

from nnunetv2_proto.losses import SIPLObjective
from nnunetv2_proto.networks.sipl import SIPLConfig
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin
from nnunetv2_proto.training.schedules import SIPL_TAU, TauSchedule
from nnunetv2_proto.training.trainer_base import PrototypeTrainerBase


class nnUNetTrainerSIPL(PrototypeTrainerBase):
    head_kind = "sipl"
    sipl_config = SIPLConfig()
    aux_loss_weight = 0.05
    tau_schedule: TauSchedule = SIPL_TAU

    def head_config(self) -> SIPLConfig:
        return self.sipl_config

    def current_tau(self) -> float:
        return self.tau_schedule.tau(self.current_epoch, self.num_epochs)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        generator = self.core_network.mask_generator
        if generator is not None:
            generator.set_tau(self.current_tau())
            self.print_to_log_file(f"SMG filter threshold tau: {float(generator.tau):.3f}")

    def build_objective(self) -> SIPLObjective:
        return SIPLObjective(self.loss, self.label_layout, self.aux_loss_weight)


class nnUNetTrainerSIPL_noSMG(nnUNetTrainerSIPL):
    """Ablation: no mask transformer; instance proposals from the head's own first-pass prediction."""
    sipl_config = SIPLConfig(use_smg=False)


class nnUNetTrainerSIPL_noIPL(nnUNetTrainerSIPL):
    """Ablation: common proposals only (fixed prototypes); SMG and its auxiliary loss stay."""
    sipl_config = SIPLConfig(use_instance_proposals=False)


class nnUNetTrainerSIPL_16q(nnUNetTrainerSIPL):
    sipl_config = SIPLConfig(num_queries=16)


class nnUNetTrainerSIPL_64q(nnUNetTrainerSIPL):
    sipl_config = SIPLConfig(num_queries=64)


class nnUNetTrainerSIPL_fixedTau(nnUNetTrainerSIPL):
    """Constant tau = 0.5 (the paper's best constant threshold) instead of the 0.1 -> 0.5 ramp."""
    tau_schedule = replace(SIPL_TAU, start=0.5)


class nnUNetTrainerSIPL_dynamicHead(nnUNetTrainerSIPL):
    """The official code's head: prototypes generate a per-sample 3-layer 1x1-conv head."""
    sipl_config = SIPLConfig(predictor="dynamic_conv")


class nnUNetTrainerSIPL_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL):
    pass


class nnUNetTrainerSIPL_noSMG_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_noSMG):
    pass


class nnUNetTrainerSIPL_noIPL_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_noIPL):
    pass


class nnUNetTrainerSIPL_dynamicHead_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_dynamicHead):
    pass


class nnUNetTrainerSIPL_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL):
    pass
