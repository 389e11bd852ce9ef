"""SIPL's self-supervised mask generation (SMG): a k-means mask transformer over decoder stages."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from nnunetv2_proto.heads.kmeans_decoder import KMeansDecoderLayer


class SMGOutput(NamedTuple):
    pseudo_mask_logits: List[torch.Tensor]      # one (B, K, *s_l) tensor per layer, coarse to fine
    kept_fraction: Optional[torch.Tensor]       # mean share of non-empty clusters the filter kept; None: no filter ran


class SelfSupervisedMaskGenerator(nn.Module):
    """N learnable queries refined by ``layers_per_stage`` k-means layers per decoder stage.

    ``forward`` takes the features of the stages it was built for (coarse to fine) and
    returns every layer's pseudo-mask logits. Every layer after the first of its resolution
    filters clusters against the previous layer's pseudo mask with the threshold held in the
    ``tau`` buffer (a buffer, so checkpoints carry it): in training always, at inference when
    ``filter_at_inference`` (the same computation as in training, which is what the masks the
    prototypes were trained on look like).
    """

    def __init__(self, conv_op: type, stage_channels: Sequence[int], num_classes: int, num_queries: int = 32,
                 query_dim: int = 64, layers_per_stage: int = 2, num_heads: int = 8, initial_tau: float = 0.1,
                 filter_at_inference: bool = True, identity_init: bool = False):
        super().__init__()
        self.layers_per_stage = layers_per_stage
        self.num_stages = len(stage_channels)
        self.filter_at_inference = filter_at_inference
        self.queries = nn.Parameter(torch.randn(num_queries, query_dim))
        self.layers = nn.ModuleList([
            KMeansDecoderLayer(conv_op, channels, query_dim, num_classes, num_heads, identity_init=identity_init)
            for channels in stage_channels for _ in range(layers_per_stage)
        ])
        self.register_buffer("tau", torch.tensor(initial_tau))

    def set_tau(self, value: float) -> None:
        self.tau.fill_(value)

    def forward(self, stage_features: Sequence[torch.Tensor]) -> SMGOutput:
        queries = self.queries.unsqueeze(0).expand(stage_features[0].shape[0], -1, -1)
        filtering = self.training or self.filter_at_inference
        pseudo_mask_logits: List[torch.Tensor] = []
        kept: List[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            filter_labels = None
            if filtering and index % self.layers_per_stage != 0:
                filter_labels = pseudo_mask_logits[-1].detach().max(1).indices.flatten(1)
            queries, logits, layer_kept = layer(stage_features[index // self.layers_per_stage], queries,
                                                filter_labels, self.tau)
            pseudo_mask_logits.append(logits)
            if layer_kept is not None:
                kept.append(layer_kept)
        return SMGOutput(pseudo_mask_logits, torch.stack(kept).mean() if kept else None)
