"""``nnunetv2-proto compare``: does a trainer beat the baseline on this dataset, with evidence?

Collects each trainer's cross-validation predictions (``fold_X/validation`` in
nnUNet_results, references from nnUNet_preprocessed/<dataset>/gt_segmentations) or
predictions on an external test set, evaluates them (``evaluate``), pairs cases with the
baseline's and reports per structure: mean +- std, the mean paired difference to the
baseline, Wilcoxon signed-rank and paired t-test p-values. Writes Markdown, CSV, JSON and
two figures (per-structure box plots, per-case scatter against the baseline).
Missing trainers or folds stop the comparison with a list of what is missing, unless
``allow_missing`` is set, in which case they are listed in every output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name
from nnunetv2_proto.evaluation.evaluate import evaluate_folders
from nnunetv2_proto.evaluation.metrics import METRICS

MEAN = "mean of structures"  # the per-case average over structures
CACHE_NAME = "nnunetv2_proto_metrics.json"


@dataclass
class Source:
    trainer: str
    fold: Optional[int]
    predictions: Path
    references: Path


@dataclass
class TrainerScores:
    trainer: str
    # metric -> structure (incl. MEAN) -> case -> value
    values: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)


def paired_tests(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    """(Wilcoxon signed-rank p, paired t-test p) for x vs y; 1.0 for identical samples, nan below 2 pairs."""
    from scipy import stats
    diff = np.asarray(x, float) - np.asarray(y, float)
    if len(diff) < 2:
        return float("nan"), float("nan")
    if np.allclose(diff, 0):
        return 1.0, 1.0
    wilcoxon = float(stats.wilcoxon(x, y).pvalue)
    t_test = 0.0 if np.std(diff) == 0 else float(stats.ttest_rel(x, y).pvalue)
    return wilcoxon, t_test


def find_sources(dataset: str, configuration: str, trainers: Sequence[str], plans: str, folds: Sequence[int],
                 test_gt: Optional[Path], test_pred_root: Optional[Path]) -> Tuple[List[Source], List[str]]:
    sources, missing = [], []
    if test_gt is not None:
        for trainer in trainers:
            folder = Path(test_pred_root) / trainer
            if folder.is_dir() and any(folder.iterdir()):
                sources.append(Source(trainer, None, folder, Path(test_gt)))
            else:
                missing.append(f"{trainer}: no test predictions in {folder}")
        return sources, missing
    folders = require_nnunet_folders(("nnUNet_preprocessed", "nnUNet_results"))
    references = folders["nnUNet_preprocessed"] / dataset / "gt_segmentations"
    if not references.is_dir():
        raise SetupError(f"{references} does not exist", f"preprocess {dataset} with nnU-Net first")
    for trainer in trainers:
        base = folders["nnUNet_results"] / dataset / f"{trainer}__{plans}__{configuration}"
        if not base.is_dir():
            missing.append(f"{trainer}: no results folder {base}")
            continue
        for fold in folds:
            validation = base / f"fold_{fold}" / "validation"
            if (validation / "summary.json").is_file():
                sources.append(Source(trainer, fold, validation, references))
            else:
                missing.append(f"{trainer}: fold {fold} has no finished validation ({validation})")
    return sources, missing


def _evaluate_cached(source: Source, dataset_json_file: Optional[Path], num_processes: int) -> dict:
    cache = source.predictions / CACHE_NAME
    newest = max(p.stat().st_mtime for p in source.predictions.iterdir() if p.name != CACHE_NAME)
    if cache.is_file() and cache.stat().st_mtime >= newest:
        return json.loads(cache.read_text())
    return evaluate_folders(source.references, source.predictions, dataset_json_file, cache, num_processes)


def collect_scores(sources: Sequence[Source], dataset_json_file: Optional[Path], num_processes: int,
                   progress=print) -> Tuple[Dict[str, TrainerScores], List[str]]:
    scores: Dict[str, TrainerScores] = {}
    structures: List[str] = []
    for index, source in enumerate(sources, start=1):
        progress(f"  evaluating {source.trainer}" + (f" fold {source.fold}" if source.fold is not None else "")
                 + f" ({index}/{len(sources)})")
        result = _evaluate_cached(source, dataset_json_file, num_processes)
        structures = list(result["structures"])
        entry = scores.setdefault(source.trainer, TrainerScores(source.trainer))
        for case in result["metric_per_case"]:
            for metric in METRICS:
                per_structure = {s: case["metrics"][s][metric] for s in structures}
                for s, v in {**per_structure, MEAN: float(np.mean(list(per_structure.values())))}.items():
                    entry.values.setdefault(metric, {}).setdefault(s, {})[case["case"]] = float(v)
    return scores, structures


def statistics(scores: Dict[str, TrainerScores], structures: Sequence[str], baseline: str) -> List[dict]:
    rows = []
    base = scores[baseline]
    for trainer, entry in scores.items():
        for structure in [*structures, MEAN]:
            for metric in METRICS:
                ours = entry.values[metric][structure]
                theirs = base.values[metric][structure]
                paired = sorted(set(ours) & set(theirs))
                x = np.array([ours[c] for c in paired])
                y = np.array([theirs[c] for c in paired])
                p_w, p_t = paired_tests(x, y) if trainer != baseline else (float("nan"), float("nan"))
                values = np.array(list(ours.values()))
                rows.append({"trainer": trainer, "structure": structure, "metric": metric, "n": len(values),
                             "mean": float(values.mean()), "std": float(values.std()), "n_paired": len(paired),
                             "diff_vs_baseline": float((x - y).mean()) if len(paired) else float("nan"),
                             "p_wilcoxon": p_w, "p_ttest": p_t})
    return rows


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def markdown_report(rows: Sequence[dict], structures: Sequence[str], baseline: str, title: str,
                    missing: Sequence[str]) -> str:
    def get(trainer, structure, metric):
        return next(r for r in rows if r["trainer"] == trainer and r["structure"] == structure and r["metric"] == metric)

    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    header = ["trainer", *[f"Dice {s}" for s in structures], "Dice mean", "HD95 mean (mm)", "ASD mean (mm)",
              "dDice vs baseline", "p (Wilcoxon)", "p (t-test)"]
    lines = [f"# {title}", "", f"Baseline: `{baseline}`. Values: mean +- std over cases; p-values: paired tests of "
             "the per-case mean Dice against the baseline.", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for t in trainers:
        dice = [get(t, s, "Dice") for s in structures]
        mean = get(t, MEAN, "Dice")
        cells = [f"`{t}`", *[f"{d['mean']:.3f} +- {d['std']:.3f}" for d in dice], f"**{mean['mean']:.3f}**",
                 f"{get(t, MEAN, 'HD95')['mean']:.2f}", f"{get(t, MEAN, 'ASD')['mean']:.2f}",
                 "-" if t == baseline else f"{mean['diff_vs_baseline']:+.3f}", _fmt_p(mean["p_wilcoxon"]),
                 _fmt_p(mean["p_ttest"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per structure and metric (difference = trainer - baseline, paired by case):", "",
              "| trainer | structure | metric | mean +- std | diff | p (Wilcoxon) | p (t-test) | n |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["trainer"] == baseline:
            continue
        lines.append(f"| `{r['trainer']}` | {r['structure']} | {r['metric']} | {r['mean']:.3f} +- {r['std']:.3f} | "
                     f"{r['diff_vs_baseline']:+.3f} | {_fmt_p(r['p_wilcoxon'])} | {_fmt_p(r['p_ttest'])} | "
                     f"{r['n_paired']} |")
    if missing:
        lines += ["", "**Missing (not compared):**", *[f"- {m}" for m in missing]]
    return "\n".join(lines) + "\n"


def short_name(trainer: str) -> str:
    """nnUNetTrainerSIPL_cpuBudget -> SIPL_cpuBudget; nnUNetTrainer_cpuBudget -> vanilla_cpuBudget."""
    rest = trainer[len("nnUNetTrainer"):] if trainer.startswith("nnUNetTrainer") else trainer
    return "vanilla" + rest if not rest or rest.startswith("_") else rest


def plot_comparison(scores: Dict[str, TrainerScores], structures: Sequence[str], baseline: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trainers = list(scores)
    fig, axes = plt.subplots(2, len(structures) + 1, figsize=(3.2 * (len(structures) + 1), 6.5), squeeze=False)
    for row, metric in enumerate(("Dice", "HD95")):
        for col, structure in enumerate([*structures, MEAN]):
            ax = axes[row][col]
            ax.boxplot([list(scores[t].values[metric][structure].values()) for t in trainers], showmeans=True)
            ax.set_xticks(range(1, len(trainers) + 1), [short_name(t) for t in trainers], rotation=35, ha="right",
                          fontsize=7)
            ax.set_title(f"{metric}: {structure}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "comparison_boxplots.png", dpi=110)
    plt.close(fig)

    others = [t for t in trainers if t != baseline]
    if not others:
        return
    fig, axes = plt.subplots(1, len(others), figsize=(3.6 * len(others), 3.6), squeeze=False)
    base = scores[baseline].values["Dice"][MEAN]
    for ax, trainer in zip(axes[0], others):
        ours = scores[trainer].values["Dice"][MEAN]
        cases = sorted(set(ours) & set(base))
        ax.scatter([base[c] for c in cases], [ours[c] for c in cases], s=14)
        low = min([base[c] for c in cases] + [ours[c] for c in cases] + [1.0])
        ax.plot([low, 1], [low, 1], "k--", linewidth=0.8)
        ax.set_xlabel(f"{baseline} (mean Dice per case)", fontsize=8)
        ax.set_ylabel(trainer, fontsize=8)
        ax.set_title("above the line: better than baseline", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "comparison_scatter.png", dpi=110)
    plt.close(fig)


def compare(dataset: str, configuration: str, trainers: Sequence[str], plans: str = "nnUNetPlans",
            folds: Sequence[int] = (0, 1, 2, 3, 4), baseline: Optional[str] = None, output: Optional[Path] = None,
            test_gt: Optional[Path] = None, test_pred_root: Optional[Path] = None, allow_missing: bool = False,
            num_processes: int = 2, dataset_json: Optional[Path] = None, progress=print) -> Path:
    """Run the comparison; returns the output folder.

    ``dataset_json`` names the structures (and regions / ignore label); by default the
    preprocessed dataset's for cross-validation, the raw dataset's (if found) for a test set.
    """
    if (test_gt is None) != (test_pred_root is None):
        raise SetupError("--test-gt and --test-pred-root go together", "pass both, or neither for cross-validation")
    try:
        dataset_name = resolve_dataset_name(dataset)
    except SetupError:
        if test_gt is None:
            raise
        dataset_name = dataset  # a test set needs no nnU-Net folders; the name only labels the report
    baseline = baseline or ("nnUNetTrainer" if "nnUNetTrainer" in trainers else trainers[0])
    if baseline not in trainers:
        trainers = [baseline, *trainers]
    sources, missing = find_sources(dataset_name, configuration, trainers, plans, folds, test_gt, test_pred_root)
    if missing and not allow_missing:
        raise SetupError("some requested results do not exist:\n    " + "\n    ".join(missing),
                         "train/validate them (nnUNetv2_train ...), restrict -f/-tr, or pass --allow-missing")
    present = {s.trainer for s in sources}
    if baseline not in present:
        raise SetupError(f"the baseline {baseline} has no results to compare against", "train it or pick --baseline")
    if dataset_json is None:
        base = os.environ.get("nnUNet_preprocessed" if test_gt is None else "nnUNet_raw")
        candidate = Path(base) / dataset_name / "dataset.json" if base else None
        dataset_json = candidate if candidate is not None and candidate.is_file() else None
    scores, structures = collect_scores(sources, dataset_json, num_processes, progress)
    rows = statistics(scores, structures, baseline)
    out = Path(output) if output else Path(f"comparison_{dataset_name}_{configuration}")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{dataset_name}, {configuration}, " + ("test set" if test_gt else f"folds {list(folds)}")
    (out / "comparison.md").write_text(markdown_report(rows, structures, baseline, title, missing))
    with open(out / "comparison.csv", "w") as f:
        keys = list(rows[0])
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r[k]) for k in keys) + "\n")
    (out / "comparison.json").write_text(json.dumps({
        "dataset": dataset_name, "configuration": configuration, "baseline": baseline, "folds": list(folds),
        "structures": structures, "missing": missing, "statistics": rows,
        "per_case": {t: s.values for t, s in scores.items()}}, indent=2))
    plot_comparison(scores, structures, baseline, out)
    return out
