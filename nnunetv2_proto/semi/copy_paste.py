"""Bidirectional copy-paste (BCP): cuboid masks and the pasting of images, labels and weights.

``copy_paste(fg, bg, m) = fg * m + bg * (1 - m)`` for images (B, C, *s) and for label or weight
maps (B, *s), with one mask per sample. Every labelled patch l_i is pasted with an unlabelled
u_i both ways (``both_ways``). Applying the same pasting to
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


def both_ways(labeled: torch.Tensor, unlabeled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) for BCP with every labelled patch used whole: with the masks given twice
    (``torch.cat((m, m))``), x_i = l_i m_i + u_i (1 - m_i) and x_{B+i} = u_i m_i + l_i (1 - m_i).

    BCP's own pairing (x1 = l_a|u_a, x2 = u_b|l_b) keeps half of each labelled patch, so a step sees
    half the labelled voxels of a labelled-only nnU-Net step; pasting both ways restores parity at
    twice the images (the trainer runs them as two micro-batches of the plans' batch size).
    """
    return torch.cat((labeled, unlabeled)), torch.cat((unlabeled, labeled))


def swapped_pairs(batch: torch.Tensor) -> torch.Tensor:
    """Partner of every sample within its pair (2i <-> 2i+1), for copy-paste among labelled patches."""
    index = torch.arange(batch.shape[0], device=batch.device) ^ 1
    return batch[index]
