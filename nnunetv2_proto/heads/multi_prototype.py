"""MPER's multi-prototype cosine classifier and the machinery that keeps its prototypes.

The prototypes are a buffer ``(K, M, C)`` of unit vectors, not parameters: they move by
EMA, never by gradient, so DDP neither syncs gradients for them nor complains that they
have none, and the state dict (checkpoints, ``nnUNetv2_predict``) carries them.

- similarity s_{k,m}(x) = cos(e(x), p_{k,m}); class logit = max_m s_{k,m}(x) / T.
- ``scores``: in one autograd function, the class logits and, against the true labels, the
  per-voxel contrast (PPC) and distance (PPD) terms and the own-class prototype each voxel is
  assigned to: its nearest (the paper and the official code), or with ``SlotBalance`` a
  balanced assignment (``balanced_slot_offsets``). It keeps no (B, K, M, *s) tensor for
  backward: backward recomputes the K*M similarities from the normalised C-channel embedding,
  so at many classes (K*M > C) memory grows with K, not K*M, and no elementwise pass runs
  twice (``benchmark-heads --num-classes 14``).
- ``ema_update``: for every (k, m), the mean embedding of voxels of true class k assigned to
  prototype m and that the prototype classifier gets right; one scatter-add over (class,
  prototype) slots, all-reduced under torch.distributed so every
  rank holds identical prototypes. Slots without voxels (e.g. an absent class) keep their
  value.
- ``initialize_classes``: MiniBatchKMeans per class on sampled embeddings, gathered from all
  ranks, computed on rank 0 and broadcast. Classes with fewer samples than M get jittered
  copies; classes without samples stay uninitialised until they are seen.
- ``ClassEmbeddingSampler``: a bounded, uniform per-class sample of embeddings across many
  batches (bottom-k of random keys), vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nnunetv2_proto.voxel_blocks import at_least_fp32, voxel_blocks


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def channels_last_flat(tensor: torch.Tensor, leading: int = 1) -> torch.Tensor:
    """(B, *lead, *spatial) -> (B * prod(spatial), *lead): voxels as rows."""
    moved = tensor.movedim(tuple(range(1, 1 + leading)), tuple(range(-leading, 0)))
    return moved.reshape(-1, *tensor.shape[1:1 + leading])


def kmeans_centres(samples: np.ndarray, num_centres: int, seed: int) -> np.ndarray:
    """``num_centres`` unit-norm centres of unit-norm ``samples`` (n, C); works for any n >= 1."""
    rng = np.random.default_rng(seed)
    if len(samples) < num_centres:
        centres = samples[np.arange(num_centres) % len(samples)]
    else:
        from sklearn.cluster import MiniBatchKMeans
        kmeans = MiniBatchKMeans(n_clusters=num_centres, random_state=seed, n_init=3,
                                 batch_size=min(1024, len(samples)))
        centres = kmeans.fit(samples).cluster_centers_
    # jitter separates duplicates (few samples, or fewer distinct points than centres)
    centres = centres + 1e-3 * rng.standard_normal(centres.shape)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-8)


class PrototypeScores(NamedTuple):
    """What one training step needs from the prototype classifier, for a batch with labels."""
    logits: torch.Tensor    # (B, K, *s) fp32 class logits, max_m cos / T; unseen classes at -1/T
    contrast: torch.Tensor  # (B, *s) PPC: cross-entropy over all K*M similarities / T, target (label, assigned)
    distance: torch.Tensor  # (B, *s) PPD: (1 - cos to the assigned own-class prototype)^2
    assigned: torch.Tensor  # (B, *s) int64, index m of the own-class prototype the voxel is assigned to (no gradient)
    correct: torch.Tensor   # (B, *s) bool, the prototype classifier predicts the true class (no gradient)


@dataclass(frozen=True)
class SlotBalance:
    """Balanced voxel-to-prototype assignment (Sinkhorn-Knopp, as ProtoSeg assigns pixels to sub-class
    prototypes): ``epsilon`` is the entropic temperature on the cosine similarities, ``iterations`` the
    number of row/column normalisations, ``sample_voxels`` how many voxels of the batch (a regular
    subsample) estimate the balance."""
    epsilon: float = 0.05
    iterations: int = 3
    sample_voxels: int = 32768


def balanced_slot_offsets(cosine: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor],
                          num_classes: int, balance: SlotBalance) -> torch.Tensor:
    """Own-class cosine similarities (n, M) of sampled voxels, their labels (n,) and optional weights (n,) ->
    offsets (K, M) in cosine units such that assigning each voxel to argmax_m (cosine + offsets[label]) gives
    every prototype of a class about the same number of the class's voxels, each voxel as close to its
    prototype as that allows.

    The nearest-prototype rule is winner-take-all: a prototype that loses its voxels never gets them back, and
    a class ends up on one prototype (docs/benchmarks.md, MPER slot diagnostics). Sinkhorn-Knopp's plan is
    exp(cosine / epsilon) scaled per voxel (rows) and per (class, prototype) slot (columns); its argmax over a
    voxel's prototypes ignores the row scale, so the assignment is the nearest prototype after adding
    epsilon log(column scale): the offsets, estimated here on a sample and applied to every voxel. Voxels of
    weight 0 carry no mass; a class without sampled voxels gets zero offsets (its nearest prototype).
    """
    m = cosine.shape[1]
    # a per-voxel shift changes nothing after the row normalisation and keeps exp finite
    plan = ((cosine - cosine.amax(1, keepdim=True)) / balance.epsilon).exp_()
    if weights is not None:
        plan.mul_(weights.unsqueeze(1).to(plan.dtype))
    tiny = torch.finfo(plan.dtype).tiny
    log_column_scale = plan.new_zeros(num_classes, m)
    for _ in range(balance.iterations):
        column_mass = plan.new_zeros(num_classes, m).index_add_(0, labels, plan).clamp_min_(tiny)
        log_column_scale -= column_mass.log()
        plan.div_(column_mass.index_select(0, labels))
        plan.div_(plan.sum(1, keepdim=True).clamp_min(tiny))
    offsets = balance.epsilon * log_column_scale
    return offsets - offsets.amax(1, keepdim=True)


def _voxel_sample(num_voxels: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices of a regular subsample of at most ``size`` of ``num_voxels`` flattened voxels."""
    return torch.arange(0, num_voxels, max(1, -(-num_voxels // size)), device=device)


def _unit_embedding(features: torch.Tensor, inverse_norm: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, C, *s) -> unit-norm embedding (B, C, N) and inverse norms (B, 1, N), at least in fp32; given the
    inverse norms (backward recomputing the forward's embedding), they are reused, not recomputed."""
    features = at_least_fp32(features).flatten(2)
    if inverse_norm is None:
        inverse_norm = (features * features).sum(1, keepdim=True).sqrt_().clamp_min_(1e-12).reciprocal_()
    return features * inverse_norm, inverse_norm


# exp(cos / T) of every slot and their sum stay finite in fp32 without a per-voxel shift while
# 1 / T <= 40 (e^40 ~ 2e17): T = 0.1, MPER's default, then saves a pass over the K*M similarities
_SHIFT_FREE_MAX_INVERSE_TEMPERATURE = 40.0


def _scaled_slot_prototypes(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """(K, M, C) -> (M*K, C) prototypes / T, at least in fp32, prototype-major: the slot order of
    ``_blocks_of_scaled_similarities``. Dividing the M*K x C matrix instead of the similarities saves a pass
    over (B, M*K, N)."""
    k, m, c = prototypes.shape
    return (at_least_fp32(prototypes) / temperature).transpose(0, 1).reshape(m * k, c)


def _winner_dtype(prototypes_per_class: int) -> torch.dtype:
    return torch.uint8 if prototypes_per_class <= 256 else torch.int64


def _winning_prototype(z: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Index over dim 1 of ``z`` (B, M, K, N) where it reaches ``best`` = its max over dim 1 (the last one on
    ties), as (B, K, N) uint8 (int64 beyond 256 prototypes). ``max(1)``/``argmax(1)`` with indices are 5-30x
    slower over a non-innermost dimension on a CPU than this comparison and a byte-sized ``amax``."""
    m = z.shape[1]
    dtype = _winner_dtype(m)
    reached = (z == best.unsqueeze(1)).to(dtype)
    return (reached * torch.arange(m, dtype=dtype, device=z.device).view(1, m, 1, 1)).amax(1)


def _blocks_of_scaled_similarities(unit: torch.Tensor, slot_prototypes: torch.Tensor, prototypes_per_class: int
                                   ) -> Iterator[Tuple[slice, torch.Tensor]]:
    """(B, C, N) unit embedding, (M*K, C) ``_scaled_slot_prototypes`` -> (voxel block, cos / T of the block as
    (B, M, K, n)).

    Prototype-major slot order, so that max over a class's prototypes and the sums over all slots
    reduce over outer dimensions (contiguous, vectorised) in nnU-Net's channel-first layout. Every
    caller goes through the same blocks, so training and inference compute bit-identical scores.
    """
    batch, slots = unit.shape[0], slot_prototypes.shape[0]
    for block in voxel_blocks(unit.shape[-1], 4 * batch * slots, unit.device):
        yield block, torch.matmul(slot_prototypes, unit[..., block]).view(
            batch, prototypes_per_class, slots // prototypes_per_class, -1)


def _balanced_z_offsets(unit: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor,
                        weights: Optional[torch.Tensor], temperature: float, balance: SlotBalance) -> torch.Tensor:
    """``balanced_slot_offsets`` from a regular sample of the batch's voxels (unit embedding (B, C, N), prototypes
    (K, M, C), labels (B * N,)), in z = cos / T units and shaped (1, M, K, 1) like a block of
    ``_blocks_of_scaled_similarities``."""
    batch, _, num_voxels = unit.shape
    k, m, _ = prototypes.shape
    sample = _voxel_sample(batch * num_voxels, balance.sample_voxels, unit.device)
    sample_labels = labels[sample]
    embedding = unit[sample // num_voxels, :, sample % num_voxels]                             # (n, C)
    own_prototypes = at_least_fp32(prototypes)[sample_labels]                                  # (n, M, C)
    cosine = torch.bmm(own_prototypes, embedding.unsqueeze(2)).squeeze(2)                      # (n, M)
    sample_weights = None if weights is None else weights.reshape(-1)[sample]
    offsets = balanced_slot_offsets(cosine, sample_labels, sample_weights, k, balance)         # (K, M)
    return (offsets / temperature).t().reshape(1, m, k, 1)


class _FusedPrototypeScores(torch.autograd.Function):
    """``PrototypeScores`` with a hand-written backward that recomputes the K*M similarities.

    With z = cos / T (B, M, K, N), the gradient w.r.t. z is
      logits = max_m z:              dL/dlogit_k at each seen class's winning prototype,
      PPC = logsumexp(z) - z_target: dL/dPPC (softmax(z) - onehot(target)),
      PPD = (1 - T z_target)^2:      -2 T dL/dPPD (1 - s_target) at the target,
    and it reaches the features through cos = <f, p> / |f|. Saved for backward: the features (the
    1x1 conv that reads them keeps them anyway), the inverse norms, the outputs, per voxel the
    target's z and the log-sum-exp, and per voxel and class the index of the winning prototype (one
    byte): nothing of size K*M per voxel. Every output is per voxel, so forward and backward run
    block by block over the voxels (``voxel_blocks``): on a CPU a block's similarities stay in
    cache for their five passes (matmul, max, winner, exp, sum) and backward's four (matmul, exp,
    scatter, matmul). The winners' and targets' gradients are scattered, not masked.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, unseen: torch.Tensor,
                temperature: float, balance: Optional[SlotBalance], weights: Optional[torch.Tensor]):
        batch, spatial = features.shape[0], features.shape[2:]
        k, m, _ = prototypes.shape
        flat_labels = labels.reshape(batch, 1, 1, -1)
        num_voxels = flat_labels.shape[-1]
        shift_free = 1.0 / temperature <= _SHIFT_FREE_MAX_INVERSE_TEMPERATURE
        with torch.autocast(features.device.type, enabled=False):
            unit, inverse_norm = _unit_embedding(features)
            best = unit.new_empty(batch, k, num_voxels)
            winner = torch.empty(batch, k, num_voxels, dtype=_winner_dtype(m), device=unit.device)
            own_best, log_sum_exp = unit.new_empty(batch, num_voxels), unit.new_empty(batch, num_voxels)
            # nearest rule: the target is the own class's best prototype
            target_z = own_best if balance is None else unit.new_empty(batch, num_voxels)
            assigned = torch.empty(batch, num_voxels, dtype=torch.int64, device=unit.device)
            slot_prototypes = _scaled_slot_prototypes(prototypes, temperature)
            # per (class, prototype) additive offsets to z that turn the nearest rule into the balanced one
            offsets = None if balance is None else _balanced_z_offsets(
                unit, prototypes, flat_labels.view(-1), weights, temperature, balance)
            for block, z in _blocks_of_scaled_similarities(unit, slot_prototypes, m):
                block_best = z.amax(1)
                best[..., block] = block_best
                winner[..., block] = _winning_prototype(z, block_best)
                block_target = flat_labels[..., block].expand(-1, m, 1, -1)
                block_own = z.gather(2, block_target).squeeze(2)
                if offsets is None:
                    own_best[:, block], assigned[:, block] = block_own.max(1)
                else:
                    own_best[:, block] = block_own.amax(1)
                    block_offsets = offsets.expand(batch, -1, -1, block_target.shape[-1]).gather(2, block_target)
                    block_assigned = (block_own + block_offsets.squeeze(2)).max(1, keepdim=True).indices
                    assigned[:, block] = block_assigned.squeeze(1)
                    target_z[:, block] = block_own.gather(1, block_assigned).squeeze(1)
                if shift_free:
                    log_sum_exp[:, block] = z.exp_().sum((1, 2)).log_()
                else:  # shift by each voxel's largest z so that exp cannot overflow
                    shift = block_best.amax(1, keepdim=True)
                    log_sum_exp[:, block] = z.sub_(shift.unsqueeze(1)).exp_().sum((1, 2)).log_().add_(shift.squeeze(1))
            del unit
        logits = best.masked_fill_(unseen.view(1, k, 1), -1.0 / temperature)
        # the own class's logit is own_best: right where it is the largest (argmax without the index search)
        correct = (own_best >= logits.amax(1)) & ~unseen[labels.reshape(batch, -1)]
        contrast = log_sum_exp - target_z
        distance = (1 - temperature * target_z) ** 2
        ctx.temperature = temperature
        ctx.shift_free = shift_free
        ctx.save_for_backward(features, prototypes, flat_labels, unseen, inverse_norm, winner,
                              assigned, target_z, log_sum_exp)
        ctx.mark_non_differentiable(assigned, correct)
        return (logits.view(batch, k, *spatial), contrast.view(batch, *spatial), distance.view(batch, *spatial),
                assigned.view(batch, *spatial), correct.view(batch, *spatial))

    @staticmethod
    def backward(ctx, grad_logits, grad_contrast, grad_distance, _grad_assigned, _grad_correct):
        features, prototypes, flat_labels, unseen, inverse_norm, winner, assigned, target_z, log_sum_exp = \
            ctx.saved_tensors
        t = ctx.temperature
        batch, (k, m, _) = features.shape[0], prototypes.shape
        grad_logits = grad_logits.reshape(batch, 1, k, -1).masked_fill(unseen.view(1, 1, k, 1), 0.0)
        grad_contrast = grad_contrast.reshape(batch, 1, 1, -1)
        with torch.autocast(features.device.type, enabled=False):
            unit, _ = _unit_embedding(features, inverse_norm)
            slot_prototypes = _scaled_slot_prototypes(prototypes, t)
            # softmax(z) dL/dPPC = exp(z - lse) dL/dPPC; unshifted: exp(z) (exp(-lse) dL/dPPC)
            softmax_scale = grad_contrast * (-log_sum_exp.view(batch, 1, 1, -1)).exp() if ctx.shift_free \
                else grad_contrast
            at_target = (-grad_contrast - 2 * t * grad_distance.reshape(batch, 1, 1, -1)
                         * (1 - t * target_z.view(batch, 1, 1, -1))).view(batch, 1, -1)
            target_slot = assigned.unsqueeze(1) * k + flat_labels.view(batch, 1, -1)
            grad_unit = torch.empty_like(unit)
            for block, z in _blocks_of_scaled_similarities(unit, slot_prototypes, m):
                if not ctx.shift_free:
                    z.sub_(log_sum_exp[:, block].view(batch, 1, 1, -1))
                grad_z = z.exp_().mul_(softmax_scale[..., block])
                grad_z.scatter_add_(1, winner[..., block].unsqueeze(1).long(), grad_logits[..., block])
                grad_z.view(batch, k * m, -1).scatter_add_(1, target_slot[..., block], at_target[..., block])
                grad_unit[..., block] = torch.matmul(slot_prototypes.T, grad_z.view(batch, k * m, -1))
            # through the normalisation: (g - u <u, g>) / |f|
            grad_features = grad_unit.addcmul_(unit, (unit * grad_unit).sum(1, keepdim=True), value=-1)
            grad_features.mul_(inverse_norm)
        return grad_features.view(features.shape).to(features.dtype), None, None, None, None, None, None


class MultiPrototypeClassifier(nn.Module):
    """``balance``: None assigns each voxel to its nearest own-class prototype (the paper); a ``SlotBalance``
    assigns the voxels of each class evenly over its prototypes (``balanced_slot_offsets``)."""

    def __init__(self, num_classes: int, prototypes_per_class: int, embedding_dim: int,
                 temperature: float = 0.1, momentum: float = 0.99, balance: Optional[SlotBalance] = None):
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        self.balance = balance
        self.register_buffer("prototypes", F.normalize(torch.randn(num_classes, prototypes_per_class, embedding_dim), dim=-1))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def prototypes_per_class(self) -> int:
        return self.prototypes.shape[1]

    @torch.no_grad()
    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, *s), any norm -> class logits (B, K, *s) = max over prototypes of cos / T, fp32
        (inference: no labels, no gradient).

        Classes whose prototypes were never initialised (not seen yet) get the lowest possible
        logit, so random initial prototypes cannot win by chance.
        """
        with torch.autocast(features.device.type, enabled=False):
            unit, _ = _unit_embedding(features)
            logits = unit.new_empty(unit.shape[0], self.num_classes, unit.shape[-1])
            slot_prototypes = _scaled_slot_prototypes(self.prototypes, self.temperature)
            for block, z in _blocks_of_scaled_similarities(unit, slot_prototypes, self.prototypes_per_class):
                logits[..., block] = z.amax(1)
        logits = logits.masked_fill_(~self.initialized.view(1, -1, 1), -1.0 / self.temperature)
        return logits.view(features.shape[0], self.num_classes, *features.shape[2:])

    def scores(self, features: torch.Tensor, labels: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> PrototypeScores:
        """features (B, C, *s), labels (B, *s) exclusive classes -> the step's ``PrototypeScores`` (fp32).
        ``valid`` (B, *s): voxels outside it take no part in balancing the assignment."""
        return PrototypeScores(*_FusedPrototypeScores.apply(features, self.prototypes, labels, ~self.initialized,
                                                            self.temperature, self.balance, valid))

    @torch.no_grad()
    def assignments(self, features: torch.Tensor, labels: torch.Tensor,
                    valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(assigned own-class prototype, classifier right) per voxel, both (B, *s), as ``ema_update`` takes them."""
        scores = self.scores(features, labels, valid)
        return scores.assigned, scores.correct

    @torch.no_grad()
    def ema_update(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                   assigned: torch.Tensor, correct: torch.Tensor, extra_mask: Optional[torch.Tensor] = None,
                   tally: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One EMA step; returns the (K, M) voxel counts that moved each prototype (summed over ranks), and
        with a ``tally`` mask (B, *s) a second (K, M) count of those voxels among them (e.g. pseudo-labelled).

        ``features`` (B, C, *s) are normalised here, after backward has freed the activations.

        ``assigned`` and ``correct`` (B, *s) come from this step's ``scores`` (or ``assignments``): the
        own-class prototype each voxel is assigned to and whether the classifier predicts the true class. One scatter-add
        of the embeddings into (class, prototype) slots, in nnU-Net's channel-first layout.
        """
        k, m, c = self.prototypes.shape
        batch = features.shape[0]
        selected = valid & correct & self.initialized[labels]
        if extra_mask is not None:
            selected &= extra_mask
        # unselected voxels go to a spare slot that is dropped afterwards
        slot = torch.where(selected, labels * m + assigned, torch.full_like(labels, k * m)).reshape(batch, 1, -1)
        e, _ = _unit_embedding(features.detach())
        # (contiguous: all_reduce needs contiguous memory)
        sums = e.new_zeros(batch, c, k * m + 1).scatter_add_(2, slot.expand(-1, c, -1), e).sum(0)[:, :-1].T.contiguous()
        counts = torch.bincount(slot.flatten(), minlength=k * m + 1)[:-1].float()
        if _distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        current = self.prototypes.reshape(k * m, c)
        mean = sums / counts.clamp_min(1.0).unsqueeze(1)
        moved = F.normalize(self.momentum * current + (1 - self.momentum) * mean, dim=-1)
        self.prototypes.copy_(torch.where((counts > 0).unsqueeze(1), moved, current).reshape(k, m, c))
        if tally is None:
            return counts.reshape(k, m)
        tallied = torch.bincount(slot.flatten()[tally.reshape(-1)], minlength=k * m + 1)[:-1].float()
        if _distributed():
            dist.all_reduce(tallied)
        return counts.reshape(k, m), tallied.reshape(k, m)

    @torch.no_grad()
    def initialize_classes(self, samples_per_class: Sequence[Optional[torch.Tensor]], seed: int = 0) -> List[int]:
        """k-means-initialise every class that has samples (from any rank) and is not initialised yet.

        Returns the classes initialised now. Under torch.distributed all ranks must call it.
        """
        before = self.initialized.clone()
        local = [None if s is None or len(s) == 0 else s.detach().float().cpu() for s in samples_per_class]
        if _distributed():
            gathered: List[List[Optional[torch.Tensor]]] = [None] * dist.get_world_size()  # type: ignore
            dist.all_gather_object(gathered, local)
            local = [self._concat([g[k] for g in gathered]) for k in range(self.num_classes)]
        if not _distributed() or dist.get_rank() == 0:
            for k, samples in enumerate(local):  # a one-off initialisation, not a training step
                if samples is not None and not bool(before[k]):
                    centres = kmeans_centres(F.normalize(samples, dim=-1).numpy(), self.prototypes_per_class, seed + k)
                    self.prototypes[k] = torch.from_numpy(centres).to(self.prototypes)
                    self.initialized[k] = True
        if _distributed():
            dist.broadcast(self.prototypes, 0)
            dist.broadcast(self.initialized, 0)
        return torch.nonzero(self.initialized & ~before).flatten().tolist()

    @staticmethod
    def _concat(parts: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        present = [p for p in parts if p is not None]
        return torch.cat(present) if present else None


class ClassEmbeddingSampler:
    """Uniform sample of at most ``capacity`` embeddings per class over everything ``add``-ed."""

    def __init__(self, num_classes: int, capacity: int, seed: int = 0):
        self.num_classes = num_classes
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.classes = torch.empty(0, dtype=torch.long)
        self.embeddings: Optional[torch.Tensor] = None

    def add(self, embedding: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        e = channels_last_flat(embedding.detach().float()).cpu()  # normalised by initialize_classes
        cls = labels.reshape(-1).cpu()
        keep = valid.reshape(-1).cpu()
        e, cls = e[keep], cls[keep]
        keys = torch.rand(len(cls), generator=self.generator)
        if self.embeddings is not None:
            e, cls, keys = torch.cat((self.embeddings, e)), torch.cat((self.classes, cls)), torch.cat((self.keys, keys))
        # bottom-k random keys per class = a uniform sample without replacement
        order = torch.argsort(cls.double() + keys.double())
        sorted_cls = cls[order]
        counts = torch.bincount(sorted_cls, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[sorted_cls]
        chosen = order[rank < self.capacity]
        self.embeddings, self.classes, self.keys = e[chosen], cls[chosen], keys[chosen]

    def samples(self) -> List[Optional[torch.Tensor]]:
        if self.embeddings is None:
            return [None] * self.num_classes
        return [self.embeddings[self.classes == k] if bool((self.classes == k).any()) else None
                for k in range(self.num_classes)]

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "classes": self.classes, "keys": self.keys}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings, self.classes, self.keys = state["embeddings"], state["classes"], state["keys"]
