"""nnU-Net's per-epoch curves of several runs in one figure: the EMA pseudo-Dice and the training loss.

Reads the ``logging`` record nnU-Net keeps in each run's checkpoint (the numbers behind its own
progress.png), so runs of different trainers can be laid over each other, e.g. to see whether
vanilla has levelled off at a budget and where a method's phase change shows:

    python benchmarks/training_curves.py --out docs/results/la_curves.png \\
        $nnUNet_results/Dataset501_LeftAtrium/nnUNetTrainer_cpuBudgetLong_seed1__nnUNetPlans__3d_cpu/fold_0 \\
        $nnUNet_results/Dataset501_LeftAtrium/nnUNetTrainerMPER_cpuBudgetLong_seed1__nnUNetPlans__3d_cpu/fold_0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import torch


def run_curves(fold_folder: Path) -> Dict[str, List[float]]:
    """The per-epoch logging of a run (``checkpoint_final.pth``, else ``checkpoint_latest.pth``)."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold_folder / name).is_file():
            logging = torch.load(fold_folder / name, map_location="cpu", weights_only=False)["logging"]
            epochs = len(logging["ema_fg_dice"])
            return {key: list(values)[:epochs] for key, values in logging.items()}
    raise SystemExit(f"{fold_folder} holds no checkpoint_final.pth or checkpoint_latest.pth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fold folders (.../<trainer>__<plans>__<config>/fold_X)")
    parser.add_argument("--out", type=Path, required=True, help="output .png")
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (dice_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for folder in args.runs:
        curves = run_curves(folder)
        trainer = folder.parent.name.split("__")[0]
        label = trainer.replace("nnUNetTrainer", "vanilla" if trainer.startswith("nnUNetTrainer_") else "", 1)
        dice_axis.plot(curves["ema_fg_dice"], label=label)
        loss_axis.plot(curves["train_losses"], label=label)
        last = curves["ema_fg_dice"][-10:]
        print(f"{label}: EMA pseudo-Dice over the last {len(last)} epochs {min(last):.3f}-{max(last):.3f}, "
              f"final {curves['ema_fg_dice'][-1]:.3f}")
    dice_axis.set(xlabel="epoch", ylabel="EMA pseudo-Dice (validation patches)", title="pseudo-Dice")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss (includes each method's extra terms)")
    for axis in (dice_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
