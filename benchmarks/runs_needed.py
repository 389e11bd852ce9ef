"""How many runs (seeds or folds) a claim needs, from a ``compare`` output with several runs per trainer.

Reads comparison.json, takes the baseline's between-run standard deviation of mean Dice (and,
for each other trainer, the observed SD of the paired run differences), and prints the
smallest true difference a two-sided paired t-test over n runs detects with 80% power at
alpha 0.05, for several n. Two independent runs of a trainer differ with SD sqrt(2) x the
between-run SD, which is the paired-difference SD to expect when a method and the baseline are
not correlated run by run.

    python benchmarks/runs_needed.py docs/results/la_3d_cpu_seeds/comparison.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nnunetv2_proto.evaluation.paired_stats import minimal_detectable_difference
from nnunetv2_proto.evaluation.runs import MEAN

RUN_COUNTS = (2, 3, 5, 10, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="comparison.json written by nnunetv2-proto compare")
    args = parser.parse_args()
    report = json.loads(args.comparison.read_text())
    rows = {r["trainer"]: r for r in report["run_statistics"] if r["structure"] == MEAN}
    baseline = rows[report["baseline"]]
    spread = baseline["between_run_sd"]
    print(f"{report['dataset']} {report['configuration']}: baseline {report['baseline']}, "
          f"{baseline['n_runs']} runs, mean Dice {baseline['run_mean']:.4f}, between-run SD {spread:.4f}")
    sources = [("independent runs (sqrt(2) x baseline SD)", math.sqrt(2) * spread)]
    sources += [(f"observed: {t}", r["diff_sd"]) for t, r in rows.items()
                if t != report["baseline"] and r["diff_sd"] is not None]
    print("| paired-difference SD from | SD | " + " | ".join(f"n = {n}" for n in RUN_COUNTS) + " |")
    print("|---|---|" + "---|" * len(RUN_COUNTS))
    for label, sd in sources:
        cells = [f"{minimal_detectable_difference(sd, n):.4f}" for n in RUN_COUNTS]
        print(f"| {label} | {sd:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
