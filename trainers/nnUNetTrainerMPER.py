"""nnUNetTrainerMPER: nnU-Net's linear head plus a multi-prototype cosine classifier.

Phases (``phase_plan``, by epoch, so ``--c`` lands in the right one):
1. warm-up: only nnU-Net's loss on the linear path, long enough for the features to mean
   something (a fraction of the budget with a floor in steps, ``schedules.MPER_PHASES``);
2. at the start of the first prototype epoch, with the network in eval mode, a bounded per-class
   sample of embeddings of labelled training voxels from ``prototype_init_batches`` batches;
   MiniBatchKMeans per class on it initialises the prototypes before the first prototype step
   (a class absent from the sample is initialised from the first training batch that has it);
3. then every step: L = L_seg(linear) + lambda(t) [L_seg(prototype) + w_ppc PPC + w_ppd PPD
   + w_cons consistency], with lambda the plan's sigmoid ramp over the prototype phase,
   followed by a gradient-free EMA update of the prototypes.

``_fromVanilla`` variants skip the warm-up: they start from a finished nnU-Net model of the same
plans and fold (``training.initial_weights``), the official two-stage recipe.
Prediction uses the linear head (vanilla cost) unless a variant says otherwise.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from nnunetv2_proto.blockwise_losses import blockwise_dice_ce
from nnunetv2_proto.evaluation.prototype_slots import format_slot_line
from nnunetv2_proto.heads.multi_prototype import ClassEmbeddingSampler
from nnunetv2_proto.losses import FullResolutionTarget, MPERLossWeights, MPERObjective, VoxelTarget
from nnunetv2_proto.networks.mper import MPERConfig
from nnunetv2_proto.training.budgets import CpuBudgetLongMixin, CpuBudgetMixin, CpuBudgetXLMixin
from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
from nnunetv2_proto.training.schedules import (MPER_FROM_TRAINED_PHASES, MPER_OFFICIAL_PHASES, MPER_PHASES,
                                               PhasePlan)
from nnunetv2_proto.training.trainer_base import PhasedTrainerMixin, PrototypeTrainerBase


class nnUNetTrainerMPER(PhasedTrainerMixin, PrototypeTrainerBase):
    head_kind = "mper"
    mper_config = MPERConfig()
    phase_plan: PhasePlan = MPER_PHASES
    loss_weights = MPERLossWeights()
    consistency_kind = "mse"
    samples_per_class = 2048
    prototype_init_batches = 8  # eval-mode batches whose labelled voxels the k-means sample comes from

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
        return self.main_loss_weight()

    def mper_objective(self, segmentation_loss, prototype_loss) -> MPERObjective:
        """MPER's objective around this family's segmentation losses (linear outputs, prototype logits)."""
        return MPERObjective(segmentation_loss, prototype_loss, self.label_layout, self.loss_weights,
                             self.consistency_kind)

    def build_objective(self) -> MPERObjective:
        # the prototype logits' Dice + CE is nnU-Net's, without keeping K-channel tensors for backward
        return self.mper_objective(self.loss, FullResolutionTarget(blockwise_dice_ce(self.full_resolution_loss)))

    def forward_and_loss(self, data, target, voxels: VoxelTarget):
        """Also returns, for the EMA update, the features and the step's ``PrototypeScores`` (None before any
        class has prototypes)."""
        network = self.core_network
        output, aux = self.network(data, return_aux=True)
        if not self.in_prototype_phase or not bool(network.classifier.initialized.any()):
            loss, parts = self.objective(output, aux, target, voxels=voxels)
            return loss, parts, (aux.features, None)
        scores = network.classifier.scores(aux.features, voxels.labels, voxels.valid)
        loss, parts = self.objective(output, aux, target, scores, network.prototype_output_logits(scores.logits),
                                     self.prototype_loss_weight(), voxels=voxels)
        return loss, parts, (aux.features, scores)

    def after_optimizer_step(self, step_outputs, voxels: VoxelTarget) -> None:
        super().after_optimizer_step(step_outputs, voxels)
        if not self.in_prototype_phase:
            return
        classifier = self.core_network.classifier
        features, scores = step_outputs
        initialized_now = not bool(classifier.initialized.all()) and self._initialize_missing_classes(features, voxels)
        if scores is None or initialized_now:
            # the forward pass compared the voxels with the random pre-initialisation prototypes (or none)
            assigned, correct = classifier.assignments(features, voxels.labels, voxels.valid)
        else:
            assigned, correct = scores.assigned, scores.correct
        counts = classifier.ema_update(features, voxels.labels, voxels.valid, assigned, correct, voxels.update_mask,
                                       tally=voxels.from_unlabeled)
        counts = torch.stack(counts) if isinstance(counts, tuple) else counts.unsqueeze(0)
        # (1 or 2, K, M): all updating voxels, and of them the pseudo-labelled ones
        self._epoch_update_counts = counts if self._epoch_update_counts is None else self._epoch_update_counts + counts

    @torch.no_grad()
    def sample_embeddings_in_eval_mode(self) -> None:
        """Embeddings of labelled training voxels from the network in eval mode (as it predicts), into the sampler."""
        network = self.network
        network.eval()
        try:
            for _ in range(self.prototype_init_batches):
                data, target = self.to_device(self.labelled_batch(next(self.dataloader_train)))
                voxels = VoxelTarget.from_nnunet_target(self.label_layout, target)
                with self.autocast():
                    _, aux = network(data, return_aux=True)
                self.embedding_sampler.add(aux.features, voxels.labels, voxels.valid)
        finally:
            network.train()

    def _initialize_missing_classes(self, features: torch.Tensor, voxels: VoxelTarget) -> bool:
        """k-means for classes without prototypes from the sample plus this batch; True if any was initialised."""
        self.embedding_sampler.add(features, voxels.labels, voxels.valid)
        return self._initialize_from_sample()

    def _initialize_from_sample(self) -> bool:
        classifier = self.core_network.classifier
        new = classifier.initialize_classes(self.embedding_sampler.samples(), seed=12345)
        if new:
            self.print_to_log_file(f"prototypes initialised by k-means for classes {new} (epoch {self.current_epoch})")
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
        if self.in_prototype_phase and not bool(self.core_network.classifier.initialized.all()):
            self.sample_embeddings_in_eval_mode()
            self._initialize_from_sample()
        self._epoch_update_counts = None
        self._epoch_start_prototypes = self.core_network.classifier.prototypes.detach().clone()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self._epoch_update_counts is None:
            return
        classifier = self.core_network.classifier
        moved = 1 - (classifier.prototypes * self._epoch_start_prototypes).sum(-1)  # cosine distance, (K, M)
        counts = self._epoch_update_counts
        self.print_to_log_file(format_slot_line(counts[0].tolist(), moved.tolist(),
                                                counts[1].tolist() if len(counts) > 1 else None))

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


class nnUNetTrainerMPER_balancedSlots(nnUNetTrainerMPER):
    """Not in the paper: each class's voxels are assigned evenly over its prototypes (Sinkhorn-Knopp, as
    ProtoSeg does) instead of to the nearest one, so no prototype of a class falls idle."""
    mper_config = MPERConfig(slot_assignment="balanced")


class nnUNetTrainerMPER_noPPC(nnUNetTrainerMPER):
    loss_weights = MPERLossWeights(ppc=0.0)


class nnUNetTrainerMPER_noConsistency(nnUNetTrainerMPER):
    loss_weights = MPERLossWeights(consistency=0.0)


class nnUNetTrainerMPER_officialLoss(nnUNetTrainerMPER):
    """The official code's objective: no consistency and no PPD term, lambda ramped over 75% of the
    prototype phase."""
    loss_weights = MPERLossWeights(ppd=0.0, consistency=0.0)
    phase_plan: PhasePlan = MPER_OFFICIAL_PHASES


class nnUNetTrainerMPER_fromVanilla(StartFromTrainedModelMixin, nnUNetTrainerMPER):
    """MPER added to a finished vanilla nnU-Net model of the same plans and fold (``nnUNetTrainer``):
    prototypes from its features at once, then the prototype phase. Compare with a vanilla run of
    the two stages' total steps."""
    source_trainer = "nnUNetTrainer"
    phase_plan: PhasePlan = MPER_FROM_TRAINED_PHASES


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


