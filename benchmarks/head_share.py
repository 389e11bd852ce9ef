"""Share of inference time spent in the parts a prototype trainer adds to nnU-Net's UNet.

``benchmark-heads`` compares whole networks, so on a busy machine its inference ratio carries
the machine's drift between measurements. This script times, inside the same forward passes,
every top-level module of a trainer's network other than nnU-Net's ``encoder`` and
``decoder`` (SIPL: ``head``; MPER: ``classifier``, unused by its default linear inference)
and prints its share and the ratio it implies against the same network without it
(whole / (whole - added)). The network is built from the real plans as ``nnUNetv2_train``
builds it (see ``nnunetv2_proto.profiling.benchmark_heads``); input is one synthetic patch.

Run: python benchmarks/head_share.py -d 501 -c 3d_fullres -tr nnUNetTrainerSIPL nnUNetTrainerMPER
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch

from nnunetv2_proto.profiling.benchmark_heads import MeasuredTrainer, add_trainer_arguments, trainers_in_this_process

NNUNET_PARTS = ("encoder", "decoder")


def added_modules(network: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {name: child for name, child in network.named_children() if name not in NNUNET_PARTS}


def time_added_parts(measured: MeasuredTrainer, repeats: int, warmup: int) -> List[Dict[str, float]]:
    network = measured.trainer.network
    spent: Dict[str, float] = {}
    started: Dict[str, float] = {}

    def before(name):
        def hook(module, inputs):
            measured._sync()
            started[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, inputs, output):
            measured._sync()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]
        return hook

    handles = []
    for name, module in added_modules(network).items():
        handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    rows = []
    try:
        for repeat in range(warmup + repeats):
            spent.clear()
            whole = measured.inference()
            if repeat >= warmup:
                rows.append({"whole": whole, **{name: spent.get(name, 0.0) for name in added_modules(network)}})
    finally:
        for handle in handles:
            handle.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_trainer_arguments(parser, "trainers whose added modules are timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with trainers_in_this_process(args.dataset, args.plans, args.device) as (name, build):
        print(f"{name} {args.configuration} on {args.device}, median of {args.repeats} forward passes "
              f"after {args.warmup} warm-up (deep supervision off, as nnUNetv2_predict runs it)")
        print("| trainer | whole forward (s) | added module | its time (s) | share | implied ratio to the UNet alone |")
        print("|---|---|---|---|---|---|")
        for trainer in args.trainers:
            measured = build(trainer, args.configuration)  # one at a time: full-size set-ups are large
            rows = time_added_parts(measured, args.repeats, args.warmup)
            whole = sorted(r["whole"] for r in rows)[len(rows) // 2]
            for part in [k for k in rows[0] if k != "whole"] or ["(none)"]:
                added = sorted(r.get(part, 0.0) for r in rows)[len(rows) // 2]
                print(f"| `{trainer}` | {whole:.3f} | `{part}` | {added:.3f} | {100 * added / whole:.1f}% | "
                      f"{whole / max(whole - added, 1e-9):.3f} |", flush=True)
            del measured


if __name__ == "__main__":
    main()
