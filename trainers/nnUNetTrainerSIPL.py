"""nnUNetTrainerSIPL: the final 1x1 conv becomes SIPL's IPL head, guided by SMG pseudo masks.

Loss: nnU-Net's own (deep supervision unchanged) + alpha * sum over SMG layers of Dice+CE of
the pseudo masks. The SMG filter threshold tau follows ``tau_schedule`` (0.1 rising to 0.5 over
the first 5% of training, epoch 50 of nnU-Net's 1000, as in the paper) and is held in a network
buffer, so checkpoints and ``--c`` carry it.

Every epoch the training log shows, from nnU-Net's validation batches: the Dice of the last SMG
pseudo mask against the validation target, the share of clusters the filter keeps, and the
norms of the instance and common proposals (a small instance norm means the prototypes barely
adapt to the image).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

import numpy as np
import torch


from nnunetv2_proto.diagnostics import foreground_confusion, summarise_epoch
from nnunetv2_proto.losses import SIPLObjective
from nnunetv2_proto.networks.sipl import SIPLConfig
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin, CpuBudgetXLMixin
from nnunetv2_proto.training.schedules import SIPL_TAU, SIPL_TAU_OFFICIAL, SIPL_TAU_STEP_FLOOR, TauSchedule
from nnunetv2_proto.training.trainer_base import PrototypeTrainerBase

DIAGNOSTIC_PREFIX = "sipl_"


class nnUNetTrainerSIPL(PrototypeTrainerBase):
    head_kind = "sipl"
    sipl_config = SIPLConfig()
    aux_loss_weight = 0.05
    tau_schedule: TauSchedule = SIPL_TAU

    def head_config(self) -> SIPLConfig:
        return self.sipl_config

    def current_tau(self) -> float:
        return self.tau_schedule.tau(self.current_epoch, self.num_epochs, self.num_iterations_per_epoch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        generator = self.core_network.mask_generator
        if generator is not None:
            generator.set_tau(self.current_tau())
            self.print_to_log_file(f"SMG filter threshold tau: {float(generator.tau):.3f}")

    def build_objective(self) -> SIPLObjective:
        return SIPLObjective(self.loss, self.label_layout, self.aux_loss_weight)

    # --- diagnostics (validation batches only) ---------------------------------------------
    def validation_step(self, batch: dict) -> dict:
        result = super().validation_step(batch)
        data, target = self.training_inputs(batch)  # the same device transfer as a training step
        voxels = self.voxel_target(target)
        with torch.no_grad(), self.autocast():
            _, aux = self.core_network(data, return_aux=True)
        record: Dict[str, np.ndarray] = {f"{DIAGNOSTIC_PREFIX}{k}": v.float().cpu().numpy()
                                         for k, v in aux.diagnostics.items()}
        if aux.pseudo_mask_logits:
            record[f"{DIAGNOSTIC_PREFIX}pseudo_mask_confusion"] = foreground_confusion(
                aux.pseudo_mask_logits[-1], voxels.labels, voxels.valid)
        result.update(record)
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        records = [{k: o.pop(k) for k in list(o) if k.startswith(DIAGNOSTIC_PREFIX)} for o in val_outputs]
        super().on_validation_epoch_end(val_outputs)
        summary = summarise_epoch(records)
        if summary:
            parts = []
            if f"{DIAGNOSTIC_PREFIX}pseudo_mask_dice" in summary:
                dice = summary[f"{DIAGNOSTIC_PREFIX}pseudo_mask_dice"]
                parts.append("SMG pseudo-mask Dice (last layer, validation) [" +
                             ", ".join(f"{d:.3f}" for d in dice) + "]")
            if f"{DIAGNOSTIC_PREFIX}filter_kept_fraction" in summary:
                parts.append(f"filter keeps {100 * summary[f'{DIAGNOSTIC_PREFIX}filter_kept_fraction']:.0f}% "
                             "of clusters")
            norms = [f"{name} {summary[f'{DIAGNOSTIC_PREFIX}{name}_proposal_norm']:.3g}"
                     for name in ("instance", "common") if f"{DIAGNOSTIC_PREFIX}{name}_proposal_norm" in summary]
            parts.append("proposal norms: " + ", ".join(norms))
            if f"{DIAGNOSTIC_PREFIX}prototype_spread" in summary:
                parts.append("prototypes differ between samples by "
                             f"{100 * summary[f'{DIAGNOSTIC_PREFIX}prototype_spread']:.2g}% of their norm")
            self.print_to_log_file("SIPL diagnostics: " + "; ".join(parts))


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


class nnUNetTrainerSIPL_filterTrainOnly(nnUNetTrainerSIPL):
    """The SMG filter only while training (the behaviour before filter_at_inference; inference then
    sees other pseudo masks than training did)."""
    sipl_config = SIPLConfig(filter_at_inference=False)


class nnUNetTrainerSIPL_plainProposals(nnUNetTrainerSIPL):
    """The paper's instance proposals: the plain average of mask x features over the grid (the default
    until 2026-12-07; a small structure's proposal then shrinks with the share of the patch it fills)."""
    sipl_config = SIPLConfig(normalize_proposals_by_mass=False)


