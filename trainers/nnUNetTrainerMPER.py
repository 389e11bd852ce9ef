"""nnUNetTrainerMPER: nnU-Net's linear head plus a multi-prototype cosine classifier.

Phases (by epoch, so ``--c`` lands in the right one):
1. warm-up (first ``warmup_fraction`` of epochs): only nnU-Net's loss on the linear path;
   during its last epoch a bounded per-class sample of labelled embeddings is collected;
2. at the first step after warm-up, MiniBatchKMeans per class on that sample initialises
   the prototypes (classes not seen yet are initialised later, when they appear);
3. then every step: L = L_seg(linear) + lambda(t) [L_seg(prototype) + w_ppc PPC + w_ppd PPD
   + w_cons consistency], with lambda a sigmoid ramp over the first ``rampup_fraction`` of
   training, followed by a gradient-free EMA update of the prototypes.

Prediction uses the linear head (vanilla cost) unless a variant says otherwise.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from nnunetv2_proto.heads.multi_prototype import ClassEmbeddingSampler
from nnunetv2_proto.label_layout import full_resolution
from nnunetv2_proto.losses import FullResolutionTarget, MPERObjective, sigmoid_rampup
from nnunetv2_proto.networks.mper import MPERConfig
from nnunetv2_proto.trainers.proto_cpu_budget import CpuBudgetLongMixin, CpuBudgetMixin
from nnunetv2_proto.trainers.proto_trainer_base import PrototypeTrainerBase


class nnUNetTrainerMPER(PrototypeTrainerBase):
    head_kind = "mper"
    mper_config = MPERConfig()
    warmup_fraction = 0.05
    rampup_fraction = 0.4
    weight_prototype_seg = 1.0
    weight_ppc = 0.02
    weight_ppd = 0.02
    weight_consistency = 1.0
    consistency_kind = "mse"
    samples_per_class = 2048

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.embedding_sampler = ClassEmbeddingSampler(self.label_layout.num_exclusive, self.samples_per_class,
                                                       seed=12345 + (fold if isinstance(fold, int) else 0))

    def head_config(self) -> MPERConfig:
        return self.mper_config

    @property
    def warmup_epochs(self) -> int:
        return max(1, round(self.warmup_fraction * self.num_epochs))

    @property
    def in_prototype_phase(self) -> bool:
        return self.current_epoch >= self.warmup_epochs

    def prototype_loss_weight(self) -> float:
        return sigmoid_rampup(self.current_epoch / self.num_epochs, self.rampup_fraction)

    def build_objective(self) -> MPERObjective:
        return MPERObjective(self.loss, FullResolutionTarget(self.full_resolution_loss), self.label_layout,
                             self.mper_config.temperature,
                             self.weight_prototype_seg, self.weight_ppc, self.weight_ppd, self.weight_consistency,
                             self.consistency_kind)

    def compute_loss(self, output, aux, target):
        network = self.core_network
        if not self.in_prototype_phase or not bool(network.classifier.initialized.any()):
            return self.objective(output, aux, target)
        return self.objective(output, aux, target, network.prototype_output_logits(aux.prototype_logits),
                              self.prototype_loss_weight())

    def voxel_targets(self, target) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(exclusive class, valid mask, voxels allowed to move prototypes or None for all valid) per voxel."""
        labels, valid = self.label_layout.exclusive_target(full_resolution(target))
        return labels, valid, None

    def after_optimizer_step(self, aux, target) -> None:
        super().after_optimizer_step(aux, target)
        labels, valid, update_mask = self.voxel_targets(target)
        classifier = self.core_network.classifier
        if not self.in_prototype_phase:
            if self.current_epoch == self.warmup_epochs - 1:
                self.embedding_sampler.add(aux.features, labels, valid)
            return
        if not bool(classifier.initialized.all()):
            self._initialize_missing_classes(aux, labels, valid)
        classifier.ema_update(aux.features, labels, valid, aux.similarities, update_mask)

    def _initialize_missing_classes(self, aux, labels, valid) -> None:
        # the warm-up sample first; classes it lacks (or all, after a resume) come from this batch
        self.embedding_sampler.add(aux.features, labels, valid)
        classifier = self.core_network.classifier
        new = classifier.initialize_classes(self.embedding_sampler.samples(), seed=12345)
        if new:
            self.print_to_log_file(f"prototypes initialised by k-means for classes {new}")
        missing = (~classifier.initialized).nonzero().flatten().tolist()
        if missing and new:
            self.print_to_log_file(f"classes {missing} have no labelled voxels yet; their prototypes are "
                                   "initialised when they first appear")
        if bool(classifier.initialized.all()):
            self.embedding_sampler = ClassEmbeddingSampler(self.label_layout.num_exclusive, self.samples_per_class)

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        state = super().extra_checkpoint_state()
        if self.embedding_sampler.embeddings is not None:
            state["embedding_sampler"] = self.embedding_sampler.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if "embedding_sampler" in state:
            self.embedding_sampler.load_state_dict(state["embedding_sampler"])


class nnUNetTrainerMPER_M1(nnUNetTrainerMPER):
    """Ablation: one prototype per class (what the paper argues against)."""
    mper_config = MPERConfig(prototypes_per_class=1)


class nnUNetTrainerMPER_M5(nnUNetTrainerMPER):
    mper_config = MPERConfig(prototypes_per_class=5)


class nnUNetTrainerMPER_noPPC(nnUNetTrainerMPER):
    weight_ppc = 0.0


class nnUNetTrainerMPER_noConsistency(nnUNetTrainerMPER):
    weight_consistency = 0.0


class nnUNetTrainerMPER_protoInference(nnUNetTrainerMPER):
    """Predict with the prototype classifier instead of the linear head."""
    mper_config = MPERConfig(inference="prototype")


class nnUNetTrainerMPER_fusedInference(nnUNetTrainerMPER):
    """Predict with the mean of the linear and prototype classifiers' probabilities."""
    mper_config = MPERConfig(inference="fused")


class nnUNetTrainerMPER_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPER):
    pass


class nnUNetTrainerMPER_M1_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPER_M1):
    pass


class nnUNetTrainerMPER_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerMPER):
    pass
