"""How long `nnunetv2-proto evaluate` needs per structure on a CT-sized case (512 x 512 x 200).

Prints seconds for Dice/IoU/HD95/ASD of a liver-sized and a small lesion-sized structure,
with nnU-Net's Dice-only computation on the same masks for scale. Run: python benchmarks/evaluation_speed.py
"""

import time

import numpy as np
from scipy import ndimage

from nnunetv2_proto.evaluation.metrics import structure_metrics


def blob(shape, centre, radii, seed):
    """An ellipsoid with a bumpy surface (smooth noise added to its implicit function)."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    implicit = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    bumps = ndimage.zoom(rng.standard_normal((8, 16, 16)), [s / n for s, n in zip(shape, (8, 16, 16))], order=1)
    return implicit + 0.15 * bumps[: shape[0], : shape[1], : shape[2]] < 1


def main() -> None:
    shape, spacing = (200, 512, 512), (2.5, 0.8, 0.8)
    cases = {"large (liver-sized)": ((100, 256, 256), (60, 150, 120)), "small (lesion-sized)": ((90, 300, 200), (6, 12, 12))}
    for name, (centre, radii) in cases.items():
        reference = blob(shape, centre, radii, 0)
        prediction = blob(shape, [c + 2 for c in centre], radii, 1)
        tick = time.perf_counter()
        m = structure_metrics(reference, prediction, spacing)
        ours = time.perf_counter() - tick
        tick = time.perf_counter()
        from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
        compute_tp_fp_fn_tn(reference, prediction)
        dice_only = time.perf_counter() - tick
        print(f"{name}: {reference.sum():,} voxels, Dice {m.Dice:.3f}, HD95 {m.HD95:.2f} mm, ASD {m.ASD:.2f} mm -> "
              f"{ours:.2f} s (nnU-Net's Dice-only counts on the same masks: {dice_only:.2f} s)")


if __name__ == "__main__":
    main()
