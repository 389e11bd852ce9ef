"""Finding a comparison's runs in nnU-Net's results layout and scoring them, with a cache that cannot go stale.

A run is one trained model's predictions: a fold of a trainer, or a fold of one seed of a
trainer (``<Trainer>_seed<N>``, see ``nnunetv2_proto.training.seeding``), or a trainer's
predictions on an external test set. Scores are cached per run; the cache key is everything
that determines them (every segmentation file's name, size and modification time, the
dataset.json, the evaluation policy, the cases expected, ``METRICS_VERSION``), and the cache
lives next to the predictions when that folder is writable, in the user's cache folder when
it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_proto.environment import SetupError, require_nnunet_folders
from nnunetv2_proto.evaluation.evaluate import (METRICS_VERSION, EvaluationPolicy, evaluate_folders,
                                                load_dataset_json)
from nnunetv2_proto.evaluation.metrics import METRICS
from nnunetv2_proto.training.seeding import seeded_name

MEAN = "mean of structures"  # the per-case average over structures
CACHE_NAME = ".nnunetv2_proto_metrics.json"
RunKey = Tuple[Optional[int], Optional[int]]  # (fold, seed): what pairs a run with the baseline's


@dataclass(frozen=True)
class RunSource:
    trainer: str                  # as reported: the trainer without its seed suffix
    folder_trainer: str           # the name the run was trained under
    fold: Optional[int]
    seed: Optional[int]
    predictions: Path             # for a run from an earlier comparison: that comparison.json
    references: Path
    expected_cases: Optional[Tuple[str, ...]] = None
    from_earlier_comparison: bool = False

    @property
    def key(self) -> RunKey:
        return self.fold, self.seed

    @property
    def label(self) -> str:
        return run_label(self.key)


def run_label(key: RunKey) -> str:
    fold, seed = key
    parts = ([] if fold is None else [f"fold {fold}"]) + ([] if seed is None else [f"seed {seed}"])
    return " ".join(parts) or "test set"


_RUN_LABEL = re.compile(r"(?:fold (?P<fold>\d+))? ?(?:seed (?P<seed>\d+))?")


def parse_run_label(label: str) -> Optional[RunKey]:
    """The inverse of ``run_label``; None for a label it does not write."""
    if label == "test set":
        return None, None
    match = _RUN_LABEL.fullmatch(label)
    if not match or not label:
        return None
    return tuple(None if match.group(part) is None else int(match.group(part)) for part in ("fold", "seed"))


@dataclass
class RunScores:
    source: RunSource
    # metric -> structure (incl. MEAN) -> case -> value
    values: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)


def _validation_cases(preprocessed: Path, dataset: str, fold: int) -> Optional[Tuple[str, ...]]:
    splits_file = preprocessed / dataset / "splits_final.json"
    if not splits_file.is_file():
        return None
    splits = json.loads(splits_file.read_text())
    return tuple(splits[fold]["val"]) if 0 <= fold < len(splits) else None


def find_runs(dataset: str, configuration: str, trainers: Sequence[str], plans: str, folds: Sequence[int],
              seeds: Sequence[int], test_gt: Optional[Path], test_pred_root: Optional[Path],
              provided: Sequence[Tuple[str, RunKey]] = ()) -> Tuple[List[RunSource], List[str]]:
    """Every requested run that exists, and a line for each one that does not. ``provided``: (trainer, run key)
    pairs that come from earlier comparisons (``earlier_runs``), so not looked for here."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
    runs, missing = [], []
    seed_options: List[Optional[int]] = list(seeds) or [None]
    if test_gt is not None:
        for trainer in trainers:
            for seed in seed_options:
                if (trainer, (None, seed)) in provided:
                    continue
                name = trainer if seed is None else seeded_name(trainer, seed)
                folder = Path(test_pred_root) / name
                if folder.is_dir() and any(folder.iterdir()):
                    runs.append(RunSource(trainer, name, None, seed, folder, Path(test_gt)))
                else:
                    missing.append(f"{name}: no test predictions in {folder}")
        return runs, missing
    folders = require_nnunet_folders(("nnUNet_preprocessed", "nnUNet_results"))
    references = folders["nnUNet_preprocessed"] / dataset / "gt_segmentations"
    if not references.is_dir():
        raise SetupError(f"{references} does not exist", f"preprocess {dataset} with nnU-Net first")
    for trainer in trainers:
        for seed in seed_options:
            name = trainer if seed is None else seeded_name(trainer, seed)
            base = folders["nnUNet_results"] / dataset / convert_trainer_plans_config_to_identifier(
                name, plans, configuration)
            if all((trainer, (fold, seed)) in provided for fold in folds):
                continue
            if not base.is_dir():
                missing.append(f"{name}: no results folder {base}")
                continue
            for fold in folds:
                if (trainer, (fold, seed)) in provided:
                    continue
                validation = base / f"fold_{fold}" / "validation"
                if (validation / "summary.json").is_file():
                    runs.append(RunSource(trainer, name, fold, seed, validation, references,
                                          _validation_cases(folders["nnUNet_preprocessed"], dataset, fold)))
                else:
                    missing.append(f"{name}: fold {fold} has no finished validation ({validation})")
    return runs, missing


