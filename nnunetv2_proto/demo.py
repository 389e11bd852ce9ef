"""``nnunetv2-proto demo``: the whole workflow on the built-in synthetic dataset.

Everything happens inside one work folder with its own nnUNet_raw / nnUNet_preprocessed /
nnUNet_results, so the user's own nnU-Net folders are never touched. nnU-Net's real entry
points run as subprocesses: ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train`` (every
trainer with the same CPU budget, fold 0) and ``nnUNetv2_predict`` on fold 0's validation
cases; the predictions are scored with nnU-Net's evaluation. Steps whose outputs exist
are skipped, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

from nnunetv2_proto.demo_dataset import DemoDatasetSpec, dataset_folder_name, write_demo_dataset
from nnunetv2_proto.environment import SetupError, trainer_directory

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "ProtoDemo"
DEMO_CONFIGURATION = "3d_cpu"
WORKDIR_MARKER = ".nnunetv2_proto_demo"  # a folder holding it is the demo's own and may be resumed or rewritten
# vanilla nnU-Net and one trainer per family, all with the shared CPU budget; the semi-supervised
# one sees the labels of 8 of fold 0's 16 training cases
DEFAULT_TRAINERS = ("nnUNetTrainer_cpuBudget", "nnUNetTrainerSIPL_cpuBudget", "nnUNetTrainerMPER_cpuBudget",
                    "nnUNetTrainerMPERSemi_8labeled_cpuBudget")
EPOCH_PATTERNS = {
    "epoch": re.compile(r"Epoch (\d+)$"),
    "train_loss": re.compile(r"train_loss (-?[\d.]+)"),
    "pseudo_dice": re.compile(r"Pseudo dice \[(.*)\]"),
    "epoch_time": re.compile(r"Epoch time: ([\d.]+) s"),
}


@dataclass
class DemoPaths:
    workdir: Path

    @property
    def raw(self) -> Path:
        return self.workdir / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.workdir / "nnUNet_results"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def validation_images(self) -> Path:
        return self.workdir / "fold0_validation_images"

    @property
    def validation_labels(self) -> Path:
        return self.workdir / "fold0_validation_labels"

    def predictions(self, trainer: str) -> Path:
        return self.workdir / "predictions" / trainer

    def environment(self) -> Dict[str, str]:
        return {
            "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results), "nnUNet_extTrainer": str(trainer_directory()),
            # nnU-Net's export pools default to 8 processes; on a small machine that only costs memory
            "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 2))),
        }


@contextlib.contextmanager
def scoped_environment(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for in-process nnU-Net calls and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class EpochProgress:
    """Turns nnU-Net's training log lines into one progress line per epoch."""
    label: str
    total_epochs: int
    report: Callable[[str], None]
    current: Dict[str, str] = field(default_factory=dict)

    def feed(self, line: str) -> None:
        text = line.split(": ", 1)[-1].strip()
        for key, pattern in EPOCH_PATTERNS.items():
            match = pattern.search(text)
            if match:
                self.current[key] = match.group(1)
        if "epoch_time" in self.current and "epoch" in self.current:
            dice = ", ".join(f"{float(v.strip().split('(')[-1].rstrip(')')):.2f}"
                             for v in self.current.get("pseudo_dice", "").split(",") if v.strip())
            self.report(f"  [{self.label}] epoch {int(self.current['epoch']) + 1}/{self.total_epochs}  "
                        f"train loss {self.current.get('train_loss', '?')}  pseudo-Dice [{dice}]  "
                        f"{float(self.current['epoch_time']):.1f} s")
            self.current = {}


