"""A comparison's outputs: Markdown, CSV, JSON (standard JSON: null where a value is undefined) and figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from nnunetv2_proto.evaluation.paired_stats import CommonGround, ONE_RUN
from nnunetv2_proto.evaluation.runs import MEAN, run_label


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: Python's json writes bare NaN, which other tools refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(json_safe(content), indent=2, allow_nan=False))


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def fmt_p(p: float) -> str:
    return "n/a" if p is None or np.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if value is None or np.isnan(value) else format(value, spec)


def _row(rows: Sequence[dict], trainer: str, structure: str, metric: str) -> dict:
    return next(r for r in rows if r["trainer"] == trainer and r["structure"] == structure and r["metric"] == metric)


def run_table(run_rows: Sequence[dict], baseline: str) -> List[str]:
    lines = ["| trainer | runs | mean Dice over runs | between-run SD | dDice vs baseline (95% CI) | "
             "p (paired t, runs) | runs better | detectable dDice (80% power) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in run_rows if r["structure"] == MEAN):
        if r["trainer"] == baseline:
            cells = [f"`{r['trainer']}`", str(r["n_runs"]), f"**{_fmt(r['run_mean'])}**", _fmt(r["between_run_sd"]),
                     "-", "-", "-", "-", "baseline"]
        else:
            ci = "" if np.isnan(r["ci95_low"]) else f" ({r['ci95_low']:+.3f} .. {r['ci95_high']:+.3f})"
            cells = [f"`{r['trainer']}`", str(r["n_runs"]), f"**{_fmt(r['run_mean'])}**", _fmt(r["between_run_sd"]),
                     f"{r['diff_vs_baseline']:+.3f}{ci}", fmt_p(r["p_ttest_runs"]),
                     f"{r['runs_better']}/{r['n_runs']}", _fmt(r["minimal_detectable_difference"]), r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(case_rows: Sequence[dict], run_rows: Sequence[dict], ground: CommonGround,
                    structures: Sequence[str], baseline: str, title: str, missing: Sequence[str],
                    training_curve_lines: Sequence[str] = (), stored_runs: Sequence[str] = ()) -> str:
    """``stored_runs``: one line per run that took part with the per-case scores of an earlier comparison."""
    trainers = [t.trainer for t in ground.trainers]
    runs = ", ".join(run_label(k) for k in ground.run_keys)
    lines = [f"# {title}", "", f"Baseline: `{baseline}`. Runs per trainer: {len(ground.run_keys)} ({runs}); "
             f"{len(ground.cases)} cases, the same for every trainer.", "",
             *(["Runs that take part with the stored per-case scores of an earlier comparison (their predictions "
                "were not scored again):", *[f"- {line}" for line in stored_runs], ""] if stored_runs else []),
             "## Per run (the unit of evidence for a method claim)", "",
             "Each run's mean Dice over its cases, paired with the baseline's run of the same fold and seed.", "",
             *run_table(run_rows, baseline), ""]
    verdicts = {r["verdict"] for r in run_rows if r["structure"] == MEAN and r["trainer"] != baseline}
    if ONE_RUN in verdicts:
        lines += ["**One run per trainer.** Training from a different seed moves mean Dice by a few hundredths at "
                  "CPU budgets; train seeds (`<Trainer>_seed<N>`) or folds and pass them (`--seeds`, `-f`) before "
                  "reading the differences below as method effects.", ""]
    lines += [*training_curve_lines, "## Per case (inside the runs)", "",
              "Values: mean +- std over cases (a case predicted by several seeds counts with its mean over them); "
              "p-values: paired tests of the per-case mean Dice against the baseline. These say how consistent "
              "the trained networks are across cases, not whether the method is better.", ""]
    header = ["trainer", *[f"Dice {s}" for s in structures], "Dice mean", "HD95 mean (mm)", "ASD mean (mm)",
              "dDice vs baseline", "p (Wilcoxon)", "p (t-test)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trainers:
        dice = [_row(case_rows, t, s, "Dice") for s in structures]
        mean = _row(case_rows, t, MEAN, "Dice")
        cells = [f"`{t}`", *[f"{d['mean']:.3f} +- {d['std']:.3f}" for d in dice], f"**{mean['mean']:.3f}**",
                 f"{_row(case_rows, t, MEAN, 'HD95')['mean']:.2f}", f"{_row(case_rows, t, MEAN, 'ASD')['mean']:.2f}",
                 "-" if t == baseline else f"{mean['diff_vs_baseline']:+.3f}", fmt_p(mean["p_wilcoxon"]),
                 fmt_p(mean["p_ttest"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per structure and metric (difference = trainer - baseline, paired by case):", "",
              "| trainer | structure | metric | mean +- std | diff | p (Wilcoxon) | p (t-test) | n |",
              "|---|---|---|---|---|---|---|---|"]
    for r in case_rows:
        if r["trainer"] != baseline:
            lines.append(f"| `{r['trainer']}` | {r['structure']} | {r['metric']} | {r['mean']:.3f} +- {r['std']:.3f}"
                         f" | {r['diff_vs_baseline']:+.3f} | {fmt_p(r['p_wilcoxon'])} | {fmt_p(r['p_ttest'])} | "
                         f"{r['n_paired']} |")
    if ground.dropped:
        lines += ["", "**Left out so that every trainer is compared on the same runs and cases:**"]
        for trainer, lost in ground.dropped.items():
            parts = ([f"runs {', '.join(lost['runs'])}"] if lost["runs"] else []) + \
                    ([f"{len(lost['cases'])} case(s) {lost['cases'][:5]}"] if lost["cases"] else [])
            lines.append(f"- `{trainer}`: " + "; ".join(parts))
    if missing:
        lines += ["", "**Missing (not compared):**", *[f"- {m}" for m in missing]]
    return "\n".join(lines) + "\n"


def short_name(trainer: str) -> str:
    """nnUNetTrainerSIPL_cpuBudget -> SIPL_cpuBudget; nnUNetTrainer_cpuBudget -> vanilla_cpuBudget."""
    rest = trainer[len("nnUNetTrainer"):] if trainer.startswith("nnUNetTrainer") else trainer
    return "vanilla" + rest if not rest or rest.startswith("_") else rest


def plot_comparison(ground: CommonGround, run_rows: Sequence[dict], structures: Sequence[str], baseline: str,
                    out: Path) -> Dict[str, Path]:
    """Box plots over cases, per-case scatter against the baseline, and the runs themselves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written: Dict[str, Path] = {}
    trainers = [t.trainer for t in ground.trainers]
    names = [short_name(t) for t in trainers]
    fig, axes = plt.subplots(2, len(structures) + 1, figsize=(3.2 * (len(structures) + 1), 6.5), squeeze=False)
    for row, metric in enumerate(("Dice", "HD95")):
        for col, structure in enumerate([*structures, MEAN]):
            ax = axes[row][col]
            ax.boxplot([t.per_case(metric, structure, ground.cases) for t in ground.trainers], showmeans=True)
            ax.set_xticks(range(1, len(trainers) + 1), names, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{metric}: {structure}", fontsize=9)
    fig.tight_layout()
    written["boxplots"] = out / "comparison_boxplots.png"
    fig.savefig(written["boxplots"], dpi=110)
    plt.close(fig)

    base = next(t for t in ground.trainers if t.trainer == baseline)
    others = [t for t in ground.trainers if t is not base]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(3.6 * len(others), 3.6), squeeze=False)
        x = base.per_case("Dice", MEAN, ground.cases)
        for ax, entry in zip(axes[0], others):
            y = entry.per_case("Dice", MEAN, ground.cases)
            ax.scatter(x, y, s=14)
            low = float(min(np.min(x, initial=1.0), np.min(y, initial=1.0)))
            ax.plot([low, 1], [low, 1], "k--", linewidth=0.8)
            ax.set_xlabel(f"{short_name(baseline)} (mean Dice per case)", fontsize=8)
            ax.set_ylabel(short_name(entry.trainer), fontsize=8)
            ax.set_title("above the line: better than baseline", fontsize=8)
        fig.tight_layout()
        written["scatter"] = out / "comparison_scatter.png"
        fig.savefig(written["scatter"], dpi=110)
        plt.close(fig)

    # the runs: one line per run (fold/seed) across trainers, so pairing and spread are visible
    fig, ax = plt.subplots(figsize=(1.6 * len(trainers) + 2.5, 4))
    means = {r["trainer"]: r for r in run_rows if r["structure"] == MEAN}
    colours = plt.get_cmap("tab10")
    for index, key in enumerate(ground.run_keys):
        values = [means[t]["runs"][run_label(key)] for t in trainers]
        ax.plot(range(len(trainers)), values, "o-", color=colours(index % 10), alpha=0.8, label=run_label(key))
    for position, trainer in enumerate(trainers):
        row = means[trainer]
        spread = row["between_run_sd"] if row["between_run_sd"] is not None and np.isfinite(row["between_run_sd"]) \
            else 0.0
        ax.errorbar([position + 0.15], [row["run_mean"]], yerr=[spread], fmt="s", color="black", capsize=4)
    ax.set_xticks(range(len(trainers)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("mean Dice of the run")
    ax.set_title("runs (coloured, paired by fold/seed); black: mean +- between-run SD", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    written["runs"] = out / "comparison_runs.png"
    fig.savefig(written["runs"], dpi=110)
    plt.close(fig)
    return written