def _read_earlier_comparison(path: Path) -> dict:
    not_one = SetupError(f"{path} is not a comparison.json written by nnunetv2-proto compare",
                         "pass the comparison.json of an earlier compare --out folder")
    try:
        content = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SetupError(f"--earlier {path} does not exist", "pass the comparison.json of an earlier compare") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise not_one from None
    if not isinstance(content, dict) or not {"dataset", "configuration", "runs", "per_case"} <= set(content):
        raise not_one
    return content


def earlier_runs(files: Sequence[Path], dataset: str, configuration: str, trainers: Sequence[str],
                 folds: Sequence[int], seeds: Sequence[int], test_set: bool) -> Tuple[List[RunScores], List[dict]]:
    """Runs known only from the per-case scores of earlier comparisons, e.g. a run whose predictions were lost
    with a machine. A file's runs come from its per-run scores (``per_run``, written since compare stores them),
    so one comparison of several seeds can stand in for any of them; a file without them counts only if it held
    one run (its pooled ``per_case`` is then that run's). Returns the requested runs and their training-curve rows.
    """
    scored: List[RunScores] = []
    curve_rows: List[dict] = []
    seen: Dict[Tuple[str, RunKey], Path] = {}

    def requested(key: Optional[RunKey]) -> bool:
        if test_set:
            return key == (None, None)
        return key is not None and key[0] in folds and (key[1] in seeds if seeds else key[1] is None)

    for path in files:
        content = _read_earlier_comparison(path)
        if (content["dataset"], content["configuration"]) != (dataset, configuration):
            raise SetupError(f"--earlier {path} compares {content['dataset']} {content['configuration']}, "
                             f"not {dataset} {configuration}", "pass comparisons of the same dataset and configuration")
        per_run = content.get("per_run")
        if per_run is None:
            if len(content["runs"]) != 1:
                raise SetupError(f"--earlier {path} pools {len(content['runs'])} runs per trainer and was written "
                                 "before compare stored per-run scores, so its per-case scores are not one run's",
                                 "pass a comparison that held one run (one fold, one seed), or compare again")
            per_run = {trainer: {content["runs"][0]: by_metric} for trainer, by_metric in content["per_case"].items()}
        held = [t for t in trainers if t in per_run]
        if not held:
            raise SetupError(f"--earlier {path} has none of the trainers {list(trainers)} "
                             f"(it has {sorted(per_run)})", "add its trainer to -tr, or drop the file")
        taken = [(trainer, label) for trainer in held for label in per_run[trainer]
                 if requested(parse_run_label(label))]
        if not taken:
            raise SetupError(f"--earlier {path} holds the runs {list(content['runs'])}, not among the "
                             "requested ones", "match -f / --seeds (or --test-gt) to the earlier runs, or drop it")
        for trainer, label in taken:
            key = parse_run_label(label)
            if (trainer, key) in seen:
                raise SetupError(f"{trainer} {label} is in both {seen[trainer, key]} and {path}", "pass each run once")
            seen[trainer, key] = path
            source = RunSource(trainer, trainer if key[1] is None else seeded_name(trainer, key[1]), key[0], key[1],
                               Path(path), Path(path), from_earlier_comparison=True)
            scored.append(RunScores(source, {metric: {structure: dict(cases) for structure, cases in by_structure.items()}
                                             for metric, by_structure in per_run[trainer][label].items()}))
            curve_rows += [row for row in content.get("training_curves", [])
                           if row.get("trainer") == trainer and row.get("run", label) == label]
    return scored, curve_rows


