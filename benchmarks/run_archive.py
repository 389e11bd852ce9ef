"""Keeps a finished run's evidence without its weights, so comparisons can span machines and sessions.

A CPU run at the budgets of docs/benchmarks.md takes up to 1.5 h; the comparisons need three
seeds per trainer, so their runs are trained over several sessions, on machines that do not keep
nnUNet_results. ``export`` copies what ``compare`` reads from a finished fold folder (the validation
predictions and nnU-Net's ``summary.json``) plus nnU-Net's logs, ``debug.json``, the budget's
timing record and the per-epoch log of the checkpoint (``training_log.pth``: the checkpoint's
``logging`` entry only, a few kB instead of its weights) into an archive folder laid out like
nnUNet_results; ``restore`` copies archived runs back into nnUNet_results, where
``nnunetv2-proto compare`` finds them beside freshly trained ones. A restored run has no weights:
``nnUNetv2_predict`` refuses it (no ``checkpoint_final.pth``), ``compare`` does not need them.

The weights themselves stay out (tens of MB per run), but ``export`` records their SHA-256
(``weights_sha256.txt``). A two-stage run needs its source's weights; ``fingerprint`` tells whether a
source retrained in a later session is bit-identical to the archived one (seeded runs are, on the
CPU, with ``nnUNet_n_proc_DA=1``), so the two-stage runs of one seed can span sessions and still
start from the same model.

    python benchmarks/run_archive.py export --archive docs/results/runs \\
        $nnUNet_results/Dataset502_ACDC/nnUNetTrainer_cpuBudgetXL_seed2__nnUNetPlans__2d_cpu/fold_0
    python benchmarks/run_archive.py restore --archive docs/results/runs
    python benchmarks/run_archive.py fingerprint --archive docs/results/runs \\
        $nnUNet_results/Dataset501_LeftAtrium/nnUNetTrainer_8labeled_cpuBudgetLong_seed1__nnUNetPlans__3d_cpu/fold_0
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path
from typing import List, Optional

from nnunetv2_proto.evaluation.inference_modes import CHECKPOINT as FINISHED
from nnunetv2_proto.evaluation.learning_curves import TRAINING_LOG_FILE
from nnunetv2_proto.training.budgets import TIMING_FILE

KEPT_FILES = ("debug.json", "progress.png", TIMING_FILE)
KEPT_PATTERNS = ("training_log_*.txt",)
WEIGHTS_FINGERPRINT_FILE = "weights_sha256.txt"


def weights_fingerprint(checkpoint: dict) -> Optional[str]:
    """SHA-256 over the network's entries (name, dtype, shape, bytes): equal only for bit-identical weights."""
    import torch
    weights = checkpoint.get("network_weights")
    if weights is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(fold_folder: Path) -> dict:
    import torch
    # nnU-Net's checkpoints pickle numpy scalars, hence the full unpickler (the user's own training output)
    return torch.load(fold_folder / FINISHED, map_location="cpu", weights_only=False, mmap=True)


def archived_folder(fold_folder: Path, archive: Path) -> Path:
    """Where a fold folder lives in the archive: ``archive/<dataset>/<identifier>/<fold>``."""
    return archive / fold_folder.parent.parent.name / fold_folder.parent.name / fold_folder.name


def export_run(fold_folder: Path, archive: Path) -> Path:
    """Copy one finished fold folder's evidence into ``archive/<dataset>/<identifier>/<fold>``."""
    import torch
    fold_folder = fold_folder.resolve()
    if not (fold_folder / FINISHED).is_file() or not (fold_folder / "validation" / "summary.json").is_file():
        raise SystemExit(f"{fold_folder} is not a finished run (no {FINISHED} or validation/summary.json); "
                         f"finish it with nnUNetv2_train ... --c first")
    target = archived_folder(fold_folder, archive)
    if target.exists():
        shutil.rmtree(target)
    (target / "validation").mkdir(parents=True)
    for path in (fold_folder / "validation").iterdir():
        if path.is_file():
            shutil.copy2(path, target / "validation" / path.name)
    kept = [fold_folder / name for name in KEPT_FILES if (fold_folder / name).is_file()]
    kept += [path for pattern in KEPT_PATTERNS for path in sorted(fold_folder.glob(pattern))]
    for path in kept:
        shutil.copy2(path, target / path.name)
    checkpoint = load_checkpoint(fold_folder)
    torch.save({"logging": checkpoint["logging"], "current_epoch": checkpoint.get("current_epoch"),
                "trainer_name": checkpoint.get("trainer_name")}, target / TRAINING_LOG_FILE)
    fingerprint = weights_fingerprint(checkpoint)
    if fingerprint:
        (target / WEIGHTS_FINGERPRINT_FILE).write_text(fingerprint + "\n")
    return target


def check_fingerprint(fold_folder: Path, archive: Path) -> str:
    """Whether a fold folder's final weights are bit-identical to those of its archived namesake."""
    fold_folder = fold_folder.resolve()
    if not (fold_folder / FINISHED).is_file():
        raise SystemExit(f"{fold_folder} has no {FINISHED}: only a finished run has final weights to compare")
    fingerprint = weights_fingerprint(load_checkpoint(fold_folder))
    recorded_file = archived_folder(fold_folder, archive) / WEIGHTS_FINGERPRINT_FILE
    if not recorded_file.is_file():
        return f"{fingerprint} {fold_folder}: no fingerprint archived for this run"
    same = recorded_file.read_text().strip() == fingerprint
    return (f"{fingerprint} {fold_folder}: " +
            ("bit-identical to the archived run" if same else f"differs from the archived run ({recorded_file})"))


def restore_runs(archive: Path, results: Path) -> List[Path]:
    """Copy every archived run into nnUNet_results; a run that already has a folder there is left alone."""
    restored = []
    for summary in sorted(archive.glob("*/*/fold_*/validation/summary.json")):
        fold_folder = summary.parent.parent
        target = results / fold_folder.relative_to(archive)
        if target.exists():
            print(f"kept {target} (exists)")
            continue
        shutil.copytree(fold_folder, target)
        restored.append(target)
    return restored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="archive finished fold folders")
    export.add_argument("runs", nargs="+", type=Path, help="fold folders (.../<trainer>__<plans>__<config>/fold_X)")
    export.add_argument("--archive", type=Path, required=True)
    restore = commands.add_parser("restore", help="copy archived runs into nnUNet_results")
    restore.add_argument("--archive", type=Path, required=True)
    fingerprint = commands.add_parser("fingerprint", help="are these runs' weights those the archive recorded?")
    fingerprint.add_argument("runs", nargs="+", type=Path, help="finished fold folders")
    fingerprint.add_argument("--archive", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "export":
        for run in args.runs:
            print(f"archived {export_run(run, args.archive)}")
    elif args.command == "fingerprint":
        for run in args.runs:
            print(check_fingerprint(run, args.archive))
    else:
        results = os.environ.get("nnUNet_results")
        if not results:
            raise SystemExit("nnUNet_results is not set; export it to the results folder the runs go back into")
        for target in restore_runs(args.archive, Path(results)):
            print(f"restored {target}")


if __name__ == "__main__":
    main()
