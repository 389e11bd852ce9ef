"""Training-log diagnostics of the heads: what a user reads to see whether a head does its job.

Computed on nnU-Net's validation batches only (validation labels; training never sees more
labels than vanilla nnU-Net), accumulated over an epoch and printed once per epoch.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from nnunetv2_proto.label_layout import downsample_labels, one_hot


@torch.no_grad()
def foreground_confusion(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """(3, K-1) true positives, false positives, false negatives of the argmax of ``logits`` (B, K, *s_l)
    per foreground class, against full-resolution ``labels`` / ``valid`` brought to the logits' grid."""
    labels, valid = downsample_labels(labels, valid, logits.shape[2:])
    num_classes = logits.shape[1]
    weight = valid.float().unsqueeze(1)
    predicted = one_hot(logits.max(1).indices, num_classes) * weight
    reference = one_hot(labels, num_classes) * weight
    axes = (0, *range(2, logits.ndim))
    tp = (predicted * reference).sum(axes)
    fp = (predicted * (1 - reference)).sum(axes)
    fn = ((1 - predicted) * reference).sum(axes)
    return torch.stack((tp, fp, fn))[:, 1:].cpu().numpy()


def dice_from_confusion(confusion: np.ndarray) -> List[float]:
    tp, fp, fn = confusion
    return [float(2 * t / (2 * t + p + n)) if (2 * t + p + n) > 0 else float("nan") for t, p, n in zip(tp, fp, fn)]


def summarise_epoch(records: Sequence[Dict[str, np.ndarray]]) -> Dict[str, object]:
    """Sum the confusions, average the scalars, over an epoch's validation batches."""
    summary: Dict[str, object] = {}
    for key in sorted({k for r in records for k in r}):
        values = [r[key] for r in records if key in r]
        if key.endswith("confusion"):
            summary[key.replace("confusion", "dice")] = dice_from_confusion(np.sum(values, 0))
        else:
            summary[key] = float(np.mean(values))
    return summary
