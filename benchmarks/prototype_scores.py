"""Time MPER's fused prototype scores with and without voxel blocks, alternating in one process.

What one MPER training step adds on the prototype side: ``MultiPrototypeClassifier.scores``
(forward and backward, against labels) and the EMA update, at the CPU preset's shape (batch 2,
16 channels, 40x64x80 voxels) for K classes and M prototypes per class. "blocked" is the
default (``voxel_blocks``: about 2 MB of similarities per block on a CPU); "one block" runs the
same function on the whole batch at once, which is how it ran before the blocks. Both
variants alternate, so a drift of the machine's speed hits both alike; min and median of the
repeats are printed, with the ratio of the two.

Run: python benchmarks/prototype_scores.py --num-classes 14 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from nnunetv2_proto import voxel_blocks
from nnunetv2_proto.heads import multi_prototype

WHOLE_BATCH = 1 << 62


def timed(step: Callable[[], None]) -> float:
    tick = time.perf_counter()
    step()
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--prototypes", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 40, 64, 80], help="batch and spatial size")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    batch, *spatial = args.shape
    features = torch.randn(batch, args.channels, *spatial, generator=generator, requires_grad=True)
    labels = torch.randint(0, args.num_classes, (batch, *spatial), generator=generator)
    valid = torch.ones_like(labels, dtype=torch.bool)
    classifier = multi_prototype.MultiPrototypeClassifier(args.num_classes, args.prototypes, args.channels)
    classifier.initialized.fill_(True)

    def step() -> None:
        scores = classifier.scores(features, labels)
        (scores.logits.mean() + scores.contrast.mean() + scores.distance.mean()).backward()
        classifier.ema_update(features, labels, valid, scores.assigned, scores.correct)

    default_block_bytes = voxel_blocks.CPU_BLOCK_BYTES
    variants = {"blocked": default_block_bytes, "one block": WHOLE_BATCH}
    seconds: Dict[str, List[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, block_bytes in variants.items():
            voxel_blocks.CPU_BLOCK_BYTES = block_bytes
            elapsed = timed(step)
            if repeat:
                seconds[name].append(elapsed)
    voxel_blocks.CPU_BLOCK_BYTES = default_block_bytes
    print(f"K = {args.num_classes}, M = {args.prototypes}, C = {args.channels}, shape {args.shape}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    for name, values in seconds.items():
        print(f"  {name:9s}  min {1e3 * min(values):7.1f} ms  median {1e3 * statistics.median(values):7.1f} ms")
    print(f"  blocked / one block: min {min(seconds['blocked']) / min(seconds['one block']):.2f}, "
          f"median {statistics.median(seconds['blocked']) / statistics.median(seconds['one block']):.2f}")


if __name__ == "__main__":
    main()
