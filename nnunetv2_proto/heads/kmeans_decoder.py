"""kMaX-style k-means cross-attention layer with SIPL's self-supervised cluster filter.

One layer (METHODS.md, SMG steps 1-5):
1. project the pixel features to the query width (1x1 conv + GroupNorm);
2. pixel-to-cluster logits: cosine similarity of pixel embeddings and query mask embeddings;
3. hard k-means update: every query adds the mean value of the pixels it owns (argmax over
   clusters), then query self-attention and an FFN, each residual with a LayerNorm;
4. cluster-to-class logits from the updated queries;
5. pseudo-mask logits = pixel-to-cluster logits x cluster-to-class logits.

The filter drops clusters whose pixels are mostly not one foreground class of the previous
layer's pseudo mask (purity < tau) from the k-means update; the mask generator decides whether
it also runs at inference.

Only GroupNorm / LayerNorm are used: batch statistics would tie samples together, which
breaks under nnU-Net's batch size of 2 and would make DDP differ from one process.
Similarities, counts and the pseudo-mask product run in fp32 under autocast: voxel counts
exceed fp16's range and the softmax over classes needs the precision.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def fp32_region(device_type: str):
    """A region where autocast is off, whatever the device."""
    return torch.autocast(device_type=device_type, enabled=False)


def hard_assignment(cluster_logits: torch.Tensor) -> torch.Tensor:
    """(B, N, V) logits -> (B, N, V) one-hot of the argmax over clusters (no gradient)."""
    # max(dim).indices: argmax's result (first index on ties), much faster on CPU for a non-last dim
    index = cluster_logits.detach().max(1, keepdim=True).indices
    return torch.zeros_like(cluster_logits, dtype=torch.float32).scatter_(1, index, 1.0)


def cluster_purity(assignment: torch.Tensor, class_one_hot: torch.Tensor) -> torch.Tensor:
    """ratio_n = max_k |cluster_n AND class_k| / |cluster_n|, batched as one matmul.

    assignment: (B, N, V) 0/1 float; class_one_hot: (B, V, C) 0/1 float (foreground classes).
    Returns (B, N); an empty cluster has ratio 0.
    """
    overlap = torch.bmm(assignment, class_one_hot)
    size = assignment.sum(-1)
    return overlap.amax(-1) / size.clamp_min(1.0)


def filter_clusters(cluster_logits: torch.Tensor, filter_labels: torch.Tensor, tau: torch.Tensor,
                    num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, N) True for the clusters whose purity against the previous pseudo mask reaches tau, and
    the share of non-empty clusters kept (a diagnostic, from the same assignment; no gradient)."""
    assignment = hard_assignment(cluster_logits)
    foreground = F.one_hot(filter_labels, num_classes)[..., 1:].to(torch.float32)
    keep = cluster_purity(assignment, foreground) >= tau
    owned = assignment.sum(-1) > 0
    return keep, (keep & owned).sum() / owned.sum().clamp_min(1)


