"""The ``nnunetv2-proto`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from nnunetv2_proto.environment import SetupError


def _cmd_trainer_path(args: argparse.Namespace) -> int:
    from nnunetv2_proto.environment import trainer_directory
    print(trainer_directory())
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from nnunetv2_proto.doctor import run_doctor
    return run_doctor()


def _cmd_make_demo_dataset(args: argparse.Namespace) -> int:
    from nnunetv2_proto.demo_dataset import DemoDatasetSpec, write_demo_dataset
    from nnunetv2_proto.environment import require_nnunet_folders
    raw = Path(args.nnunet_raw) if args.nnunet_raw else require_nnunet_folders(("nnUNet_raw",))["nnUNet_raw"]
    folder = write_demo_dataset(raw, args.dataset_id, args.name,
                                DemoDatasetSpec(num_cases=args.num_cases, seed=args.seed))
    print(f"wrote {folder}\nnext: nnUNetv2_plan_and_preprocess -d {args.dataset_id} --verify_dataset_integrity --no_pp"
          f" && nnunetv2-proto plan-cpu -d {args.dataset_id}")
    return 0


def _cmd_plan_cpu(args: argparse.Namespace) -> int:
    from nnunetv2_proto.cpu_plans import add_cpu_configurations
    result = add_cpu_configurations(args.d, args.p, args.np, replace=args.replace, preprocess=not args.no_preprocess)
    print(f"{result.plans_file}: added {result.added or 'nothing'}, unchanged {result.unchanged or 'nothing'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnunetv2_proto.demo import DEFAULT_TRAINERS, run_demo
    from nnunetv2_proto.demo_dataset import DemoDatasetSpec
    run_demo(Path(args.workdir), args.trainers or DEFAULT_TRAINERS,
             DemoDatasetSpec(num_cases=args.num_cases, seed=args.seed))
    return 0


def _evaluation_policy(args: argparse.Namespace):
    from nnunetv2_proto.evaluation.evaluate import EvaluationPolicy
    return EvaluationPolicy(allow_missing=args.chill, allow_extra=args.allow_extra,
                            geometry_tolerance=None if args.no_geometry_check else args.geometry_tolerance)


def _add_evaluation_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chill", action="store_true",
                   help="score the predicted cases when some references have no prediction (as nnU-Net's --chill)")
    p.add_argument("--allow-extra", action="store_true", help="skip predictions that have no reference")
    p.add_argument("--geometry-tolerance", type=float, default=1e-3,
                   help="largest accepted difference to the reference's spacing (relative), origin (mm) and "
                        "direction (default 1e-3)")
    p.add_argument("--no-geometry-check", action="store_true", help="do not compare spacing, origin, direction")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nnunetv2_proto.evaluation.evaluate import evaluate_folders
    result = evaluate_folders(Path(args.gt), Path(args.pred), Path(args.dataset_json) if args.dataset_json else None,
                              Path(args.out), args.np, policy=_evaluation_policy(args))
    for name, values in result["mean"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    for key in ("missing_predictions", "skipped_extra_predictions"):
        if result[key]:
            print(f"not scored ({key.replace('_', ' ')}): {len(result[key])}: {result[key][:5]}")
    print(f"{len(result['metric_per_case'])} cases -> {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from nnunetv2_proto.evaluation.compare import compare
    out = compare(args.d, args.c, args.tr, args.p, args.f, args.baseline, Path(args.out) if args.out else None,
                  Path(args.test_gt) if args.test_gt else None,
                  Path(args.test_pred_root) if args.test_pred_root else None, args.allow_missing, args.np,
                  Path(args.dataset_json) if args.dataset_json else None, seeds=args.seeds,
                  earlier=[Path(f) for f in args.earlier])
    print((out / "comparison.md").read_text())
    figures = [f.name for f in sorted(out.glob("comparison*.png"))]
    print(f"written: {out}/comparison.md, comparison.csv, comparison_runs.csv, comparison.json, " + ", ".join(figures))
    return 0


def _cmd_inference_mode(args: argparse.Namespace) -> int:
    from nnunetv2_proto.evaluation.inference_modes import derive_inference_run, derived_trainer_name, describe
    for fold in args.f:
        print(describe(derive_inference_run(args.d, args.c, args.tr, fold, args.mode, args.p, args.device, args.np,
                                            args.replace)))
    from nnunetv2_proto.training.seeding import split_seeded_name
    seeded = split_seeded_name(args.tr)
    base, seeds = (seeded[0], f" --seeds {seeded[1]}") if seeded else (args.tr, "")
    print(f"compare it with: nnunetv2-proto compare -d {args.d} -c {args.c} -f {' '.join(map(str, args.f))}{seeds} "
          f"-tr {base} {derived_trainer_name(base, args.mode)}")
    return 0


def _cmd_benchmark_heads(args: argparse.Namespace) -> int:
    from nnunetv2_proto.profiling.benchmark_heads import benchmark_heads, format_benchmark
    report = benchmark_heads(args.d, args.c, args.tr, args.p, args.baseline, args.num_classes, args.steps,
                             args.warmup, args.device, args.batch_size, Path(args.out) if args.out else None,
                             args.sequential)
    print(format_benchmark(report))
    return 0


def _cmd_make_labeled_list(args: argparse.Namespace) -> int:
    from nnunetv2_proto.semi.splits import make_labeled_list
    path = make_labeled_list(args.d, args.folds, args.n, args.group_by, args.seed, args.out, args.replace)
    print(f"wrote {path}\ntrain with: nnUNetv2_train {args.d} CONFIG FOLD -tr nnUNetTrainerMPERSemi_labeledList")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2-proto",
                                     description="Prototype-based heads (SIPL, MPER) for nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=_cmd_trainer_path)

    p = sub.add_parser("doctor", help="check nnU-Net folders, nnUNet_extTrainer, versions, device, trainer lookup")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("make-demo-dataset", help="write the synthetic demo dataset into nnUNet_raw")
    p.add_argument("--nnunet-raw", default=None, help="target nnUNet_raw folder (default: $nnUNet_raw)")
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--name", default="ProtoDemo")
    p.add_argument("--num-cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_demo_dataset)

    p = sub.add_parser("plan-cpu", help="add 3d_cpu / 2d_cpu configurations to a dataset's plans and preprocess them")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-np", type=int, default=2, help="processes for preprocessing")
    p.add_argument("--replace", action="store_true", help="overwrite existing, different 3d_cpu/2d_cpu entries")
    p.add_argument("--no-preprocess", action="store_true", help="only write the plans")
    p.set_defaults(func=_cmd_plan_cpu)

    p = sub.add_parser("demo", help="synthetic dataset -> plan -> train every trainer -> predict -> evaluate")
    p.add_argument("--workdir", default="nnunet_proto_demo", help="work folder (default ./nnunet_proto_demo)")
    p.add_argument("--trainers", nargs="+", default=None, help="trainers to compare (default: one per family)")
    p.add_argument("--num-cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("make-labeled-list",
                       help="choose labelled cases (or patients) per fold for the _labeledList trainers")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-n", type=int, required=True, help="number of labelled cases, or of groups with --group-by")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--group-by", default=None,
                   help="regular expression naming a case's group, e.g. 'patient\\d+' for ACDC (both frames labelled)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", default=None, help="default: nnUNet_preprocessed/<dataset>/labeled_cases.json")
    p.add_argument("--replace", action="store_true", help="overwrite an existing list")
    p.set_defaults(func=_cmd_make_labeled_list)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, ASD (mm) per case and structure for a prediction folder")
    p.add_argument("--gt", required=True, help="reference segmentations (e.g. labelsTr)")
    p.add_argument("--pred", required=True, help="predictions (e.g. nnUNetv2_predict output)")
    p.add_argument("--dataset-json", default=None, help="dataset.json: structure names, regions, ignore label")
    p.add_argument("--out", required=True, help="output .json")
    p.add_argument("-np", type=int, default=2, help="processes")
    _add_evaluation_policy_arguments(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="trainers vs a baseline: tables, paired tests, plots")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_cpu")
    p.add_argument("-tr", nargs="+", required=True, help="trainers to compare")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("--seeds", nargs="+", type=int, default=[],
                   help="compare the seeded runs <trainer>_seed<N> of every trainer (each fold x seed is one run)")
    p.add_argument("--baseline", default=None, help="default: nnUNetTrainer if listed, else the first trainer")
    p.add_argument("--test-gt", default=None, help="external test set: reference folder")
    p.add_argument("--test-pred-root", default=None, help="external test set: folder with one subfolder per trainer")
    p.add_argument("--out", default=None, help="output folder (default ./comparison_<dataset>_<config>)")
    p.add_argument("--dataset-json", default=None,
                   help="structure names / regions (default: the dataset's dataset.json when found)")
    p.add_argument("--allow-missing", action="store_true",
                   help="compare the runs and predicted cases that exist; list the rest as missing")
    p.add_argument("--earlier", nargs="+", default=[], metavar="COMPARISON_JSON",
                   help="earlier comparisons (their comparison.json) whose stored per-run scores stand in for the "
                        "requested runs they hold, e.g. runs whose predictions are gone")
    p.add_argument("-np", type=int, default=2, help="processes for evaluation")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("inference-mode",
                       help="score a trained MPER model's prototype or fused inference from the same weights")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_cpu")
    p.add_argument("-tr", required=True, help="the trained MPER run, e.g. nnUNetTrainerMPER_cpuBudgetLong_seed1")
    p.add_argument("-f", nargs="+", type=int, default=[0], help="folds (default 0)")
    p.add_argument("--mode", required=True, choices=["prototype", "fused", "linear"])
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("-np", type=int, default=1, help="processes for preprocessing, export and scoring")
    p.add_argument("--replace", action="store_true", help="predict again if the derived run exists")
    p.set_defaults(func=_cmd_inference_mode)

    p = sub.add_parser("benchmark-heads", help="train-step time, peak memory, inference time vs a baseline")
    p.add_argument("-d", required=True, help="dataset id or name (its plans are used)")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-tr", nargs="+", required=True, help="trainers; the first is the baseline unless --baseline")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--baseline", default=None)
    p.add_argument("--num-classes", type=int, default=None, help="benchmark with K synthetic classes instead")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--sequential", action="store_true",
                   help="one trainer at a time (large configurations whose set-ups do not fit in memory together)")
    p.set_defaults(func=_cmd_benchmark_heads)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SetupError as error:
        problem = " ".join(error.problem.split())  # one line, whatever the message's layout
        print(f"nnunetv2-proto {args.command}: error: {problem} -- fix: {error.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
