"""Writing labelled-case lists from nnU-Net's cross-validation splits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name
from nnunetv2_proto.semi.labeled_subset import (LABELED_LIST_FILE, grouped_labeled_subset, seeded_labeled_subset,
                                                write_labeled_list)


def crossval_splits(preprocessed_dataset: Path) -> list:
    """nnU-Net's splits_final.json; created exactly as nnU-Net would (seed 12345, 5 folds) if missing."""
    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.is_file():
        return json.loads(splits_file.read_text())
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    cases = sorted(p.name[:-4] for p in preprocessed_dataset.glob("*/*.pkl"))
    if not cases:
        raise SetupError(f"no preprocessed cases under {preprocessed_dataset}",
                         "preprocess the dataset (nnUNetv2_plan_and_preprocess / nnunetv2-proto plan-cpu) first")
    splits = generate_crossval_split(sorted(set(cases)), seed=12345, n_splits=5)
    splits_file.write_text(json.dumps(splits, indent=4))
    return splits


def make_labeled_list(dataset: str, folds: Sequence[int], count: int, group_pattern: Optional[str], seed: int,
                      output: Optional[str], replace: bool) -> Path:
    folders = require_nnunet_folders(("nnUNet_preprocessed",))
    name = resolve_dataset_name(dataset)
    base = folders["nnUNet_preprocessed"] / name
    if group_pattern is not None:
        try:
            re.compile(group_pattern)
        except re.error as error:
            raise SetupError(f"--group-by '{group_pattern}' is not a valid regular expression ({error})",
                             "pass a Python regular expression, e.g. --group-by 'patient\\d+'") from None
    if count < 1:
        raise SetupError(f"-n {count}: at least one labelled case (or group) is needed", "pass -n 1 or more")
    out = Path(output) if output else base / LABELED_LIST_FILE
    if out.is_dir():
        raise SetupError(f"--out {out} is a folder", "give a file name, e.g. --out labeled_cases.json")
    if not out.parent.is_dir():
        raise SetupError(f"the folder of --out {out} does not exist", f"create it first (mkdir -p {out.parent})")
    if out.exists() and not replace:
        raise SetupError(f"{out} already exists", "pass --replace to overwrite it, or --out for another file")
    splits = crossval_splits(base)
    per_fold = {}
    for fold in folds:
        if not 0 <= fold < len(splits):
            raise SetupError(f"fold {fold} does not exist (the splits have folds 0 to {len(splits) - 1})",
                             "pick existing folds")
        training = splits[fold]["train"]
        per_fold[fold] = (grouped_labeled_subset(training, count, group_pattern, seed + fold) if group_pattern
                          else seeded_labeled_subset(training, count, seed + fold))
    unit = f"{count} groups matching '{group_pattern}'" if group_pattern else f"{count} cases"
    write_labeled_list(out, per_fold, note=f"{unit} per fold, seed {seed} + fold, from splits_final.json")
    return out
