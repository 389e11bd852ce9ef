"""nnU-Net's per-epoch curves of any runs in one figure: the EMA pseudo-Dice and the training loss.

``compare`` draws the same figure for the runs it compares (``comparison_curves.png``); this
script takes fold folders directly, e.g. a run that is still training (its
``checkpoint_latest.pth``) or runs of different budgets:

    python benchmarks/training_curves.py --out docs/results/la_curves.png \\
        $nnUNet_results/Dataset501_LeftAtrium/nnUNetTrainer_cpuBudgetLong_seed1__nnUNetPlans__3d_cpu/fold_0 \\
        $nnUNet_results/Dataset501_LeftAtrium/nnUNetTrainerMPER_cpuBudgetLong_seed1__nnUNetPlans__3d_cpu/fold_0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from nnunetv2_proto.evaluation.learning_curves import LATE_FRACTION, TrainingCurve, plot_training_curves, \
    read_training_curve
from nnunetv2_proto.evaluation.report import short_name
from nnunetv2_proto.training.seeding import split_seeded_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fold folders (.../<trainer>__<plans>__<config>/fold_X)")
    parser.add_argument("--out", type=Path, required=True, help="output .png")
    args = parser.parse_args()
    curves: Dict[str, Dict[str, TrainingCurve]] = {}
    for folder in args.runs:
        curve = read_training_curve(folder)
        if curve is None:
            raise SystemExit(f"{folder} holds no checkpoint_final.pth or checkpoint_latest.pth with a training log")
        trainer = folder.parent.name.split("__")[0]
        seeded = split_seeded_name(trainer)  # one colour per trainer, one line per seed and fold
        trainer, run = (seeded[0], f"{folder.name} seed {seeded[1]}") if seeded else (trainer, folder.name)
        curves.setdefault(trainer, {})[run] = curve
        print(f"{short_name(trainer)} {run}: {curve.epochs} epochs, final EMA pseudo-Dice "
              f"{curve.ema_pseudo_dice[-1]:.3f}, late rise (last {LATE_FRACTION:.0%} of epochs minus the "
              f"{LATE_FRACTION:.0%} before) {curve.late_rise():+.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_training_curves(curves, {t: short_name(t) for t in curves}, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
