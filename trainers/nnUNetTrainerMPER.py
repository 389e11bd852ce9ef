"""nnUNetTrainerMPER: nnU-Net's linear head plus a multi-prototype cosine classifier.

Phases (``phase_plan``, by epoch, so ``--c`` lands in the right one):
1. warm-up: only nnU-Net's loss on the linear path; during its last epoch a bounded per-class
   sample of labelled embeddings is collected;
2. at the first step after warm-up, MiniBatchKMeans per class on that sample initialises
   the prototypes (classes not seen yet are initialised later, when they appear);
3. then every step: L = L_seg(linear) + lambda(t) [L_seg(prototype) + w_ppc PPC + w_ppd PPD
   + w_cons consistency], with lambda the plan's sigmoid ramp, followed by a gradient-free EMA
   update of the prototypes.

Prediction uses the linear head (vanilla cost) unless a variant says otherwise.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from nnunetv2_proto.heads.multi_prototype import ClassEmbeddingSampler
from nnunetv2_proto.losses import FullResolutionTarget, MPERLossWeights, MPERObjective, VoxelTarget
from nnunetv2_proto.networks.mper import MPERConfig
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin
from nnunetv2_proto.training.schedules import MPER_PHASES, PhasePlan
from nnunetv2_proto.training.trainer_base import PhasedTrainerMixin, PrototypeTrainerBase


class nnUNetTrainerMPER(PhasedTrainerMixin, PrototypeTrainerBase):
    head_kind = "mper"
    mper_config = MPERConfig()
    phase_plan: PhasePlan = MPER_PHASES
    loss_weights = MPERLossWeights()
    consistency_kind = "mse"
    samples_per_class = 2048

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.embedding_sampler = ClassEmbeddingSampler(self.label_layout.num_exclusive, self.samples_per_class,
                                                       seed=12345 + (fold if isinstance(fold, int) else 0))
        self._epoch_update_counts = None  # (K, M) voxels per prototype slot this epoch, for the log
        self._epoch_start_prototypes = None

    def head_config(self) -> MPERConfig:
        return self.mper_config

    @property
    def in_prototype_phase(self) -> bool:
        return self.in_main_phase

    def prototype_loss_weight(self) -> float:
        return self.phase_plan.main_loss_weight(self.current_epoch, self.num_epochs)

    def mper_objective(self, segmentation_loss, prototype_loss) -> MPERObjective:
        """MPER's objective around this family's segmentation losses (linear outputs, prototype logits)."""
        return MPERObjective(segmentation_loss, prototype_loss, self.label_layout, self.mper_config.temperature,
                             self.loss_weights, self.consistency_kind)

    def build_objective(self) -> MPERObjective:
        return self.mper_objective(self.loss, FullResolutionTarget(self.full_resolution_loss))

    def compute_loss(self, output, aux, target, voxels: VoxelTarget):
        network = self.core_network
        if not self.in_prototype_phase or not bool(network.classifier.initialized.any()):
            return self.objective(output, aux, target, voxels=voxels)
        return self.objective(output, aux, target, network.prototype_output_logits(aux.prototype_logits),
                              self.prototype_loss_weight(), voxels=voxels)

    def after_optimizer_step(self, aux, voxels: VoxelTarget) -> None:
        super().after_optimizer_step(aux, voxels)
        classifier = self.core_network.classifier
        if not self.in_prototype_phase:
            if self.phase_plan.is_last_warmup_epoch(self.current_epoch, self.num_epochs):
                self.embedding_sampler.add(aux.features, voxels.labels, voxels.valid)
            return
        similarities = aux.similarities
        if not bool(classifier.initialized.all()) and self._initialize_missing_classes(aux, voxels):
            # the forward pass compared the voxels with the random pre-initialisation prototypes
            similarities = classifier.similarities(aux.features)
        counts = classifier.ema_update(aux.features, voxels.labels, voxels.valid, similarities, voxels.update_mask)
        self._epoch_update_counts = counts if self._epoch_update_counts is None else self._epoch_update_counts + counts

    def _initialize_missing_classes(self, aux, voxels: VoxelTarget) -> bool:
        """k-means for classes without prototypes; True if any class was initialised now."""
        # the warm-up sample first; classes it lacks (or all, after a resume) come from this batch
        self.embedding_sampler.add(aux.features, voxels.labels, voxels.valid)
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
        return bool(new)

    # --- diagnostics: which prototypes move, and how far -----------------------------------
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_update_counts = None
        self._epoch_start_prototypes = self.core_network.classifier.prototypes.detach().clone()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self._epoch_update_counts is None:
            return
        classifier = self.core_network.classifier
        moved = 1 - (classifier.prototypes * self._epoch_start_prototypes).sum(-1)  # cosine distance, (K, M)
        counts = self._epoch_update_counts.long().tolist()
        stale = int((self._epoch_update_counts == 0).sum())
        self.print_to_log_file(
            f"MPER prototypes: voxels that moved each (class, prototype) slot {counts}; cosine distance moved "
            f"{[[round(float(d), 4) for d in row] for row in moved]}; {stale} slot(s) not updated this epoch")

    def enter_steady_state(self) -> None:
        super().enter_steady_state()
        classifier = self.core_network.classifier
        dim = classifier.prototypes.shape[-1]
        classifier.initialize_classes([torch.randn(64, dim) for _ in range(classifier.num_classes)])

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
    loss_weights = MPERLossWeights(ppc=0.0)


class nnUNetTrainerMPER_noConsistency(nnUNetTrainerMPER):
    loss_weights = MPERLossWeights(consistency=0.0)


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
