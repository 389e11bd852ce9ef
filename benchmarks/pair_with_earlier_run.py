"""Per-case paired comparison of a new run with a run known only from an earlier ``compare`` output.

Used for runs whose predictions were lost with a machine before ``run_archive.py`` existed
(docs/benchmarks.md, "Runs trained over several sessions"): the earlier comparison's
``comparison.json`` keeps per-case scores for each trainer, which are one run's scores when that
comparison held one run of the trainer. Prints, per structure and for the mean over structures,
both runs' mean Dice, the paired difference, how many cases improved and a Wilcoxon signed-rank p.
One pair of runs says how consistent two networks are across cases, not whether a method is
better (docs/benchmarks.md, "Protocol").

    python benchmarks/pair_with_earlier_run.py \\
        --earlier docs/results/acdc_2d_cpu_xl_vanilla_seed1/comparison.json --earlier-trainer nnUNetTrainer_cpuBudgetXL \\
        --new docs/results/acdc_2d_cpu_xl_mper_seed1/comparison.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--earlier", type=Path, required=True, help="comparison.json holding the earlier run")
    parser.add_argument("--earlier-trainer", required=True)
    parser.add_argument("--new", type=Path, required=True, help="comparison.json of the new runs")
    parser.add_argument("--metric", default="Dice")
    args = parser.parse_args()
    earlier = json.loads(args.earlier.read_text())
    if len(earlier["runs"]) != 1:
        raise SystemExit(f"{args.earlier} pools {len(earlier['runs'])} runs per trainer; its per-case scores are "
                         "not one run's")
    reference = earlier["per_case"][args.earlier_trainer][args.metric]
    new = json.loads(args.new.read_text())
    if len(new["runs"]) != 1:
        raise SystemExit(f"{args.new} pools {len(new['runs'])} runs per trainer; compare one run at a time")
    print(f"| trainer | structure | cases | {args.earlier_trainer} | trainer | difference | cases better | p (Wilcoxon) |")
    print("|---|---|---|---|---|---|---|---|")
    for trainer, scores in new["per_case"].items():
        for structure, cases in reference.items():
            shared = sorted(set(cases) & set(scores[args.metric][structure]))
            if not shared:
                raise SystemExit(f"no case in common for {structure}: are both comparisons of the same fold?")
            before = np.array([cases[c] for c in shared])
            after = np.array([scores[args.metric][structure][c] for c in shared])
            p = wilcoxon(after, before).pvalue if np.any(after != before) else 1.0
            print(f"| `{trainer}` | {structure} | {len(shared)} | {before.mean():.3f} | {after.mean():.3f} | "
                  f"{after.mean() - before.mean():+.3f} | {int((after > before).sum())}/{len(shared)} | {p:.3g} |")


if __name__ == "__main__":
    main()
