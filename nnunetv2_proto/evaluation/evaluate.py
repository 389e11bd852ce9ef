"""``nnunetv2-proto evaluate``: per-case, per-structure Dice, IoU, HD95 and ASD for a prediction folder.

Files are read with nnU-Net's own reader/writer classes (any format nnU-Net reads), so
the spacing comes from the image headers in nnU-Net's axis order. Structures are the
dataset's labels, or its regions for region-based datasets (as nnU-Net evaluates them);
without a dataset.json they are the labels found in the references. Voxels carrying the
ignore label in the reference are set to background in both masks.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.evaluation.metrics import METRICS, structure_metrics

Structure = Tuple[int, ...]
CONVENTIONS = ("Dice/IoU: both masks empty -> 1, one empty -> 0. HD95/ASD (medpy definitions, mm): both empty -> 0, "
               "one empty -> image diagonal in mm. HD95 = 95th percentile of pooled directed surface distances; "
               "ASD = mean distance from prediction surface to reference surface.")


def _reader(file_ending: str, dataset_json: Optional[dict], example: Path):
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                          determine_reader_writer_from_file_ending)
    if dataset_json is not None:
        return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()
    return determine_reader_writer_from_file_ending(file_ending, str(example), verbose=False)()


def structures_from_dataset_json(dataset_json: dict) -> Tuple[Dict[str, Structure], Optional[int]]:
    """Structure name -> labels it covers, and the ignore label, via nnU-Net's label manager."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    names = {}
    for name, value in dataset_json["labels"].items():
        key = tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
        names[key] = name
    targets = manager.foreground_regions if manager.has_regions else manager.foreground_labels
    structures = {}
    for target in targets:
        key = tuple(target) if isinstance(target, (list, tuple)) else (int(target),)
        structures[names.get(key, "+".join(map(str, key)))] = key
    return structures, manager.ignore_label


def evaluate_case(reference_file: str, prediction_file: str, structures: Dict[str, Structure],
                  ignore_label: Optional[int], reader) -> dict:
    reference, properties = reader.read_seg(reference_file)
    prediction, _ = reader.read_seg(prediction_file)
    reference, prediction = reference[0], prediction[0]
    spacing = [float(s) for s in properties["spacing"]][-reference.ndim:]
    if reference.shape != prediction.shape:
        raise SetupError(f"{prediction_file} has shape {prediction.shape} but its reference {reference_file} has "
                         f"{reference.shape}", "evaluate predictions made for these exact reference images")
    valid = np.ones(reference.shape, dtype=bool) if ignore_label is None else reference != ignore_label
    metrics = {name: structure_metrics(np.isin(reference, labels) & valid, np.isin(prediction, labels) & valid,
                                       spacing).as_dict()
               for name, labels in structures.items()}
    return {"case": Path(reference_file).name, "reference_file": reference_file, "prediction_file": prediction_file,
            "spacing": spacing, "metrics": metrics}


def summarise(cases: Sequence[dict], structures: Sequence[str]) -> dict:
    mean, std = {}, {}
    for name in structures:
        mean[name] = {m: float(np.mean([c["metrics"][name][m] for c in cases])) for m in METRICS}
        std[name] = {m: float(np.std([c["metrics"][name][m] for c in cases])) for m in METRICS}
    foreground = {m: float(np.mean([mean[n][m] for n in structures])) for m in METRICS}
    return {"mean": mean, "std": std, "foreground_mean": foreground}


def evaluate_folders(reference_folder: Path, prediction_folder: Path, dataset_json_file: Optional[Path] = None,
                     output_file: Optional[Path] = None, num_processes: int = 2,
                     file_ending: Optional[str] = None) -> dict:
    dataset_json = json.loads(Path(dataset_json_file).read_text()) if dataset_json_file else None
    file_ending = file_ending or (dataset_json["file_ending"] if dataset_json else ".nii.gz")
    predictions = sorted(p for p in Path(prediction_folder).iterdir() if p.name.endswith(file_ending))
    if not predictions:
        raise SetupError(f"no '*{file_ending}' predictions in {prediction_folder}",
                         "point --pred at a folder written by nnUNetv2_predict (or pass the right file ending)")
    missing = [p.name for p in predictions if not (Path(reference_folder) / p.name).is_file()]
    if missing:
        raise SetupError(f"{len(missing)} prediction(s) have no reference in {reference_folder}: {missing[:5]}",
                         "use the labelsTr (or gt_segmentations) folder of the same dataset")
    reader = _reader(file_ending, dataset_json, predictions[0])
    if dataset_json is not None:
        structures, ignore_label = structures_from_dataset_json(dataset_json)
    else:
        found = set()
        for p in predictions:
            found |= set(np.unique(reader.read_seg(str(Path(reference_folder) / p.name))[0]).astype(int).tolist())
        structures, ignore_label = {str(v): (v,) for v in sorted(found - {0})}, None
    jobs = [(str(Path(reference_folder) / p.name), str(p), structures, ignore_label, reader) for p in predictions]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            cases = pool.starmap(evaluate_case, jobs)
    else:
        cases = [evaluate_case(*job) for job in jobs]
    result = {"structures": {k: list(v) for k, v in structures.items()}, "conventions": CONVENTIONS,
              "metric_per_case": cases, **summarise(cases, list(structures))}
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(result, indent=2))
    return result


def case_table(result: dict, metric: str) -> Dict[str, Dict[str, float]]:
    """case -> structure -> value, for the paired statistics."""
    return {c["case"]: {s: c["metrics"][s][metric] for s in c["metrics"]} for c in result["metric_per_case"]}


def structure_names(result: dict) -> List[str]:
    return list(result["structures"])