def run_logged(command: Sequence[str], env: Dict[str, str], log_file: Path,
               on_line: Optional[Callable[[str], None]] = None) -> None:
    """Run a command, keep its full output in ``log_file`` and pass each line to ``on_line``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_file, "a") as log, subprocess.Popen(list(command), env=full_env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        log.write(f"$ {' '.join(command)}\n")
        for line in process.stdout:  # type: ignore[union-attr]
            log.write(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {code}; its output is in {log_file}")


def _nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script next to this interpreter (so a venv works without activation)."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise SetupError(f"{name} is not on PATH", "install nnunetv2 in this environment: pip install -e .")
    return found


def claim_workdir(workdir: Path) -> None:
    """Make ``workdir`` the demo's, or refuse before anything is written: it must be new, empty or the demo's own."""
    fix = "pass --workdir with a new or empty folder (or one an earlier demo run created)"
    if workdir.exists() and not workdir.is_dir():
        raise SetupError(f"the demo work folder {workdir} is a file", fix)
    if workdir.is_dir() and not (workdir / WORKDIR_MARKER).is_file():
        try:
            entries = sorted(p.name for p in workdir.iterdir())
        except PermissionError:
            raise SetupError(f"the demo work folder {workdir} cannot be read", fix) from None
        if entries:
            raise SetupError(f"{workdir} is not empty ({', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}) "
                             f"and is not a demo work folder (no {WORKDIR_MARKER}); the demo writes results.md, "
                             "results.csv, results.png and more there, so it changed nothing", fix)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / WORKDIR_MARKER).write_text("nnunetv2-proto demo work folder: the demo may overwrite anything here\n")
    except OSError as error:
        raise SetupError(f"cannot write to the demo work folder {workdir} ({error.strerror})",
                         "pass --workdir with a writable folder") from None


def fold0_validation_cases(paths: DemoPaths, dataset: str) -> List[str]:
    splits = json.loads((paths.preprocessed / dataset / "splits_final.json").read_text())
    return sorted(splits[0]["val"])


def run_demo(workdir: Path = Path("nnunet_proto_demo"), trainers: Sequence[str] = DEFAULT_TRAINERS,
             spec: DemoDatasetSpec = DemoDatasetSpec(), report: Callable[[str], None] = print) -> Path:
    """Run the demo; returns the path of the written results table (Markdown)."""
    from nnunetv2_proto.demo_report import collect_results, write_report

    paths = DemoPaths(workdir.resolve())
    claim_workdir(paths.workdir)
    env = paths.environment()
    dataset = dataset_folder_name(DEMO_DATASET_ID, DEMO_DATASET_NAME)
    for folder in (paths.raw, paths.preprocessed, paths.results):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    report(f"[1/6] synthetic dataset -> {paths.raw / dataset}")
    write_demo_dataset(paths.raw, DEMO_DATASET_ID, DEMO_DATASET_NAME, spec, progress=lambda _: None)

    report("[2/6] nnUNetv2_plan_and_preprocess (fingerprint and default plans)")
    if (paths.preprocessed / dataset / "nnUNetPlans.json").is_file():
        report("  already planned")
    else:
        run_logged([_nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DEMO_DATASET_ID),
                    "--verify_dataset_integrity", "--no_pp", "-np", "2"], env, paths.logs / "plan.log")

    report(f"[3/6] CPU preset ({DEMO_CONFIGURATION}) planned and preprocessed by nnU-Net")
    from nnunetv2_proto.cpu_plans import add_cpu_configurations
    with scoped_environment(env), open(paths.logs / "plan_cpu.log", "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        add_cpu_configurations(str(DEMO_DATASET_ID), num_processes=2, configurations=(DEMO_CONFIGURATION,))
    splits_file = paths.preprocessed / dataset / "splits_final.json"

    from nnunetv2_proto.training.budgets import CPU_BUDGET_EPOCHS
    report(f"[4/6] training {len(trainers)} trainers, fold 0, {DEMO_CONFIGURATION}, same budget each")
    for index, trainer in enumerate(trainers, start=1):
        output = paths.results / dataset / convert_trainer_plans_config_to_identifier(
            trainer, "nnUNetPlans", DEMO_CONFIGURATION) / "fold_0"
        if (output / "checkpoint_final.pth").is_file():
            report(f"  ({index}/{len(trainers)}) {trainer}: already trained")
            continue
        report(f"  ({index}/{len(trainers)}) {trainer}")
        progress = EpochProgress(trainer, CPU_BUDGET_EPOCHS, report)
        resume = ["--c"] if (output / "checkpoint_latest.pth").is_file() else []
        run_logged([_nnunet_command("nnUNetv2_train"), str(DEMO_DATASET_ID), DEMO_CONFIGURATION, "0",
                    "-tr", trainer, "-device", "cpu", *resume], env, paths.logs / f"train_{trainer}.log",
                   progress.feed)

    cases = fold0_validation_cases(paths, dataset) if splits_file.is_file() else []
    report(f"[5/6] nnUNetv2_predict on fold 0's {len(cases)} validation cases")
    paths.validation_images.mkdir(exist_ok=True)
    paths.validation_labels.mkdir(exist_ok=True)
    for case in cases:  # the references of exactly the predicted cases, so evaluation can insist on all of them
        for source, target in ((paths.raw / dataset / "imagesTr" / f"{case}_0000.nii.gz", paths.validation_images),
                               (paths.raw / dataset / "labelsTr" / f"{case}.nii.gz", paths.validation_labels)):
            if not (target / source.name).exists():
                shutil.copy2(source, target / source.name)
    prediction_seconds: Dict[str, float] = {}
    for trainer in trainers:
        out = paths.predictions(trainer)
        timing_file = out / "prediction_seconds.json"
        if timing_file.is_file() and all((out / f"{c}.nii.gz").is_file() for c in cases):
            prediction_seconds[trainer] = json.loads(timing_file.read_text())["seconds_per_case"]
            report(f"  {trainer}: already predicted")
            continue
        tick = time.perf_counter()
        run_logged([_nnunet_command("nnUNetv2_predict"), "-i", str(paths.validation_images), "-o", str(out),
                    "-d", str(DEMO_DATASET_ID), "-c", DEMO_CONFIGURATION, "-f", "0", "-tr", trainer,
                    "-device", "cpu", "-npp", "1", "-nps", "1"], env, paths.logs / f"predict_{trainer}.log")
        prediction_seconds[trainer] = (time.perf_counter() - tick) / max(1, len(cases))
        timing_file.write_text(json.dumps({"seconds_per_case": prediction_seconds[trainer],
                                           "note": "wall time of nnUNetv2_predict / cases, incl. model loading"}))
        report(f"  {trainer}: {prediction_seconds[trainer]:.1f} s per case")

    report("[6/6] evaluation and comparison (nnunetv2-proto compare), table and figure")
    with scoped_environment(env):
        results = collect_results(paths, dataset, trainers, prediction_seconds, DEMO_CONFIGURATION)
    table_path = write_report(paths, dataset, results, cases)
    report(table_path.with_suffix(".md").read_text())
    report(f"figure: {table_path.with_suffix('.png')}")
    report(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; everything is in {paths.workdir}")
    return table_path
