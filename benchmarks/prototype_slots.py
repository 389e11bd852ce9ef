"""MPER's prototype slots per epoch, from the training logs of one or more runs: a table and a figure.

Shows whether each class keeps several prototypes (the paper's premise) or collapses onto one, and
when a slot went stale. Reads the fold folders of trained or archived runs (their
``training_log_*.txt``), e.g. the three seeds of a comparison:

    python benchmarks/prototype_slots.py --out docs/results/acdc_slots.png --classes background,RV,MYO,LV \\
        $nnUNet_results/Dataset502_ACDC/nnUNetTrainerMPER_cpuBudgetXL_seed{1,2,3}__nnUNetPlans__2d_cpu/fold_0
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from nnunetv2_proto.evaluation.prototype_slots import SlotHistory, plot_slot_shares, read_slot_history, slot_table
from nnunetv2_proto.evaluation.report import short_name
from nnunetv2_proto.evaluation.runs import run_label
from nnunetv2_proto.training.seeding import split_seeded_name


def run_name(fold_folder: Path) -> str:
    """.../nnUNetTrainerMPER_cpuBudgetXL_seed2__nnUNetPlans__2d_cpu/fold_0 -> 'MPER_cpuBudgetXL fold 0 seed 2',
    the run labels of ``compare``'s reports."""
    trainer = fold_folder.parent.name.split("__")[0]
    base, seed = split_seeded_name(trainer) or (trainer, None)
    return f"{short_name(base)} {run_label((int(fold_folder.name.split('_')[-1]), seed))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fold folders (.../<trainer>__<plans>__<config>/fold_X)")
    parser.add_argument("--out", type=Path, required=True, help="output .png")
    parser.add_argument("--classes", type=lambda text: text.split(","),
                        help="comma-separated class names in label order (default: class 0, class 1, ...)")
    args = parser.parse_args()
    histories: Dict[str, SlotHistory] = {}
    for folder in args.runs:
        history = read_slot_history(folder)
        if history is None:
            raise SystemExit(f"{folder}: no MPER prototype lines in its training_log_*.txt; is it an MPER run "
                             "that reached its prototype phase?")
        histories[run_name(folder)] = history
    num_classes = {h.counts.shape[1] for h in histories.values()}
    if len(num_classes) != 1:
        raise SystemExit(f"the runs have different numbers of classes {sorted(num_classes)}; compare one dataset at a time")
    (num_classes,) = num_classes
    names = args.classes or [f"class {k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise SystemExit(f"--classes names {len(names)} classes, the runs have {num_classes}")
    print("\n".join(slot_table(histories, names)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"written: {plot_slot_shares(histories, names, args.out)}")


if __name__ == "__main__":
    main()
