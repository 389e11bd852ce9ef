"""``nnunetv2-proto evaluate``: per-case, per-structure Dice, IoU, HD95 and ASD for a prediction folder.

Files are read with nnU-Net's own reader/writer classes (any format nnU-Net reads), so
the spacing comes from the image headers in nnU-Net's axis order. Structures are the
dataset's labels, or its regions for region-based datasets (as nnU-Net evaluates them);
without a dataset.json they are the labels found in the references. Voxels carrying the
ignore label in the reference are set to background in both masks.

Nothing is scored that is not what it claims to be. Each of these is an error naming the file
(``EvaluationPolicy`` holds the switches a user may turn):
- a reference without a prediction (``allow_missing``, nnU-Net's ``--chill``) or a prediction
  without a reference (``allow_extra``);
- a file that cannot be read, a truncated gzip stream, a dangling link;
- a shape, spacing, origin or direction that differs from the reference's beyond
  ``geometry_tolerance`` (None: not compared);
- values that are not finite integers, or labels the dataset does not define.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.evaluation.metrics import METRICS, structure_metrics

Structure = Tuple[int, ...]
CONVENTIONS = ("Dice/IoU: both masks empty -> 1, one empty -> 0. HD95/ASD (medpy definitions, mm): both empty -> 0, "
               "one empty -> image diagonal in mm. HD95 = 95th percentile of pooled directed surface distances; "
               "ASD = mean distance from prediction surface to reference surface.")
# bump when a metric's definition or an input check changes: cached results of another version are recomputed
METRICS_VERSION = 2
GEOMETRY_KEYS = ("spacing", "origin", "direction", "original_affine", "reoriented_affine")


@dataclass(frozen=True)
class EvaluationPolicy:
    """What ``evaluate`` lets through; the defaults refuse anything that would be scored wrongly."""

    allow_missing: bool = False
    allow_extra: bool = False
    # relative for spacing, absolute (mm, direction cosines) for origin and direction
    geometry_tolerance: Optional[float] = 1e-3

    def as_dict(self) -> dict:
        return {"allow_missing": self.allow_missing, "allow_extra": self.allow_extra,
                "geometry_tolerance": self.geometry_tolerance}


def load_dataset_json(path: Path) -> dict:
    """A dataset.json with a ``labels`` mapping, or a SetupError saying what is wrong with it."""
    fix = "pass the dataset.json of the dataset these images belong to (nnUNet_raw/<dataset>/dataset.json)"
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"--dataset-json {path} does not exist or is not a file", fix)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SetupError(f"--dataset-json {path} is not readable JSON ({error})", fix) from None
    if not isinstance(content, dict) or not isinstance(content.get("labels"), dict) or not content["labels"]:
        raise SetupError(f"--dataset-json {path} has no 'labels' mapping (name -> label value)", fix)
    return content


def _reader(file_ending: str, dataset_json: Optional[dict], example: Path):
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                          determine_reader_writer_from_file_ending)
    try:
        if dataset_json is not None:
            return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()
        return determine_reader_writer_from_file_ending(file_ending, str(example), verbose=False)()
    except RuntimeError as error:
        raise SetupError(f"nnU-Net has no reader for {example} ({error})",
                         "give images in a format nnU-Net reads, with the dataset's file ending") from None


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


def defined_label_values(dataset_json: dict) -> Set[int]:
    """Every value a segmentation of this dataset may hold (background, labels, region members, ignore)."""
    values = {0}
    for value in dataset_json["labels"].values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else (value,)))
    values.update(int(v) for v in dataset_json.get("regions_class_order") or ())
    return values


def check_stream_complete(path: Path) -> None:
    """A truncated .gz can still be decoded up to the cut by some readers; read the stream to its end."""
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise SetupError(f"{path} is damaged or truncated ({error})",
                         "re-export or re-copy this file (nnUNetv2_predict writes complete files)") from None


def check_floating_point_storage(path: Path) -> None:
    """A mask stored as floating point is checked from the file itself: ITK's NIfTI reader (and so nnU-Net's
    readers) turns NaN into 0, which would score a broken mask as background."""
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel
        image = nibabel.load(str(path))
        if np.issubdtype(image.get_data_dtype(), np.floating):
            integer_labels(np.asanyarray(image.dataobj), path)
        return
    import SimpleITK as sitk
    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    try:
        header.ReadImageInformation()
    except RuntimeError:
        return  # a format SimpleITK does not read; nnU-Net's reader decides
    if "float" in sitk.GetPixelIDValueAsString(header.GetPixelID()):
        integer_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), path)


def read_segmentation(reader, path: Path) -> Tuple[np.ndarray, dict]:
    if not path.is_file():
        what = "is a dangling link" if path.is_symlink() else "does not exist"
        raise SetupError(f"{path} {what}", "point at an existing segmentation file")
    if not os.access(path, os.R_OK):
        raise SetupError(f"{path} is not readable", "fix its permissions (chmod +r)")
    check_stream_complete(path)
    try:
        check_floating_point_storage(path)
        array, properties = reader.read_seg(str(path))
    except SetupError:
        raise
    except Exception as error:  # the readers raise anything from RuntimeError to struct.error
        raise SetupError(f"{path} cannot be read as a segmentation ({type(error).__name__}: {error})",
                         "pass label maps in a format nnU-Net reads") from None
    return array[0], properties


def integer_labels(array: np.ndarray, path: Path) -> Set[int]:
    """The label values of a label map; a SetupError for NaN, infinite or fractional values."""
    if not np.isfinite(array).all():
        raise SetupError(f"{path} contains NaN or infinite values", "pass an integer label map, not an image")
    values = np.unique(array)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise SetupError(f"{path} contains non-integer values (e.g. {fractional[:3].tolist()}): it is not a label "
                         "map", "pass the segmentation, not an intensity image or probabilities")
    return set(values.astype(np.int64).tolist())


def check_label_values(array: np.ndarray, allowed: Set[int], path: Path) -> None:
    unknown = sorted(integer_labels(array, path) - allowed)
    if unknown:
        raise SetupError(f"{path} contains labels {unknown[:10]} that the dataset does not define "
                         f"(defined: {sorted(allowed)})",
                         "check that prediction and --dataset-json belong to the same dataset")


def _geometry(properties: dict) -> Dict[str, np.ndarray]:
    found: Dict[str, np.ndarray] = {}

    def visit(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value)
            elif key in GEOMETRY_KEYS and key not in found:
                found[key] = np.asarray(value, dtype=float)
    visit(properties)
    return found


def check_geometry(reference: dict, prediction: dict, tolerance: Optional[float], path: Path) -> None:
    if tolerance is None:
        return
    ours, theirs = _geometry(prediction), _geometry(reference)
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        relative = key == "spacing"
        same = a.shape == b.shape and np.allclose(a, b, rtol=tolerance if relative else 0,
                                                  atol=0 if relative else tolerance)
        if not same:
            raise SetupError(f"{path} has {key} {np.round(a, 5).tolist()} but its reference has "
                             f"{np.round(b, 5).tolist()}",
                             "evaluate predictions written for these reference images (nnUNetv2_predict keeps the "
                             "input geometry), or pass --geometry-tolerance to accept the difference")


@dataclass(frozen=True)
class CaseJob:
    reference_file: str
    prediction_file: str
    structures: Dict[str, Structure]
    ignore_label: Optional[int]
    allowed_labels: Set[int]
    geometry_tolerance: Optional[float]


def evaluate_case(job: CaseJob, reader) -> dict:
    reference_path, prediction_path = Path(job.reference_file), Path(job.prediction_file)
    reference, reference_properties = read_segmentation(reader, reference_path)
    prediction, prediction_properties = read_segmentation(reader, prediction_path)
    if reference.shape != prediction.shape:
        raise SetupError(f"{prediction_path} has shape {prediction.shape} but its reference {reference_path} has "
                         f"{reference.shape}", "evaluate predictions made for these exact reference images")
    check_geometry(reference_properties, prediction_properties, job.geometry_tolerance, prediction_path)
    check_label_values(reference, job.allowed_labels, reference_path)
    check_label_values(prediction, job.allowed_labels, prediction_path)
    spacing = [float(s) for s in reference_properties["spacing"]][-reference.ndim:]
    valid = np.ones(reference.shape, dtype=bool) if job.ignore_label is None else reference != job.ignore_label
    metrics = {name: structure_metrics(np.isin(reference, labels) & valid, np.isin(prediction, labels) & valid,
                                       spacing).as_dict()
               for name, labels in job.structures.items()}
    return {"case": reference_path.name, "reference_file": job.reference_file,
            "prediction_file": job.prediction_file, "spacing": spacing, "metrics": metrics}


def _evaluate_case_star(args: Tuple[CaseJob, object]) -> dict:
    return evaluate_case(*args)


def summarise(cases: Sequence[dict], structures: Sequence[str]) -> dict:
    mean, std = {}, {}
    for name in structures:
        mean[name] = {m: float(np.mean([c["metrics"][name][m] for c in cases])) for m in METRICS}
        std[name] = {m: float(np.std([c["metrics"][name][m] for c in cases])) for m in METRICS}
    foreground = {m: float(np.mean([mean[n][m] for n in structures])) for m in METRICS}
    return {"mean": mean, "std": std, "foreground_mean": foreground}


def segmentation_files(folder: Path, file_ending: str, role: str) -> Dict[str, Path]:
    """Case file name -> path for every ``*file_ending`` entry (dangling links included, so they are reported)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SetupError(f"the {role} folder {folder} does not exist or is not a folder",
                         f"pass an existing folder of {role} segmentations")
    try:
        return {p.name: p for p in sorted(folder.iterdir()) if p.name.endswith(file_ending) and not p.is_dir()}
    except PermissionError:
        raise SetupError(f"the {role} folder {folder} cannot be listed", "fix its permissions") from None


