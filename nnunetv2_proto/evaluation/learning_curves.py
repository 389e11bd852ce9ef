"""Training curves of the compared runs: had the baseline levelled off when training stopped?

At a budget where vanilla nnU-Net is still climbing, a head that merely learns faster wins a
comparison it would lose at convergence, and runs spread widely (a structure that one seed has
not learnt yet). nnU-Net keeps every run's per-epoch log in its checkpoints (pseudo-Dice and its
EMA, train loss); ``compare`` reads it from ``checkpoint_final.pth`` (a cut run's
``checkpoint_latest.pth``, an archived run's log-only ``training_log.pth``), plots the curves and
reports how much each run's pseudo-Dice still rose at the end: the mean over the last fifth of
the epochs minus the mean over the fifth before. Window means of the per-epoch values, not the
EMA, because the EMA (time constant ten epochs) lags and would report a run that has stopped
improving as still rising. The pseudo-Dice is nnU-Net's own (a few patches of the validation
cases, foreground classes); it only tracks the final Dice, which is why it is read for its slope,
never as the result.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_proto.training.budgets import TIMING_FILE  # the CPU budgets record the steps per epoch there

# the window (share of the epochs) whose mean pseudo-Dice is compared with the window before it
LATE_FRACTION = 0.2
# a baseline whose pseudo-Dice still rises more than this between the two windows is short of its plateau
STILL_RISING = 0.01
# a run archived without its weights (benchmarks/run_archive.py) keeps only the checkpoint's log, in this file
TRAINING_LOG_FILE = "training_log.pth"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", TRAINING_LOG_FILE)


@dataclass(frozen=True)
class TrainingCurve:
    pseudo_dice: np.ndarray  # one value per finished epoch
    ema_pseudo_dice: np.ndarray
    train_loss: np.ndarray
    iterations_per_epoch: Optional[int]  # None: unknown, the curve is plotted against epochs

    @property
    def epochs(self) -> int:
        return len(self.pseudo_dice)

    def late_rise(self, fraction: float = LATE_FRACTION) -> float:
        """Mean pseudo-Dice of the last ``fraction`` of the epochs minus that of the same window before it."""
        window = max(1, int(round(self.epochs * fraction)))
        if self.epochs < 2 * window:
            return float("nan")
        return float(self.pseudo_dice[-window:].mean() - self.pseudo_dice[-2 * window:-window].mean())


def read_training_curve(fold_folder: Path) -> Optional[TrainingCurve]:
    """The per-epoch log nnU-Net saved with the run, or None when the folder has no readable checkpoint with
    one (the curves are a diagnostic: a damaged checkpoint must not stop the comparison of finished predictions;
    the report lists the runs without a curve)."""
    import torch
    checkpoint_file = next((fold_folder / name for name in CHECKPOINTS if (fold_folder / name).is_file()), None)
    if checkpoint_file is None:
        return None
    # nnU-Net's checkpoints hold numpy scalars and the trainer's init arguments, so they need the full
    # unpickler; these are the user's own training outputs, loaded the way nnU-Net itself loads them.
    # Memory-mapped: only the log is read, not the weights and optimiser state (hundreds of MB in 3d_fullres)
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False, mmap=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    log = checkpoint.get("logging", {}) if isinstance(checkpoint, dict) else {}
    epochs = min(len(log.get(key, [])) for key in ("mean_fg_dice", "ema_fg_dice", "train_losses"))
    if epochs == 0:
        return None
    timing = fold_folder / TIMING_FILE
    iterations = json.loads(timing.read_text()).get("iterations_per_epoch") if timing.is_file() else None

    def series(key: str) -> np.ndarray:
        return np.asarray(log[key][:epochs], dtype=float)

    return TrainingCurve(series("mean_fg_dice"), series("ema_fg_dice"), series("train_losses"), iterations)


def curve_rows(curves: Dict[str, Dict[str, TrainingCurve]]) -> List[dict]:
    """One row per run: trainer, run label, epochs, steps, final EMA pseudo-Dice, the late rise."""
    rows = []
    for trainer, runs in curves.items():
        for label, curve in runs.items():
            rows.append({"trainer": trainer, "run": label, "epochs": curve.epochs,
                         "steps": None if curve.iterations_per_epoch is None
                         else curve.epochs * curve.iterations_per_epoch,
                         "final_ema_pseudo_dice": float(curve.ema_pseudo_dice[-1]),
                         "late_rise": curve.late_rise()})
    return rows


def curve_report(rows: Sequence[dict], baseline: str, without_log: Sequence[str] = ()) -> List[str]:
    """Markdown lines: the per-run table, the runs whose checkpoint gave no log, and, when the baseline was still
    climbing, the warning."""
    if not rows and not without_log:
        return []
    lines = ["## Training curves (did the budget reach the baseline's plateau?)", "",
             f"nnU-Net's pseudo-Dice (validation patches): its EMA at the end of training, and the late rise = "
             f"mean over the last {LATE_FRACTION:.0%} of the epochs minus mean over the {LATE_FRACTION:.0%} before. "
             f"Figure: `comparison_curves.png`.", "",
             "| trainer | run | epochs | steps | final EMA pseudo-Dice | late rise |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        lines.append(f"| `{r['trainer']}` | {r['run']} | {r['epochs']} | {steps} | {r['final_ema_pseudo_dice']:.3f} | "
                     f"{r['late_rise']:+.3f} |")
    if without_log:
        lines += ["", "No training log could be read from the checkpoint of: " + ", ".join(without_log) + "."]
    rising = [r for r in rows if r["trainer"] == baseline and np.isfinite(r["late_rise"])
              and r["late_rise"] > STILL_RISING]
    if rising:
        worst = max(rising, key=lambda r: r["late_rise"])
        lines += ["", f"**The baseline had not levelled off:** {len(rising)} of its runs still gained more than "
                  f"{STILL_RISING} pseudo-Dice at the end (up to {worst['late_rise']:+.3f}, "
                  f"{worst['run']}). At this budget a method that only learns faster can look better than it is; "
                  f"prefer a budget where the baseline's curves are flat."]
    return lines + [""]


def plot_training_curves(curves: Dict[str, Dict[str, TrainingCurve]], names: Dict[str, str], path: Path) -> Path:
    """EMA pseudo-Dice and train loss per run, one colour per trainer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = plt.get_cmap("tab10")
    fig, (dice_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    use_steps = all(c.iterations_per_epoch for runs in curves.values() for c in runs.values())
    for index, (trainer, runs) in enumerate(curves.items()):
        for run_index, (label, curve) in enumerate(runs.items()):
            x = np.arange(1, curve.epochs + 1) * (curve.iterations_per_epoch if use_steps else 1)
            style = dict(color=colours(index % 10), alpha=0.85, linewidth=1.2,
                         label=names[trainer] if run_index == 0 else None)
            dice_ax.plot(x, curve.ema_pseudo_dice, **style)
            loss_ax.plot(x, curve.train_loss, **style)
    for ax, title in ((dice_ax, "EMA pseudo-Dice (validation patches), one line per run"),
                      (loss_ax, "train loss (each family's own objective: compare within a family)")):
        ax.set_xlabel("optimiser steps" if use_steps else "epochs")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    dice_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
