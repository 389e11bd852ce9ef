"""The demo's results: per-class Dice (nnU-Net's evaluation), cost figures, a table and a figure."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from nnunetv2_proto.training.budgets import TIMING_FILE



@dataclass
class TrainerResult:
    trainer: str
    dice_per_class: Dict[str, float]
    mean_dice: float
    mean_hd95: float
    p_wilcoxon: float
    seconds_per_iteration: Optional[float]
    seconds_per_case: Optional[float]


def collect_results(paths, dataset: str, trainers: Sequence[str], prediction_seconds: Dict[str, float],
                    configuration: str) -> List[TrainerResult]:
    """Scores every trainer's nnUNetv2_predict output with ``nnunetv2-proto compare`` (test-set mode)."""
    from nnunetv2_proto.evaluation.compare import MEAN, compare
    out = compare(dataset, configuration, list(trainers), baseline=trainers[0],
                  output=paths.workdir / "comparison", test_gt=paths.validation_labels,
                  test_pred_root=paths.workdir / "predictions", dataset_json=paths.raw / dataset / "dataset.json",
                  num_processes=2, progress=lambda _: None)
    report = json.loads((out / "comparison.json").read_text())
    stats = {(r["trainer"], r["structure"], r["metric"]): r for r in report["statistics"]}
    results = []
    for trainer in trainers:
        timing = paths.results / dataset / convert_trainer_plans_config_to_identifier(
            trainer, "nnUNetPlans", configuration) / "fold_0" / TIMING_FILE
        seconds = json.loads(timing.read_text())["median_seconds_per_iteration"] if timing.is_file() else None
        results.append(TrainerResult(
            trainer, {s: stats[(trainer, s, "Dice")]["mean"] for s in report["structures"]},
            stats[(trainer, MEAN, "Dice")]["mean"], stats[(trainer, MEAN, "HD95")]["mean"],
            stats[(trainer, MEAN, "Dice")]["p_wilcoxon"], seconds, prediction_seconds.get(trainer)))
    return results


def markdown_table(results: Sequence[TrainerResult]) -> str:
    classes = list(results[0].dice_per_class)
    base = results[0]
    header = ["trainer", *[f"Dice {c}" for c in classes], "mean Dice", "mean HD95 (mm)", "s / train iteration",
              "wall-time ratio to vanilla", "s / predicted case"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        ratio = (f"{r.seconds_per_iteration / base.seconds_per_iteration:.2f}"
                 if r.seconds_per_iteration and base.seconds_per_iteration else "n/a")
        cells = [r.trainer, *[f"{r.dice_per_class[c]:.3f}" for c in classes], f"**{r.mean_dice:.3f}**",
                 f"{r.mean_hd95:.2f}", f"{r.seconds_per_iteration:.2f}" if r.seconds_per_iteration else "n/a", ratio,
                 f"{r.seconds_per_case:.1f}" if r.seconds_per_case else "n/a"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _overlay(ax, image: np.ndarray, labels: Optional[np.ndarray], title: str, num_classes: int) -> None:
    import matplotlib.pyplot as plt
    ax.imshow(image, cmap="gray")
    if labels is not None:
        colours = plt.get_cmap("tab10")
        rgba = np.zeros((*labels.shape, 4))
        for c in range(1, num_classes + 1):
            rgba[labels == c] = (*colours(c - 1)[:3], 0.55)
        ax.imshow(rgba)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def write_report(paths, dataset: str, results: Sequence[TrainerResult], cases: Sequence[str]) -> Path:
    """Writes results.md / results.csv / results.png in the work folder; returns the .md path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    md_path = paths.workdir / "results.md"
    md_path.write_text(
        f"# nnunetv2-proto demo ({dataset}, 3d_cpu, fold 0, {len(cases)} validation cases)\n\n"
        f"{markdown_table(results)}\n\n"
        "Dice and HD95: `nnunetv2-proto compare` on the nnUNetv2_predict outputs (per-case details, paired tests "
        "and plots in comparison/). s / train iteration: median training-phase time per iteration "
        "(training_timing.json). The trainers ran one after another, so their wall-time ratio mixes machine drift "
        "with method cost; `nnunetv2-proto benchmark-heads` measures the cost in one interleaved run. "
        "s / predicted case: nnUNetv2_predict wall time divided by cases, model loading included. One run "
        "per trainer on 4 cases: this shows the pipeline, not which method is better.\n")
    classes = list(results[0].dice_per_class)
    with open(paths.workdir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trainer", *classes, "mean_dice", "mean_hd95_mm", "s_per_iteration", "s_per_case"])
        for r in results:
            writer.writerow([r.trainer, *[f"{r.dice_per_class[c]:.4f}" for c in classes], f"{r.mean_dice:.4f}",
                             f"{r.mean_hd95:.3f}", r.seconds_per_iteration, r.seconds_per_case])

    # the validation case and axial slice with the most foreground
    gt_arrays = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(paths.raw / dataset / "labelsTr" / f"{c}.nii.gz")))
                 for c in cases}
    case = max(cases, key=lambda c: (gt_arrays[c] > 0).sum())
    gt = gt_arrays[case]
    z = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1)))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(paths.validation_images / f"{case}_0000.nii.gz")))[z]
    panels = 2 + len(results)
    fig = plt.figure(figsize=(3.2 * panels, 7))
    grid = fig.add_gridspec(2, panels, height_ratios=[1.1, 1])
    _overlay(fig.add_subplot(grid[0, 0]), image, None, f"{case}, slice {z}", len(classes))
    _overlay(fig.add_subplot(grid[0, 1]), image, gt[z], "ground truth", len(classes))
    for i, r in enumerate(results):
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(paths.predictions(r.trainer) / f"{case}.nii.gz")))
        _overlay(fig.add_subplot(grid[0, 2 + i]), image, pred[z], f"{r.trainer}\nmean Dice {r.mean_dice:.3f}",
                 len(classes))
    bars = fig.add_subplot(grid[1, :])
    width = 0.8 / len(results)
    x = np.arange(len(classes) + 1)
    # trainers in shades of grey with hatching: the colours above belong to the classes
    shades = plt.get_cmap("Greys")(np.linspace(0.35, 0.85, len(results)))
    hatches = ["", "//", "..", "xx", "\\\\", "++", "oo", "--"]
    for i, r in enumerate(results):
        values = [r.dice_per_class[c] for c in classes] + [r.mean_dice]
        bars.bar(x + i * width - 0.4 + width / 2, values, width, label=r.trainer, color=shades[i],
                 hatch=hatches[i % len(hatches)], edgecolor="black", linewidth=0.5)
    bars.set_xticks(x, [*classes, "mean"])
    bars.set_ylabel("Dice (fold 0 validation)")
    bars.set_ylim(0, 1)
    bars.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(results), frameon=False)
    fig.tight_layout()
    fig.savefig(paths.workdir / "results.png", dpi=110)
    plt.close(fig)
    return md_path
