"""Paired statistics of a comparison: per case (inside the runs) and per run (between runs).

Per case: each trainer's per-case values (averaged over its seeds when a case was predicted
by several), paired with the baseline's on the cases both have. This says how consistent one
set of trained networks is across cases, not whether the method is better.

Per run: each run's mean over its cases, paired with the baseline's run of the same fold and
seed. Training itself (initialisation, patch sampling, augmentation) moves a result by as much
as most method effects, so the run is the unit of evidence for a method claim: the mean of
the paired run differences, its 95% confidence interval, a paired t-test over runs, and the
smallest difference that this number of runs would detect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunetv2_proto.evaluation.metrics import METRICS
from nnunetv2_proto.evaluation.runs import MEAN, RunKey, RunScores, run_label

WITHIN_SPREAD = "within run-to-run spread"
ONE_RUN = "one run each: cannot be told from run-to-run noise"


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


@dataclass
class TrainerRuns:
    """One trainer's runs, restricted to the runs and cases every compared trainer has."""

    trainer: str
    runs: Dict[RunKey, RunScores]

    def per_case(self, metric: str, structure: str, cases: Sequence[str]) -> np.ndarray:
        """Per-case values, averaged over the runs that predicted the case."""
        values = []
        for case in cases:
            found = [r.values[metric][structure][case] for r in self.runs.values()
                     if case in r.values[metric][structure]]
            values.append(float(np.mean(found)))
        return np.array(values)

    def run_means(self, metric: str, structure: str, keys: Sequence[RunKey], cases: Sequence[str]) -> np.ndarray:
        chosen = set(cases)
        return np.array([np.mean([v for c, v in self.runs[k].values[metric][structure].items() if c in chosen])
                         for k in keys])


def group_runs(scored: Sequence[RunScores]) -> Dict[str, Dict[RunKey, RunScores]]:
    grouped: Dict[str, Dict[RunKey, RunScores]] = {}
    for run in scored:
        grouped.setdefault(run.source.trainer, {})[run.source.key] = run
    return grouped


@dataclass
class CommonGround:
    """The runs and cases every trainer has, and what each trainer lost to make it so."""

    trainers: List[TrainerRuns]
    run_keys: List[RunKey]
    cases: List[str]
    dropped: Dict[str, dict]


def _run_order(key: RunKey) -> Tuple[int, int]:
    return tuple(-1 if part is None else part for part in key)


def common_ground(scored: Sequence[RunScores], order: Sequence[str]) -> CommonGround:
    grouped = group_runs(scored)
    present = [t for t in order if t in grouped]
    keys = sorted(set.intersection(*(set(grouped[t]) for t in present)), key=_run_order)
    case_sets = {t: set().union(*(set(grouped[t][k].values["Dice"][MEAN]) for k in keys)) if keys else set()
                 for t in present}
    cases = sorted(set.intersection(*case_sets.values())) if case_sets else []
    dropped = {}
    for t in present:
        lost_runs = sorted(set(grouped[t]) - set(keys), key=_run_order)
        all_cases = set().union(*(set(r.values["Dice"][MEAN]) for r in grouped[t].values()))
        lost_cases = sorted(all_cases - set(cases))
        if lost_runs or lost_cases:
            dropped[t] = {"runs": [run_label(k) for k in lost_runs], "cases": lost_cases}
    return CommonGround([TrainerRuns(t, {k: grouped[t][k] for k in keys}) for t in present], keys, cases, dropped)


def case_statistics(ground: CommonGround, structures: Sequence[str], baseline: str) -> List[dict]:
    """One row per trainer, structure and metric: mean +- std over cases, paired difference and p-values."""
    rows = []
    base = next(t for t in ground.trainers if t.trainer == baseline)
    for entry in ground.trainers:
        for structure in [*structures, MEAN]:
            for metric in METRICS:
                ours = entry.per_case(metric, structure, ground.cases)
                theirs = base.per_case(metric, structure, ground.cases)
                p_w, p_t = paired_tests(ours, theirs) if entry is not base else (float("nan"), float("nan"))
                rows.append({"trainer": entry.trainer, "structure": structure, "metric": metric, "n": len(ours),
                             "mean": float(ours.mean()) if len(ours) else float("nan"),
                             "std": float(ours.std()) if len(ours) else float("nan"), "n_paired": len(ours),
                             "diff_vs_baseline": float((ours - theirs).mean()) if len(ours) else float("nan"),
                             "p_wilcoxon": p_w, "p_ttest": p_t})
    return rows


def minimal_detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean paired difference a two-sided paired t-test over n runs finds with this power."""
    from scipy import stats
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / np.sqrt(n))


def run_statistics(ground: CommonGround, structures: Sequence[str], baseline: str,
                   metric: str = "Dice") -> List[dict]:
    """One row per trainer and structure: run means, between-run SD, paired run differences and a verdict."""
    from scipy import stats
    rows = []
    base = next(t for t in ground.trainers if t.trainer == baseline)
    n = len(ground.run_keys)
    for entry in ground.trainers:
        for structure in [*structures, MEAN]:
            ours = entry.run_means(metric, structure, ground.run_keys, ground.cases)
            theirs = base.run_means(metric, structure, ground.run_keys, ground.cases)
            diff = ours - theirs
            row = {"trainer": entry.trainer, "structure": structure, "metric": metric, "n_runs": n,
                   "runs": {run_label(k): float(v) for k, v in zip(ground.run_keys, ours)},
                   "run_mean": float(ours.mean()) if n else float("nan"),
                   "between_run_sd": float(ours.std(ddof=1)) if n > 1 else float("nan"),
                   "diff_vs_baseline": float(diff.mean()) if n else float("nan"),
                   "diff_sd": float(diff.std(ddof=1)) if n > 1 else float("nan"),
                   "ci95_low": float("nan"), "ci95_high": float("nan"), "p_ttest_runs": float("nan"),
                   "minimal_detectable_difference": float("nan"), "runs_better": int((diff > 0).sum()),
                   "verdict": ""}
            if entry is not base:
                if n < 2:
                    row["verdict"] = ONE_RUN
                elif np.allclose(diff, diff[0]):  # no spread in the differences: the t-test is undefined
                    row["verdict"] = WITHIN_SPREAD if np.isclose(diff[0], 0) else (
                        "better" if diff[0] > 0 else "worse")
                    row["ci95_low"] = row["ci95_high"] = float(diff[0])
                else:
                    half = float(stats.t.ppf(0.975, n - 1) * row["diff_sd"] / np.sqrt(n))
                    row["ci95_low"], row["ci95_high"] = row["diff_vs_baseline"] - half, row["diff_vs_baseline"] + half
                    row["p_ttest_runs"] = float(stats.ttest_rel(ours, theirs).pvalue)
                    row["minimal_detectable_difference"] = minimal_detectable_difference(row["diff_sd"], n)
                    higher_is_better = metric in ("Dice", "IoU")
                    if row["ci95_low"] <= 0 <= row["ci95_high"]:
                        row["verdict"] = WITHIN_SPREAD
                    else:
                        row["verdict"] = "better" if (row["diff_vs_baseline"] > 0) == higher_is_better else "worse"
            rows.append(row)
    return rows
