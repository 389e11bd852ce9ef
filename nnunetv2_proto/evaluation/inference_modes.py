"""Another inference mode of a trained MPER model, scored from the same weights (no training run).

MPER's network holds two classifiers; ``MPERConfig.inference`` decides which one predicts
(linear head, prototypes, or the mean of both). The choice lives in the head spec that the
trainer writes into the results folder's ``plans.json``, and ``nnUNetv2_predict`` builds the
network from that file. ``derive_inference_run`` therefore makes a sibling results folder,
``<trainer>_<mode>Inference[_seed<N>]__<plans>__<configuration>``, whose plans.json differs from
the source's only in the inference mode and whose checkpoint is a link to the source's, and
predicts the fold's validation cases through nnU-Net's predictor into ``fold_X/validation``, with
nnU-Net's own ``summary.json``: exactly what the source's final validation did (the checkpoint's
mirroring axes included). ``compare`` then pairs it with the source case by case and run by run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name
from nnunetv2_proto.networks import HEAD_SPEC_KEY
from nnunetv2_proto.networks.mper import INFERENCE_MODES
from nnunetv2_proto.training.seeding import seeded_name, split_seeded_name

CHECKPOINT = "checkpoint_final.pth"
COPIED_FILES = ("dataset.json", "dataset_fingerprint.json")


def derived_trainer_name(trainer: str, mode: str) -> str:
    """``nnUNetTrainerMPER_cpuBudgetLong_seed1`` + prototype -> ``nnUNetTrainerMPER_cpuBudgetLong_protoInference_seed1``
    (the seed stays last, so ``compare --seeds`` finds it)."""
    suffix = {"linear": "linearInference", "prototype": "protoInference", "fused": "fusedInference"}[mode]
    seeded = split_seeded_name(trainer)
    return seeded_name(f"{seeded[0]}_{suffix}", seeded[1]) if seeded else f"{trainer}_{suffix}"


def _mper_plans_with_mode(source_plans: dict, configuration: str, mode: str, source: Path) -> dict:
    spec = source_plans.get("configurations", {}).get(configuration, {}).get(HEAD_SPEC_KEY)
    if not spec or spec.get("kind") != "mper":
        raise SetupError(f"{source} was not trained by an MPER trainer (its plans.json has no MPER head spec for "
                         f"'{configuration}')", "pass the results of an nnUNetTrainerMPER* run")
    plans = copy.deepcopy(source_plans)
    plans["configurations"][configuration][HEAD_SPEC_KEY]["config"]["inference"] = mode
    return plans


def derive_inference_run(dataset: str, configuration: str, trainer: str, fold: int, mode: str,
                         plans_identifier: str = "nnUNetPlans", device: str = "cpu", num_processes: int = 1,
                         replace: bool = False) -> Path:
    """Predict and score the fold's validation cases with ``mode``; returns the new run's validation folder."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    if mode not in INFERENCE_MODES:
        raise SetupError(f"unknown MPER inference mode '{mode}'", f"use one of {INFERENCE_MODES}")
    folders = require_nnunet_folders()
    dataset = resolve_dataset_name(dataset)
    results = folders["nnUNet_results"] / dataset
    source = results / convert_trainer_plans_config_to_identifier(trainer, plans_identifier, configuration)
    checkpoint = source / f"fold_{fold}" / CHECKPOINT
    if not checkpoint.is_file():
        raise SetupError(f"{checkpoint} does not exist", f"finish training first: nnUNetv2_train {dataset} "
                         f"{configuration} {fold} -tr {trainer}")
    name = derived_trainer_name(trainer, mode)
    target = results / convert_trainer_plans_config_to_identifier(name, plans_identifier, configuration)
    validation = target / f"fold_{fold}" / "validation"
    if validation.exists():
        if not replace:
            raise SetupError(f"{validation} exists already", "pass --replace to predict it again")
        shutil.rmtree(validation)
    plans = _mper_plans_with_mode(json.loads((source / "plans.json").read_text()), configuration, mode, source)
    validation.mkdir(parents=True)
    (target / "plans.json").write_text(json.dumps(plans, indent=4))
    for file in COPIED_FILES:
        shutil.copy(source / file, target / file)
    link = target / f"fold_{fold}" / CHECKPOINT
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(checkpoint.resolve(), link)  # same weights, byte for byte
    _predict_validation_cases(folders, target, dataset, fold, validation, device, num_processes)
    return validation


def _predict_validation_cases(folders: dict, model_folder: Path, dataset: str, fold: int, output: Path, device: str,
                              num_processes: int) -> None:
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    splits = json.loads((folders["nnUNet_preprocessed"] / dataset / "splits_final.json").read_text())
    cases = splits[fold]["val"]
    predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=device != "cpu",
                                allow_tqdm=False)
    # use_mirroring as nnU-Net's final validation: the checkpoint's allowed axes decide (None for the CPU budgets)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), CHECKPOINT)
    files = get_filenames_of_train_images_and_targets(str(folders["nnUNet_raw"] / dataset), predictor.dataset_json)
    predictor.predict_from_files([files[c]["images"] for c in cases], [str(output / c) for c in cases],
                                 save_probabilities=False, overwrite=True, num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
    label_manager = predictor.label_manager
    compute_metrics_on_folder(str(folders["nnUNet_preprocessed"] / dataset / "gt_segmentations"), str(output),
                              str(output / "summary.json"), predictor.plans_manager.image_reader_writer_class(),
                              predictor.dataset_json["file_ending"],
                              label_manager.foreground_regions if label_manager.has_regions
                              else label_manager.foreground_labels,
                              label_manager.ignore_label, chill=True, num_processes=num_processes)


def describe(validation: Path) -> str:
    summary = json.loads((validation / "summary.json").read_text())
    return (f"{validation}: mean foreground Dice {summary['foreground_mean']['Dice']:.4f} over "
            f"{len(summary['metric_per_case'])} cases")
