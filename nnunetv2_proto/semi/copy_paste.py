"""Bidirectional copy-paste (BCP): cuboid masks and the pasting of images, labels and weights.

``copy_paste(fg, bg, m) = fg * m + bg * (1 - m)`` for images (B, C, *s) and for label or weight
maps (B, *s), with one mask per sample. BCP pairs labelled patches (l_a, l_b) with unlabelled
ones (u_a, u_b): x1 = l_a m + u_a (1 - m), x2 = u_b m + l_b (1 - m). Applying the same pasting to
the labels (ground truth where labelled, pseudo labels elsewhere) and to "came from a labelled
patch" keeps every voxel's image, label and weight together.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def cuboid_masks(count: int, spatial_shape: Sequence[int], fraction: float = 2 / 3,
                 generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """``count`` boolean masks, each a random axis-aligned cuboid covering ``fraction`` of every axis."""
    inside = None
    for axis, size in enumerate(spatial_shape):
        extent = max(1, round(size * fraction))
        start = torch.randint(0, size - extent + 1, (count,), generator=generator)
        index = torch.arange(size)
        along = (index >= start[:, None]) & (index < start[:, None] + extent)  # (count, size)
        along = along.view(count, *[size if a == axis else 1 for a in range(len(spatial_shape))])
        inside = along if inside is None else inside & along
    return inside.to(device) if device is not None else inside


def copy_paste(foreground: torch.Tensor, background: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    m = masks if foreground.ndim == masks.ndim else masks.unsqueeze(1)
    return torch.where(m, foreground, background)


def bidirectional_pairs(labeled: torch.Tensor, unlabeled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) for BCP: pairs (2i, 2i+1) give x1 = l_a|u_a and x2 = u_b|l_b."""
    foreground = torch.cat((labeled[0::2], unlabeled[1::2]))
    background = torch.cat((unlabeled[0::2], labeled[1::2]))
    return foreground, background


def swapped_pairs(batch: torch.Tensor) -> torch.Tensor:
    """Partner of every sample within its pair (2i <-> 2i+1), for copy-paste among labelled patches."""
    index = torch.arange(batch.shape[0], device=batch.device) ^ 1
    return batch[index]
