"""Per-voxel computations done block by block over the voxels, so that their wide temporaries stay small.

The prototype heads compute several terms whose temporaries are K (classes) or K x M (prototype
slots) channels wide at full resolution, while nnU-Net's CPU-preset network is 16 channels wide:
held for backward, or even only allocated once per step, they dominate a step's memory and,
on a CPU, its time (each fresh tensor page-faults and every pass streams it through RAM).
Functions built on these blocks keep only per-voxel scalars or their inputs for backward and
recompute the rest block by block; on a CPU a block's passes stay in cache. A GPU gets one
block: it has the bandwidth, and one launch per term is what it wants.
"""

from __future__ import annotations

from typing import List

import torch

# bytes of the widest temporary per block on a CPU (about the size of a core's L2 cache)
CPU_BLOCK_BYTES = 1 << 21
_MIN_BLOCK_VOXELS = 64


def voxel_blocks(num_voxels: int, bytes_per_voxel: int, device: torch.device) -> List[slice]:
    """Slices of ``range(num_voxels)``: one on a GPU, blocks of about ``CPU_BLOCK_BYTES`` of temporaries on a CPU."""
    if device.type != "cpu":
        return [slice(0, num_voxels)]
    size = max(_MIN_BLOCK_VOXELS, CPU_BLOCK_BYTES // max(1, bytes_per_voxel))
    return [slice(start, min(start + size, num_voxels)) for start in range(0, num_voxels, size)]


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) -> fp32; fp32 and fp64 unchanged (the tests check gradients in fp64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