class nnUNetTrainerMPER_officialLoss_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPER_officialLoss):
    pass


class nnUNetTrainerMPER_officialLoss_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerMPER_officialLoss):
    pass


class nnUNetTrainerMPER_M1_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerMPER_M1):
    pass


class nnUNetTrainerMPER_fromVanilla_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPER_fromVanilla):
    source_trainer = "nnUNetTrainer_cpuBudget"


class nnUNetTrainerMPER_fromVanilla_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerMPER_fromVanilla):
    source_trainer = "nnUNetTrainer_cpuBudgetLong"


class nnUNetTrainerMPER_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerMPER):
    pass


class nnUNetTrainerMPER_officialLoss_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerMPER_officialLoss):
    pass


class nnUNetTrainerMPER_M1_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerMPER_M1):
    pass


class nnUNetTrainerMPER_balancedSlots_cpuBudget(CpuBudgetMixin, nnUNetTrainerMPER_balancedSlots):
    pass


class nnUNetTrainerMPER_balancedSlots_cpuBudgetLong(CpuBudgetLongMixin, nnUNetTrainerMPER_balancedSlots):
    pass


class nnUNetTrainerMPER_balancedSlots_cpuBudgetXL(CpuBudgetXLMixin, nnUNetTrainerMPER_balancedSlots):
    pass