class nnUNetTrainerSIPL_massProposals(nnUNetTrainerSIPL):
    """Mass-normalised instance proposals, now the default: the name under which the runs that made it
    the default were trained, kept so they and their commands resolve."""
    sipl_config = SIPLConfig(normalize_proposals_by_mass=True)


class nnUNetTrainerSIPL_massProposals_noSMG(nnUNetTrainerSIPL_massProposals):
    """``_noSMG`` of the mass-normalised default, named apart from the ``_noSMG`` runs trained with the
    plain average before the switch so the two never share a results folder."""
    sipl_config = SIPLConfig(use_smg=False, normalize_proposals_by_mass=True)


class nnUNetTrainerSIPL_kmaxInit(nnUNetTrainerSIPL):
    """k-means layers start as the identity, clusters leaning towards background (official kMaX init)."""
    sipl_config = SIPLConfig(kmeans_identity_init=True)


class nnUNetTrainerSIPL_tauOfficial(nnUNetTrainerSIPL):
    """tau fixed at 0.1, what the official code runs in effect."""
    tau_schedule = SIPL_TAU_OFFICIAL


class nnUNetTrainerSIPL_tauStepFloor(nnUNetTrainerSIPL):
    """The paper's ramp, but over at least 1000 optimiser steps (short budgets filter gently)."""
    tau_schedule = SIPL_TAU_STEP_FLOOR


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


class nnUNetTrainerSIPL_noSMG_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_noSMG):
    pass


class nnUNetTrainerSIPL_noIPL_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_noIPL):
    pass


class nnUNetTrainerSIPL_filterTrainOnly_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_filterTrainOnly):
    pass


class nnUNetTrainerSIPL_massProposals_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_massProposals):
    pass


class nnUNetTrainerSIPL_massProposals_noSMG_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_massProposals_noSMG):
    pass


class nnUNetTrainerSIPL_plainProposals_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_plainProposals):
    pass


class nnUNetTrainerSIPL_kmaxInit_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_kmaxInit):
    pass


class nnUNetTrainerSIPL_tauOfficial_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_tauOfficial):
    pass


class nnUNetTrainerSIPL_tauStepFloor_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerSIPL_tauStepFloor):
    pass


class nnUNetTrainerSIPL_filterTrainOnly_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_filterTrainOnly):
    pass


class nnUNetTrainerSIPL_massProposals_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_massProposals):
    pass


class nnUNetTrainerSIPL_massProposals_noSMG_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_massProposals_noSMG):
    pass


class nnUNetTrainerSIPL_plainProposals_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_plainProposals):
    pass


class nnUNetTrainerSIPL_kmaxInit_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_kmaxInit):
    pass


class nnUNetTrainerSIPL_tauOfficial_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_tauOfficial):
    pass


class nnUNetTrainerSIPL_tauStepFloor_cpuBudget(CpuBudgetMixin, nnUNetTrainerSIPL_tauStepFloor):
    pass


class nnUNetTrainerSIPL_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL):
    pass


# ACDC's method budget for issue 13's ablations and the variants its diagnostics point at
class nnUNetTrainerSIPL_noSMG_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_noSMG):
    pass


class nnUNetTrainerSIPL_noIPL_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_noIPL):
    pass


class nnUNetTrainerSIPL_massProposals_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_massProposals):
    pass


class nnUNetTrainerSIPL_massProposals_noSMG_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_massProposals_noSMG):
    pass


class nnUNetTrainerSIPL_plainProposals_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_plainProposals):
    pass


class nnUNetTrainerSIPL_tauStepFloor_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerSIPL_tauStepFloor):
    pass