def _file_stamps(folder: Path, file_ending: str, names: Optional[set] = None) -> List[Tuple[str, int, int]]:
    stamps = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(file_ending) and (names is None or path.name in names):
            try:
                stat = path.stat()
                stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
            except OSError:  # a dangling link: evaluation reports it
                stamps.append((path.name, -1, -1))
    return stamps


def cache_key(run: RunSource, dataset_json_file: Optional[Path], file_ending: str, policy: EvaluationPolicy) -> str:
    predictions = _file_stamps(run.predictions, file_ending)
    names = {name for name, _, _ in predictions} | {f"{c}{file_ending}" for c in run.expected_cases or ()}
    content = {
        "metrics_version": METRICS_VERSION,
        "predictions": predictions,
        "references": _file_stamps(run.references, file_ending, names),
        "dataset_json": load_dataset_json(dataset_json_file) if dataset_json_file else None,
        "policy": policy.as_dict(),
        "expected_cases": list(run.expected_cases) if run.expected_cases is not None else None,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def cache_file(predictions: Path) -> Path:
    """Next to the predictions if we may write there, else in the user's cache folder."""
    if os.access(predictions, os.W_OK):
        return predictions / CACHE_NAME
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnunetv2_proto" / "metrics"
    return root / (hashlib.sha256(str(predictions.resolve()).encode()).hexdigest()[:24] + ".json")


def evaluate_run(run: RunSource, dataset_json_file: Optional[Path], policy: EvaluationPolicy,
                 num_processes: int) -> dict:
    file_ending = (load_dataset_json(dataset_json_file).get("file_ending") if dataset_json_file else None) \
        or ".nii.gz"
    key = cache_key(run, dataset_json_file, file_ending, policy)
    cache = cache_file(run.predictions)
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("cache_key") == key:
                return cached["result"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass  # unreadable or foreign: recompute
    result = evaluate_folders(run.references, run.predictions, dataset_json_file, None, num_processes, file_ending,
                              policy, run.expected_cases)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"cache_key": key, "result": result}))
    except OSError:
        pass  # a cache we cannot write costs time, not correctness
    return result


def score_runs(runs: Sequence[RunSource], dataset_json_file: Optional[Path], policy: EvaluationPolicy,
               num_processes: int, progress=print) -> Tuple[List[RunScores], List[str], Dict[str, List[str]]]:
    """Scores of every run, the structure names, and per run label what evaluation left out."""
    scored: List[RunScores] = []
    structures: List[str] = []
    left_out: Dict[str, List[str]] = {}
    for index, run in enumerate(runs, start=1):
        progress(f"  evaluating {run.folder_trainer} {run.label} ({index}/{len(runs)})")
        result = evaluate_run(run, dataset_json_file, policy, num_processes)
        structures = list(result["structures"])
        if result.get("missing_predictions"):
            left_out[f"{run.folder_trainer} {run.label}"] = result["missing_predictions"]
        entry = RunScores(run)
        for case in result["metric_per_case"]:
            for metric in METRICS:
                per_structure = {s: case["metrics"][s][metric] for s in structures}
                for s, v in {**per_structure, MEAN: float(np.mean(list(per_structure.values())))}.items():
                    entry.values.setdefault(metric, {}).setdefault(s, {})[case["case"]] = float(v)
        scored.append(entry)
    return scored, structures, left_out
