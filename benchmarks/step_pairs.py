"""Training-step ratio to vanilla nnU-Net measured in one process, step against step.

``benchmark-heads`` runs each trainer in its own process (so that memory can be attributed) and
takes the ratio of median step times. On this project's 2-vCPU machines that ratio moved between
1.07 and 1.32 for the same code (MPER, K = 14), more than the 10% the target allows: the spread
comes from the processes themselves (allocator state, where their threads run), not from slow
drift that round-robin timing cancels. This script builds the baseline and every candidate
trainer in one process, exactly as ``benchmark-heads`` builds them (real plans, the trainer's own
``train_step`` in its costliest phase, synthetic batches of the plans' patch and batch size),
and times them in ABBA order: per round the baseline, the candidate, the candidate, the
baseline. Each round gives one ratio (candidate time over baseline time, both summed over
their two steps); the script prints the median ratio and its 95% interval (order statistics of
the rounds), so a reader can see whether a target lies inside the machine's resolution.

Run: python benchmarks/step_pairs.py -d 501 -c 3d_cpu --num-classes 14 \\
         -tr nnUNetTrainer_cpuBudget nnUNetTrainerMPER_cpuBudget --rounds 15
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Dict, List, Sequence, Tuple

import torch

from nnunetv2_proto.profiling.benchmark_heads import MeasuredTrainer, add_trainer_arguments, trainers_in_this_process


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """Median and a distribution-free interval for it: the order statistics whose ranks a binomial(n, 1/2)
    brackets with the given confidence (normal approximation; n >= 6 for a 95% interval)."""
    ordered = sorted(values)
    n = len(ordered)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half_width = z * math.sqrt(n) / 2
    low = max(0, int(math.floor(n / 2 - half_width)))
    high = min(n - 1, int(math.ceil(n / 2 + half_width)) - 1)
    return statistics.median(ordered), ordered[low], ordered[high]


def paired_rounds(baseline: MeasuredTrainer, candidates: Dict[str, MeasuredTrainer], rounds: int, warmup: int,
                  progress=print) -> Dict[str, List[float]]:
    """Per candidate, one step-time ratio to the baseline per round (ABBA order within the round)."""
    ratios: Dict[str, List[float]] = {name: [] for name in candidates}
    for repeat in range(warmup + rounds):
        for name, candidate in candidates.items():
            first_base = baseline.train_step()
            candidate_time = candidate.train_step() + candidate.train_step()
            base_time = first_base + baseline.train_step()
            if repeat >= warmup:
                ratios[name].append(candidate_time / base_time)
        progress(f"  round {repeat + 1}/{warmup + rounds}" + (" (warm-up)" if repeat < warmup else ""))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_trainer_arguments(parser, "the baseline first, then candidates")
    parser.add_argument("--num-classes", type=int, default=None, help="synthetic label set of K classes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if len(args.trainers) < 2:
        parser.error("name a baseline and at least one candidate trainer")
    if args.rounds < 6:
        parser.error("--rounds must be at least 6: fewer rounds give no 95% interval for the median")
    with trainers_in_this_process(args.dataset, args.plans, args.device) as (name, build):
        measured = {trainer: build(trainer, args.configuration, args.num_classes) for trainer in args.trainers}
        baseline, *candidates = args.trainers
        ratios = paired_rounds(measured[baseline], {t: measured[t] for t in candidates}, args.rounds, args.warmup)
    first = measured[baseline].summary()
    print(f"{name} {args.configuration} on {args.device} (K = {first['num_outputs']}, patch {first['patch_size']}, "
          f"batch {first['batch_size']}, {torch.get_num_threads()} threads), one process, {args.rounds} ABBA rounds "
          f"after {args.warmup} warm-up")
    print(f"| trainer | step ratio to `{baseline}` (median of rounds) | 95% interval | rounds above 1.10 |")
    print("|---|---|---|---|")
    for trainer, values in ratios.items():
        median, low, high = median_interval(values)
        print(f"| `{trainer}` | {median:.3f} | {low:.3f}-{high:.3f} | {sum(v > 1.10 for v in values)}/{len(values)} |")


if __name__ == "__main__":
    main()
