"""CPU-scale nnU-Net configurations (``3d_cpu``, ``2d_cpu``) added to a dataset's existing plans.

Each CPU configuration inherits from nnU-Net's own (``3d_fullres`` / ``2d``) and overrides
only what makes training feasible on a few CPU cores:

- spacing: the parent's, coarsened until the median image has at most ``TARGET_MEDIAN_VOXELS``
  voxels (in steps of 0.25x; the coarse axis of anisotropic data is left alone);
- network: 16 base features, at most 256 (a 5-stage 16-32-64-128-256 UNet for LA);
- patch size and topology: nnU-Net's own planner (the class that made the plans) run with a
  small memory target, so pooling, kernel sizes and patch shape follow nnU-Net's rules;
- batch size: 2 in 3D, the planner's choice in 2D.

For Dataset501_LeftAtrium this gives 1.25 mm spacing, patch 40x64x80 and batch 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np

from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name

ANISOTROPY_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
TARGET_MEDIAN_VOXELS = {3: 320_000, 2: 65_536}
MEMORY_TARGET_GB = {3: 0.35, 2: 0.5}
BASE_FEATURES = 16
MAX_FEATURES = 256
CPU_CONFIGURATIONS = {"3d_cpu": "3d_fullres", "2d_cpu": "2d"}


@dataclass(frozen=True)
class CpuPlanResult:
    plans_file: Path
    added: List[str]
    unchanged: List[str]


def coarsened_spacing(spacing: List[float], median_shape: List[float], target_voxels: int) -> List[float]:
    spacing_arr = np.asarray(spacing, dtype=float)
    shape_arr = np.asarray(median_shape, dtype=float)
    anisotropic = spacing_arr.max() / spacing_arr.min() > ANISOTROPY_THRESHOLD
    scalable = [i for i in range(len(spacing)) if not (anisotropic and spacing_arr[i] == spacing_arr.max())]
    excess = float(np.prod(shape_arr)) / target_voxels
    if excess <= 1:
        return [float(s) for s in spacing]
    factor = math.ceil(excess ** (1 / len(scalable)) * 4) / 4
    new = spacing_arr.copy()
    new[scalable] = spacing_arr[scalable] * factor
    if anisotropic:
        # never make an in-plane axis coarser than the through-plane one
        new[scalable] = np.minimum(new[scalable], spacing_arr.max())
    return [float(s) for s in new]


def plan_cpu_configuration(planner_class, dataset_name: str, parent: dict, plans_name: str, name: str,
                           num_training_cases: int) -> dict:
    dim = len(parent["spacing"])
    spacing = coarsened_spacing(parent["spacing"], parent["median_image_size_in_voxels"], TARGET_MEDIAN_VOXELS[dim])
    median_shape = [m * s / n for m, s, n in zip(parent["median_image_size_in_voxels"], parent["spacing"], spacing)]
    planner = planner_class(dataset_name, gpu_memory_target_in_gb=MEMORY_TARGET_GB[dim], plans_name=plans_name)
    planner.UNet_base_num_features = BASE_FEATURES
    planner.UNet_max_features_2d = MAX_FEATURES
    planner.UNet_max_features_3d = MAX_FEATURES
    planned = planner.get_plans_for_configuration(
        spacing, median_shape, f"{plans_name}_{name}", float(np.prod(median_shape)) * num_training_cases, {})
    planned = json.loads(json.dumps(planned, default=_json_default))
    batch_size = 2 if dim == 3 else int(planned["batch_size"])
    return {
        "inherits_from": CPU_CONFIGURATIONS[name],
        "data_identifier": f"{plans_name}_{name}",
        "spacing": planned["spacing"],
        "median_image_size_in_voxels": planned["median_image_size_in_voxels"],
        "patch_size": planned["patch_size"],
        "batch_size": batch_size,
        "architecture": planned["architecture"],
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value)}")


def add_cpu_configurations(dataset: str, plans_name: str = "nnUNetPlans", num_processes: int = 2,
                           replace: bool = False, preprocess: bool = True,
                           configurations: Sequence[str] = tuple(CPU_CONFIGURATIONS),
                           progress: Callable[[str], None] = print) -> CpuPlanResult:
    """Add ``3d_cpu``/``2d_cpu`` (or the subset named) to the dataset's plans and preprocess them with nnU-Net."""
    folders = require_nnunet_folders(("nnUNet_raw", "nnUNet_preprocessed"))
    dataset_name = resolve_dataset_name(dataset)
    plans_file = folders["nnUNet_preprocessed"] / dataset_name / f"{plans_name}.json"
    if not plans_file.is_file():
        raise SetupError(
            f"{plans_file} does not exist: plan-cpu extends nnU-Net's default plans, which are not made yet",
            f"run nnUNetv2_plan_and_preprocess -d {dataset_name} --verify_dataset_integrity --no_pp first"
            + ("" if plans_name == "nnUNetPlans" else f" (with -pl for plans {plans_name})"),
        )
    if not (folders["nnUNet_raw"] / dataset_name / "dataset.json").is_file():
        raise SetupError(
            f"the raw dataset {folders['nnUNet_raw'] / dataset_name} is missing; nnU-Net's planner and "
            "preprocessing read it",
            "point nnUNet_raw at the folder that holds the raw dataset",
        )
    plans = json.loads(plans_file.read_text())

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    planner_class = PlansManager(plans).experiment_planner_class
    num_training_cases = len(json.loads((folders["nnUNet_preprocessed"] / dataset_name / "dataset_fingerprint.json")
                                        .read_text())["spacings"])

    added, unchanged = [], []
    unknown = set(configurations) - set(CPU_CONFIGURATIONS)
    if unknown:
        raise SetupError(f"unknown CPU configuration(s) {sorted(unknown)}", f"choose from {list(CPU_CONFIGURATIONS)}")
    for name, parent_name in CPU_CONFIGURATIONS.items():
        if name not in configurations or parent_name not in plans["configurations"]:
            continue
        parent = PlansManager(plans).get_configuration(parent_name).configuration
        configuration = plan_cpu_configuration(planner_class, dataset_name, parent, plans_name, name,
                                               num_training_cases)
        existing = plans["configurations"].get(name)
        if existing == configuration:
            unchanged.append(name)
            continue
        if existing is not None and not replace:
            raise SetupError(
                f"{plans_file} already has a '{name}' configuration that differs from what plan-cpu computes now",
                "keep it (nothing to do), or pass --replace to overwrite it (its preprocessed data is redone)",
            )
        plans["configurations"][name] = configuration
        added.append(name)
        progress(f"{name}: spacing {configuration['spacing']}, patch {configuration['patch_size']}, "
                 f"batch {configuration['batch_size']}, features "
                 f"{configuration['architecture']['arch_kwargs']['features_per_stage']}")
    if not added and not unchanged:
        raise SetupError(f"{plans_file} has neither 3d_fullres nor 2d, so there is nothing to derive CPU presets from",
                         "re-plan the dataset with nnUNetv2_plan_experiment")
    if added:
        backup = plans_file.with_name(plans_file.name + ".before_plan_cpu")
        if not backup.exists():
            shutil.copy2(plans_file, backup)
        tmp = plans_file.with_name(plans_file.name + ".tmp")
        tmp.write_text(json.dumps(plans, indent=4))
        os.replace(tmp, plans_file)
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
        from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
        to_preprocess = added + [c for c in unchanged
                                 if not _preprocessed(folders, dataset_name, plans, c, num_training_cases)]
        if to_preprocess:
            preprocess_dataset(convert_dataset_name_to_id(dataset_name), plans_name, to_preprocess,
                               [num_processes] * len(to_preprocess), show_progress_bar=True)
    return CpuPlanResult(plans_file, added, unchanged)


def _preprocessed(folders: Dict[str, Path], dataset_name: str, plans: dict, configuration: str,
                  num_cases: int) -> bool:
    """True if every case has its properties file (nnU-Net writes it last, per case)."""
    data_folder = folders["nnUNet_preprocessed"] / dataset_name / plans["configurations"][configuration]["data_identifier"]
    return data_folder.is_dir() and len(list(data_folder.glob("*.pkl"))) >= num_cases