def kmeans_update(values: torch.Tensor, cluster_logits: torch.Tensor, filter_labels: Optional[torch.Tensor],
                  tau: torch.Tensor, num_classes: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean value of the pixels each cluster owns, after SIPL's purity filter.

    values (B, D, V) float32, cluster_logits (B, N, V), filter_labels (B, V) exclusive classes of the
    previous pseudo mask or None; ``keep`` the filter's verdict if already computed.
    Returns (B, N, D); a filtered or empty cluster gets zeros.
    """
    batch, num_queries = cluster_logits.shape[:2]
    cluster = cluster_logits.detach().max(1).indices
    contributes = torch.ones_like(cluster, dtype=values.dtype)
    if filter_labels is not None:
        keep = filter_clusters(cluster_logits, filter_labels, tau, num_classes)[0] if keep is None else keep
        contributes = keep.gather(1, cluster).to(values.dtype)
    # A @ values with a one-hot A is a scatter-add of each pixel's value into its cluster
    weighted = values * contributes.unsqueeze(1)
    sums = values.new_zeros(batch, values.shape[1], num_queries).scatter_add(
        2, cluster.unsqueeze(1).expand_as(weighted), weighted)
    owned = values.new_zeros(batch, num_queries).scatter_add(1, cluster, contributes)
    return sums.transpose(1, 2) / owned.clamp_min(1.0).unsqueeze(-1)


class KMeansDecoderLayer(nn.Module):
    """``identity_init`` starts the layer as the official kMaX layers do: every residual branch
    (k-means update, self-attention, FFN) outputs zero, and clusters lean towards background
    (prior probability ``BACKGROUND_PRIOR``); otherwise PyTorch's default initialisation."""

    BACKGROUND_PRIOR = 0.9

    def __init__(self, conv_op: type, pixel_channels: int, query_dim: int, num_classes: int,
                 num_heads: int = 8, ffn_multiplier: int = 4, norm_groups: int = 8, identity_init: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.pixel_projection = nn.Sequential(conv_op(pixel_channels, query_dim, 1, bias=False),
                                              nn.GroupNorm(norm_groups, query_dim))
        self.pixel_value = conv_op(query_dim, query_dim, 1, bias=False)
        self.mask_embedding = nn.Linear(query_dim, query_dim)
        self.retrieved_norm = nn.LayerNorm(query_dim)
        self.kmeans_projection = nn.Linear(query_dim, query_dim)
        self.kmeans_norm = nn.LayerNorm(query_dim)
        self.self_attention = nn.MultiheadAttention(query_dim, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(nn.Linear(query_dim, ffn_multiplier * query_dim), nn.GELU(),
                                 nn.Linear(ffn_multiplier * query_dim, query_dim))
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.cluster_to_class = nn.Sequential(nn.Linear(query_dim, query_dim), nn.GELU(),
                                              nn.Linear(query_dim, num_classes))
        if identity_init:
            self._initialise_as_identity()

    @torch.no_grad()
    def _initialise_as_identity(self) -> None:
        for last in (self.kmeans_projection, self.self_attention.out_proj, self.ffn[-1]):
            last.weight.zero_()
            last.bias.zero_()
        if self.num_classes > 1:
            prior = self.BACKGROUND_PRIOR
            self.cluster_to_class[-1].bias[0] = math.log((self.num_classes - 1) * prior / (1 - prior))

    def forward(self, pixel_features: torch.Tensor, queries: torch.Tensor, filter_labels: Optional[torch.Tensor],
                tau: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """pixel_features (B, C, *spatial), queries (B, N, D), filter_labels (B, V) exclusive
        class of the previous layer's pseudo mask or None, tau 0-dim tensor.

        Returns the updated queries (B, N, D), pseudo-mask logits (B, num_classes, *spatial) and,
        when the filter ran, the share of non-empty clusters it kept (0-dim, no gradient).
        """
        batch, spatial = pixel_features.shape[0], pixel_features.shape[2:]
        pixels = self.pixel_projection(pixel_features)
        values = self.pixel_value(pixels).flatten(2)
        with fp32_region(pixels.device.type):
            pixel_embeddings = F.normalize(pixels.flatten(2).float(), dim=1)
            mask_embeddings = F.normalize(self.mask_embedding(queries.float()), dim=-1)
            cluster_logits = torch.einsum("bnd,bdv->bnv", mask_embeddings, pixel_embeddings)
            keep = kept = None
            if filter_labels is not None:
                keep, kept = filter_clusters(cluster_logits, filter_labels, tau, self.num_classes)
            retrieved = kmeans_update(values.float(), cluster_logits, filter_labels, tau, self.num_classes, keep)
        queries = self.kmeans_norm(queries + self.kmeans_projection(self.retrieved_norm(retrieved)))
        attended, _ = self.self_attention(queries, queries, queries, need_weights=False)
        queries = self.attention_norm(queries + attended)
        queries = self.ffn_norm(queries + self.ffn(queries))
        with fp32_region(pixels.device.type):
            class_logits = self.cluster_to_class(queries.float())
            mask_logits = torch.einsum("bnv,bnk->bkv", cluster_logits, class_logits)
        return queries, mask_logits.reshape(batch, self.num_classes, *spatial), kept