def match_cases(references: Dict[str, Path], predictions: Dict[str, Path], policy: EvaluationPolicy,
                expected: Optional[Iterable[str]], file_ending: str, prediction_folder: Path) -> Tuple[List[str], dict]:
    """The cases to score and what was left out, under the policy's rules."""
    wanted = set(references) if expected is None else {f"{c}{file_ending}" for c in expected}
    unknown_expected = sorted(wanted - set(references))
    if unknown_expected:
        raise SetupError(f"{len(unknown_expected)} expected case(s) have no reference: {unknown_expected[:5]}",
                         "use the reference folder of the same dataset")
    missing = sorted(wanted - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing and not policy.allow_missing:
        raise SetupError(f"{len(missing)} case(s) have no prediction in {prediction_folder}: {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""),
                         "predict every case, or pass --chill (nnU-Net's flag) to score only the predicted ones")
    if extra and not policy.allow_extra:
        raise SetupError(f"{len(extra)} prediction(s) in {prediction_folder} have no reference: {extra[:5]}",
                         "use the reference folder of the same dataset, or pass --allow-extra to skip them")
    cases = sorted((wanted & set(predictions)))
    if not cases:
        raise SetupError(f"no '*{file_ending}' prediction in {prediction_folder} matches a reference",
                         "point --pred at a folder written by nnUNetv2_predict for this dataset")
    return cases, {"missing_predictions": missing, "skipped_extra_predictions": extra}


def prepare_output_file(output_file: Path) -> Path:
    """Check (before any scoring) that a result can be written to ``output_file``."""
    output_file = Path(output_file)
    if output_file.is_dir():
        raise SetupError(f"--out {output_file} is a folder", "give a file name, e.g. --out results.json")
    try:
        output_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SetupError(f"cannot create the folder of --out {output_file} ({error.strerror})",
                         "choose an output path in a writable folder") from None
    if not os.access(output_file.parent, os.W_OK) or (output_file.exists() and not os.access(output_file, os.W_OK)):
        raise SetupError(f"--out {output_file} is not writable", "choose an output path in a writable folder")
    return output_file


def evaluate_folders(reference_folder: Path, prediction_folder: Path, dataset_json_file: Optional[Path] = None,
                     output_file: Optional[Path] = None, num_processes: int = 2,
                     file_ending: Optional[str] = None, policy: EvaluationPolicy = EvaluationPolicy(),
                     expected_cases: Optional[Iterable[str]] = None) -> dict:
    """Score every prediction against its reference; ``expected_cases`` (names without ending) narrows the
    references that need a prediction (a cross-validation fold), by default all of them."""
    if output_file is not None:
        output_file = prepare_output_file(output_file)
    dataset_json = load_dataset_json(dataset_json_file) if dataset_json_file else None
    file_ending = file_ending or (dataset_json.get("file_ending") if dataset_json else None) or ".nii.gz"
    references = segmentation_files(reference_folder, file_ending, "reference")
    predictions = segmentation_files(prediction_folder, file_ending, "prediction")
    if not predictions:
        raise SetupError(f"no '*{file_ending}' predictions in {prediction_folder}",
                         "point --pred at a folder written by nnUNetv2_predict (or pass the right file ending)")
    cases, left_out = match_cases(references, predictions, policy, expected_cases, file_ending, prediction_folder)
    reader = _reader(file_ending, dataset_json, references[cases[0]])
    if dataset_json is not None:
        structures, ignore_label = structures_from_dataset_json(dataset_json)
        allowed = defined_label_values(dataset_json)
    else:
        found: Set[int] = {0}
        for case in cases:
            found |= integer_labels(read_segmentation(reader, references[case])[0], references[case])
        structures, ignore_label, allowed = {str(v): (v,) for v in sorted(found - {0})}, None, found
    jobs = [(CaseJob(str(references[c]), str(predictions[c]), structures, ignore_label, allowed,
                     policy.geometry_tolerance), reader) for c in cases]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            results = pool.map(_evaluate_case_star, jobs)
    else:
        results = [evaluate_case(*job) for job in jobs]
    result = {"structures": {k: list(v) for k, v in structures.items()}, "conventions": CONVENTIONS,
              "policy": policy.as_dict(), **left_out, "metric_per_case": results,
              **summarise(results, list(structures))}
    if output_file is not None:
        output_file.write_text(json.dumps(result, indent=2))
    return result

