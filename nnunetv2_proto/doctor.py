"""``nnunetv2-proto doctor``: is this machine set up to train and predict with the plugin?"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from nnunetv2_proto.environment import (NNUNET_FOLDER_VARIABLES, TRAINER_PATH_VARIABLE, find_trainer_class,
                                        trainer_directory, trainer_path_is_exported)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: Optional[str] = None


def project_trainers() -> Dict[str, type]:
    """Every nnUNetTrainer subclass defined in this plugin's trainer modules, by class name."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    found: Dict[str, type] = {}
    for module_info in pkgutil.iter_modules([str(trainer_directory())]):
        module = importlib.import_module(f"nnunetv2_proto.trainers.{module_info.name}")
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, nnUNetTrainer) and name.startswith("nnUNetTrainer"):
                found[name] = obj
    return found


def _check_folders() -> List[Check]:
    checks = []
    for name in NNUNET_FOLDER_VARIABLES:
        value = os.environ.get(name)
        if not value:
            checks.append(Check(name, False, "not set", f"export {name}=/path/to/{name}"))
        elif Path(value).exists() and not Path(value).is_dir():
            checks.append(Check(name, False, f"{value} is a file, not a folder",
                                f"export {name}=<a folder> (the current value names a file; do not delete it blindly)"))
        elif not Path(value).is_dir():
            checks.append(Check(name, False, f"{value} does not exist", f"mkdir -p {value}"))
        else:
            checks.append(Check(name, True, value))
    return checks


def _check_trainer_path() -> Check:
    directory = trainer_directory()
    if trainer_path_is_exported(directory):
        return Check(TRAINER_PATH_VARIABLE, True, os.environ[TRAINER_PATH_VARIABLE])
    return Check(TRAINER_PATH_VARIABLE, False,
                 f"does not list {directory} (value: {os.environ.get(TRAINER_PATH_VARIABLE, '<unset>')})",
                 f"export {TRAINER_PATH_VARIABLE}=$(nnunetv2-proto trainer-path)")


def _check_versions() -> List[Check]:
    checks = []
    nnunet_version = importlib.metadata.version("nnunetv2")
    major_minor = tuple(int(p) for p in nnunet_version.split(".")[:2])
    checks.append(Check("nnunetv2", major_minor == (2, 8), nnunet_version,
                        None if major_minor == (2, 8) else "pip install 'nnunetv2>=2.8,<2.9'"))
    import torch
    checks.append(Check("torch", True, torch.__version__))
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu only (train with -device cpu; the CPU presets 3d_cpu/2d_cpu are sized for this)"
    checks.append(Check("torch device", True, device))
    return checks


def _check_trainers(export_ok: bool) -> List[Check]:
    trainers = project_trainers()
    if not export_ok:
        return [Check("trainer lookup", False, f"skipped for {len(trainers)} trainers: {TRAINER_PATH_VARIABLE} "
                      "is not set up", f"export {TRAINER_PATH_VARIABLE}=$(nnunetv2-proto trainer-path)")]
    failures = []
    for name in sorted(trainers):
        try:
            found = find_trainer_class(name)
        except Exception as error:  # nnU-Net raises RuntimeError, imports may raise anything
            failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        # nnU-Net drops the external modules from sys.modules after the lookup, so the class
        # cannot be traced to a file; built-in trainers live under the nnunetv2 package
        if found.__name__ != name or found.__module__.startswith("nnunetv2."):
            failures.append(f"{name}: nnU-Net resolves it to {found.__module__}.{found.__name__}, "
                            "a built-in trainer that shadows the plugin's")
    if failures:
        return [Check("trainer lookup", False, "; ".join(failures),
                      "reinstall the plugin (pip install -e .) and re-export nnUNet_extTrainer")]
    return [Check("trainer lookup", True, f"all {len(trainers)} project trainers resolve through nnU-Net's lookup")]


def run_doctor(report: Callable[[str], None] = print) -> int:
    checks = _check_folders()
    export = _check_trainer_path()
    checks.append(export)
    checks += _check_versions()
    checks += _check_trainers(export.ok)
    for check in checks:
        report(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if check.fix:
            report(f"       fix: {check.fix}")
    failed = [c for c in checks if not c.ok]
    report("doctor: everything is set up" if not failed else f"doctor: {len(failed)} problem(s)")
    return 1 if failed else 0
