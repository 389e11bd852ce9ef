"""SIPL's instance-adaptive prototype learning (IPL): prototype generator and two predictors.

- ``PrototypeGenerator``: g_k = MLP(p_k^i (+) p_k^c), with the instance proposal
  p_k^i = GAP(M_k * F) over the encoder bottleneck F and a learnable, randomly initialised
  common proposal p_k^c (paper Eq. 2-3).
- ``DotProductPredictor``: logit_k(x) = <proj(F_o)(x), g_k> + b_k (paper Eq. 4).
- ``DynamicConvPredictor``: the official code's "controller": g_k parameterises a
  per-sample, per-class 3-layer 1x1-conv head applied to F_o.

All spatial work is written with ``...`` so the same code serves 2D and 3D.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from nnunetv2_proto.heads.kmeans_decoder import fp32_region


def resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """Area-average masks onto a coarser grid (or interpolate onto a finer one)."""
    size = tuple(int(s) for s in size)
    if tuple(masks.shape[2:]) == size:
        return masks
    if all(m >= s for m, s in zip(masks.shape[2:], size)):
        pool = F.adaptive_avg_pool3d if masks.ndim == 5 else F.adaptive_avg_pool2d
        return pool(masks, size)
    return F.interpolate(masks, size=size, mode="trilinear" if masks.ndim == 5 else "bilinear", align_corners=False)


class Prototypes(NamedTuple):
    prototypes: torch.Tensor                    # (B, K, D)
    instance_proposals: Optional[torch.Tensor]  # (B, K, C); None without instance proposals
    common_proposals: torch.Tensor              # (B, K, C)


class PrototypeGenerator(nn.Module):
    def __init__(self, num_outputs: int, feature_channels: int, prototype_dim: int,
                 use_instance_proposals: bool = True, normalize_by_mass: bool = False,
                 hidden_dim: Optional[int] = None):
        super().__init__()
        self.use_instance_proposals = use_instance_proposals
        self.normalize_by_mass = normalize_by_mass
        self.common_proposals = nn.Parameter(torch.randn(num_outputs, feature_channels))
        in_dim = 2 * feature_channels if use_instance_proposals else feature_channels
        hidden_dim = hidden_dim or max(prototype_dim, feature_channels)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, prototype_dim))

    def instance_proposals(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """features (B, C, *s), masks (B, K, *any) in [0, 1] -> (B, K, C)."""
        masks = resize_masks(masks.float(), features.shape[2:])
        with fp32_region(features.device.type):
            pooled = torch.einsum("bk...,bc...->bkc", masks, features.float())
            if self.normalize_by_mass:
                mass = masks.flatten(2).sum(-1, keepdim=True)
                return pooled / mass.clamp_min(1e-3)
            return pooled / features[0, 0].numel()

    def forward(self, features: torch.Tensor, masks: Optional[torch.Tensor]) -> Prototypes:
        """Prototypes (B, K, D) and the proposals they came from. ``masks`` None means no instance
        information (zero proposals)."""
        batch = features.shape[0]
        common = self.common_proposals.unsqueeze(0).expand(batch, -1, -1)
        if not self.use_instance_proposals:
            return Prototypes(self.mlp(common), None, common)
        if masks is None:
            instance = torch.zeros_like(common)
        else:
            instance = self.instance_proposals(features, masks).to(common.dtype)
        return Prototypes(self.mlp(torch.cat((instance, common), -1)), instance, common)


class DotProductPredictor(nn.Module):
    def __init__(self, conv_op: type, pixel_channels: int, prototype_dim: int, num_outputs: int):
        super().__init__()
        self.pixel_projection = conv_op(pixel_channels, prototype_dim, 1)
        self.bias = nn.Parameter(torch.zeros(num_outputs))

    def forward(self, pixel_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        # <P f + c, g_k> = <f, P^T g_k> + <c, g_k>: folding the projection into per-sample class
        # weights gives the same logits without a D-channel full-resolution tensor
        projection = self.pixel_projection.weight.flatten(1)
        class_weights = torch.einsum("dc,bkd->bkc", projection, prototypes)
        class_bias = torch.einsum("d,bkd->bk", self.pixel_projection.bias, prototypes) + self.bias
        logits = torch.einsum("bc...,bkc->bk...", pixel_features, class_weights.to(pixel_features.dtype))
        return logits + class_bias.view(*class_bias.shape, *([1] * (logits.ndim - 2))).to(logits.dtype)


class DynamicConvPredictor(nn.Module):
    """Each prototype generates the weights of a (hidden -> hidden -> hidden -> 1) 1x1-conv head."""

    def __init__(self, conv_op: type, pixel_channels: int, prototype_dim: int, num_outputs: int, hidden: int = 8):
        super().__init__()
        self.hidden = hidden
        self.pixel_projection = conv_op(pixel_channels, hidden, 1)
        self.split = [hidden * hidden, hidden, hidden * hidden, hidden, hidden, 1]
        self.controller = nn.Linear(prototype_dim, sum(self.split))

    def forward(self, pixel_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        x = self.pixel_projection(pixel_features)
        batch, classes = prototypes.shape[:2]
        h = self.hidden
        w1, b1, w2, b2, w3, b3 = torch.split(self.controller(prototypes).to(x.dtype), self.split, -1)
        expand = (1,) * (x.ndim - 2)
        w1, w2 = w1.reshape(batch, classes, h, h), w2.reshape(batch, classes, h, h)
        y = F.relu(torch.einsum("bkoi,bi...->bko...", w1, x) + b1.reshape(batch, classes, h, *expand))
        y = F.relu(torch.einsum("bkoi,bki...->bko...", w2, y) + b2.reshape(batch, classes, h, *expand))
        return torch.einsum("bki,bki...->bk...", w3, y) + b3.reshape(batch, classes, *expand)
