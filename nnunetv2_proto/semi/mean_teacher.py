"""Mean teacher: an EMA copy of the student that produces pseudo labels."""

from __future__ import annotations

import copy

import cc3d
import numpy as np
import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters; buffers are copied."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, decay)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - decay)
    for theirs, ours in zip(teacher.buffers(), student.buffers()):
        theirs.copy_(ours)


def largest_component(labels: torch.Tensor) -> torch.Tensor:
    """Keep, per sample, only the largest connected foreground component (single-structure datasets).

    Face connectivity (6 in 3D, 4 in 2D), ties to the component met first in raster order, as
    scipy's ``ndimage.label``; cc3d (an nnU-Net dependency) labels faster.
    """
    out = np.zeros(labels.shape, dtype=np.int64)
    array = labels.cpu().numpy()
    connectivity = 6 if array.ndim == 4 else 4
    for b in range(array.shape[0]):  # per sample: one volume at a time
        components = cc3d.connected_components(array[b] > 0, connectivity=connectivity)
        sizes = np.bincount(components.ravel())[1:]
        if sizes.size:
            out[b] = np.where(components == np.argmax(sizes) + 1, array[b], 0)
    return torch.from_numpy(out).to(labels.device)
