"""``nnunetv2-proto compare``: does a trainer beat the baseline on this dataset, with evidence?

Collects each trainer's runs (cross-validation folds in nnUNet_results, optionally several
seeds per trainer, or predictions on an external test set), evaluates them (``evaluate``, with
its input checks), restricts every trainer to the runs and cases all of them have (saying what
was dropped), and reports per run (run means, between-run spread, paired run differences with
a confidence interval and a verdict) and per case (mean +- std, paired differences, Wilcoxon
and t-test). Writes Markdown, CSV, JSON and figures. Missing trainers, folds, seeds or
predictions stop the comparison with a list of what is missing, unless ``allow_missing``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from nnunetv2_proto.environment import SetupError, resolve_dataset_name
from nnunetv2_proto.evaluation.evaluate import EvaluationPolicy
from nnunetv2_proto.evaluation.learning_curves import (TrainingCurve, curve_report, curve_rows,
                                                       plot_training_curves, read_training_curve)
from nnunetv2_proto.evaluation.metrics import METRICS
from nnunetv2_proto.evaluation.paired_stats import CommonGround, case_statistics, common_ground, run_statistics
from nnunetv2_proto.evaluation.report import markdown_report, plot_comparison, short_name, write_csv, write_json
from nnunetv2_proto.evaluation.runs import MEAN, RunSource, earlier_runs, find_runs, run_label, score_runs


def _prepare_output(output: Path) -> Path:
    if output.exists() and not output.is_dir():
        raise SetupError(f"--out {output} exists and is not a folder", "give a folder for the comparison's files")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SetupError(f"cannot create --out {output} ({error.strerror})", "choose a writable folder") from None
    if not os.access(output, os.W_OK):
        raise SetupError(f"--out {output} is not writable", "choose a writable folder")
    return output


def compare(dataset: str, configuration: str, trainers: Sequence[str], plans: str = "nnUNetPlans",
            folds: Sequence[int] = (0, 1, 2, 3, 4), baseline: Optional[str] = None, output: Optional[Path] = None,
            test_gt: Optional[Path] = None, test_pred_root: Optional[Path] = None, allow_missing: bool = False,
            num_processes: int = 2, dataset_json: Optional[Path] = None, progress=print,
            seeds: Sequence[int] = (), policy: Optional[EvaluationPolicy] = None,
            earlier: Sequence[Path] = ()) -> Path:
    """Run the comparison; returns the output folder.

    ``seeds``: compare the runs ``<trainer>_seed<N>`` for each N (every trainer, every fold).
    ``dataset_json`` names the structures (and regions / ignore label); by default the
    preprocessed dataset's for cross-validation, the raw dataset's (if found) for a test set.
    ``earlier``: comparison.json files of earlier comparisons whose requested runs take part with their stored
    per-case scores (a run whose predictions are gone); they count as the runs they were, paired by fold and seed.
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
    out = _prepare_output(Path(output) if output else Path(f"comparison_{dataset_name}_{configuration}"))
    stored, stored_curves = earlier_runs(earlier, dataset_name, configuration, trainers, folds, seeds,
                                         test_gt is not None)
    runs, missing = find_runs(dataset_name, configuration, trainers, plans, folds, seeds, test_gt, test_pred_root,
                              [(run.source.trainer, run.source.key) for run in stored])
    if missing and not allow_missing:
        raise SetupError("some requested results do not exist:\n    " + "\n    ".join(missing),
                         "train/validate them (nnUNetv2_train ...), restrict -f/-tr/--seeds, or pass --allow-missing")
    if baseline not in {r.trainer for r in runs} | {r.source.trainer for r in stored}:
        raise SetupError(f"the baseline {baseline} has no results to compare against", "train it or pick --baseline")
    if dataset_json is None:
        base = os.environ.get("nnUNet_preprocessed" if test_gt is None else "nnUNet_raw")
        candidate = Path(base) / dataset_name / "dataset.json" if base else None
        dataset_json = candidate if candidate is not None and candidate.is_file() else None
    if policy is None:
        policy = EvaluationPolicy(allow_missing=allow_missing)
    scored, structures, unscored = score_runs(runs, dataset_json, policy, num_processes, progress)
    for run in stored:
        stored_structures = [s for s in run.values["Dice"] if s != MEAN]
        if scored and set(stored_structures) != set(structures):
            raise SetupError(f"{run.source.predictions} scores the structures {stored_structures}, the runs found now "
                             f"{structures}", "compare with the same dataset.json (--dataset-json) as the earlier run")
        structures = structures or stored_structures
    scored = [*scored, *stored]
    missing = [*missing, *(f"{run}: no prediction for {len(cases)} case(s) {cases[:5]}"
                           for run, cases in unscored.items())]
    ground = common_ground(scored, list(dict.fromkeys(trainers)))
    if not ground.cases:
        raise SetupError("the trainers have no run (fold and seed) and case in common",
                         "compare runs trained on the same folds and seeds")
    case_rows = case_statistics(ground, structures, baseline)
    run_rows = run_statistics(ground, structures, baseline)
    where = "test set" if test_gt else f"folds {list(folds)}" + (f", seeds {list(seeds)}" if seeds else "")
    title = f"{dataset_name}, {configuration}, {where}"
    curves, without_log = _training_curves(runs, ground)
    compared_runs = [(t.trainer, run_label(key)) for t in ground.trainers for key in ground.run_keys]
    order = {run: index for index, run in enumerate(compared_runs)}
    training_rows = sorted([*curve_rows(curves), *(row for row in stored_curves if (row["trainer"], row["run"]) in order)],
                           key=lambda row: order[row["trainer"], row["run"]])
    stored_compared = [run.source for run in stored if (run.source.trainer, run.source.label) in order]
    stored_lines = [f"`{source.trainer}` {source.label}: {source.predictions}" for source in stored_compared]
    (out / "comparison.md").write_text(markdown_report(case_rows, run_rows, ground, structures, baseline, title,
                                                       missing, curve_report(training_rows, baseline, without_log),
                                                       stored_lines))
    write_csv(out / "comparison.csv", case_rows)
    write_csv(out / "comparison_runs.csv", run_rows)
    write_json(out / "comparison.json", {
        "dataset": dataset_name, "configuration": configuration, "baseline": baseline, "folds": list(folds),
        "seeds": list(seeds), "structures": structures, "missing": missing, "dropped": ground.dropped,
        "runs": [run_label(k) for k in ground.run_keys], "cases": ground.cases, "run_statistics": run_rows,
        "earlier_runs": [{"trainer": s.trainer, "run": s.label, "comparison": str(s.predictions)}
                         for s in stored_compared],
        "training_curves": training_rows, "statistics": case_rows,
        "per_case": {t.trainer: {m: {s: dict(zip(ground.cases, t.per_case(m, s, ground.cases).tolist()))
                                     for s in [*structures, MEAN]} for m in METRICS}
                     for t in ground.trainers},
        # each run's own per-case scores, so that a later compare --earlier can stand in any one of them
        "per_run": {t.trainer: {run_label(key): {m: {s: {c: run.values[m][s][c] for c in ground.cases
                                                         if c in run.values[m][s]}
                                                     for s in [*structures, MEAN]} for m in METRICS}
                                for key, run in t.runs.items()}
                    for t in ground.trainers}})
    plot_comparison(ground, run_rows, structures, baseline, out)
    if curves:
        plot_training_curves(curves, {t: short_name(t) for t in curves}, out / "comparison_curves.png")
    return out


def _training_curves(runs: Sequence[RunSource], ground: CommonGround
                     ) -> Tuple[Dict[str, Dict[str, TrainingCurve]], List[str]]:
    """trainer -> run label -> training curve for the compared cross-validation runs, and the runs whose
    checkpoint gave none."""
    compared = {(t.trainer, key) for t in ground.trainers for key in ground.run_keys}
    curves: Dict[str, Dict[str, TrainingCurve]] = {}
    without_log: List[str] = []
    for run in runs:
        if run.fold is None or run.from_earlier_comparison or (run.trainer, run.key) not in compared:
            continue  # an external test set's predictions carry no training log; a stored run brings its rows
        curve = read_training_curve(run.predictions.parent)
        if curve is None:
            without_log.append(f"`{run.trainer}` {run.label}")
        else:
            curves.setdefault(run.trainer, {})[run.label] = curve
    return curves, without_log
