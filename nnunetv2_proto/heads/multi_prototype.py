"""MPER's multi-prototype cosine classifier and the machinery that keeps its prototypes.

The prototypes are a buffer ``(K, M, C)`` of unit vectors, not parameters: they move by
EMA, never by gradient, so DDP neither syncs gradients for them nor complains that they
have none, and the state dict (checkpoints, ``nnUNetv2_predict``) carries them.

- similarity s_{k,m}(x) = cos(e(x), p_{k,m}); class logit = max_m s_{k,m}(x) / T.
- ``ema_update``: for every (k, m), the mean embedding of voxels of true class k whose
  nearest class-k prototype is m and that the prototype classifier gets right; one
  scatter-add over (class, prototype) slots, all-reduced under torch.distributed so every
  rank holds identical prototypes. Slots without voxels (e.g. an absent class) keep their
  value.
- ``initialize_classes``: MiniBatchKMeans per class on sampled embeddings, gathered from all
  ranks, computed on rank 0 and broadcast. Classes with fewer samples than M get jittered
  copies; classes without samples stay uninitialised until they are seen.
- ``ClassEmbeddingSampler``: a bounded, uniform per-class sample of embeddings across many
  batches (bottom-k of random keys), vectorised.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


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


class MultiPrototypeClassifier(nn.Module):
    def __init__(self, num_classes: int, prototypes_per_class: int, embedding_dim: int,
                 temperature: float = 0.1, momentum: float = 0.99):
        super().__init__()
        self.temperature = temperature
        self.momentum = momentum
        self.register_buffer("prototypes", F.normalize(torch.randn(num_classes, prototypes_per_class, embedding_dim), dim=-1))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def prototypes_per_class(self) -> int:
        return self.prototypes.shape[1]

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, C, *s), any norm -> cosine similarities (B, K, M, *s), in fp32.

        cos = <f, p> / |f|: dividing the K*M dot products instead of normalising the features
        means no normalised C-channel copy of the full-resolution embedding exists during the
        training step (the EMA update normalises after backward); the norm is accumulated in fp32
        under autocast.
        """
        dots = torch.einsum("bc...,kmc->bkm...", features, self.prototypes.to(features.dtype))
        norms = torch.linalg.vector_norm(features, dim=1, keepdim=True, dtype=torch.float32)
        return dots / norms.clamp_min(1e-12).unsqueeze(2)  # fp32 by type promotion

    def logits(self, similarities: torch.Tensor) -> torch.Tensor:
        """(B, K, M, *s) -> class logits (B, K, *s) = max over prototypes / T.

        Classes whose prototypes were never initialised (not seen yet) get the lowest possible
        logit, so random initial prototypes cannot win by chance.
        """
        # max, not amax: amax's backward spreads the gradient over ties with extra full-size
        # comparisons and divisions, about twice the time on CPU; exact ties have measure zero
        logits = similarities.max(2).values / self.temperature
        unseen = ~self.initialized.view(1, -1, *([1] * (logits.ndim - 2)))
        return logits.masked_fill(unseen, -1.0 / self.temperature)

    @torch.no_grad()
    def ema_update(self, features: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                   similarities: torch.Tensor, extra_mask: Optional[torch.Tensor] = None,
                   tally: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One EMA step; returns the (K, M) voxel counts that moved each prototype (summed over ranks), and
        with a ``tally`` mask (B, *s) a second (K, M) count of those voxels among them (e.g. pseudo-labelled).

        ``features`` (B, C, *s) are normalised here, after backward has freed the activations.

        Works in nnU-Net's channel-first layout: per voxel the nearest prototype of its own class
        and the classifier's prediction, then one scatter-add of the embeddings into (class,
        prototype) slots -- no copy of the (B, K, M, *s) similarities.
        """
        k, m, c = self.prototypes.shape
        batch = features.shape[0]
        sims = similarities.detach()
        own = sims.gather(1, labels.unsqueeze(1).unsqueeze(1).expand(-1, 1, m, *labels.shape[1:])).squeeze(1)
        nearest = own.max(1).indices
        predicted = self.logits(sims).max(1).indices
        selected = valid & (predicted == labels) & self.initialized[labels]
        if extra_mask is not None:
            selected &= extra_mask
        # unselected voxels go to a spare slot that is dropped afterwards
        slot = torch.where(selected, labels * m + nearest, torch.full_like(labels, k * m)).reshape(batch, 1, -1)
        e = F.normalize(features.detach().float(), dim=1).reshape(batch, c, -1)
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
