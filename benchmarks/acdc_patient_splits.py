"""Writes patient-grouped 5-fold splits for Dataset502_ACDC into nnUNet_preprocessed.

Each ACDC patient contributes two training images (end-diastole and end-systole frames).
nnU-Net's default split shuffles images, so the two frames of one patient can land on both
sides of a fold and validation Dice is inflated. This script runs nnU-Net's own
``generate_crossval_split`` (seed 12345, as nnU-Net does) over patients instead and keeps both
frames of a patient in the same fold. Run it after ``nnUNetv2_plan_and_preprocess`` and before
training: python benchmarks/acdc_patient_splits.py [--dataset Dataset502_ACDC]
"""

from __future__ import annotations

import argparse
import json
import re

from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunetv2_proto.environment import SetupError, require_nnunet_folders, resolve_dataset_name

PATIENT = re.compile(r"patient\d+")


def patient_of(case: str) -> str:
    match = PATIENT.search(case)
    if match is None:
        raise SystemExit(f"case '{case}' has no 'patientNNN' in its name; is this an ACDC dataset?")
    return match.group(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="Dataset502_ACDC", help="dataset id or folder name")
    args = parser.parse_args()
    try:
        folders = require_nnunet_folders(("nnUNet_raw", "nnUNet_preprocessed"))
        dataset = resolve_dataset_name(args.dataset)
    except SetupError as error:
        raise SystemExit(str(error))
    raw = folders["nnUNet_raw"] / dataset
    image_suffix = "_0000" + json.loads((raw / "dataset.json").read_text())["file_ending"]
    cases = sorted(p.name[: -len(image_suffix)] for p in (raw / "imagesTr").glob(f"*{image_suffix}"))
    if not cases:
        raise SystemExit(f"no *{image_suffix} images in {raw / 'imagesTr'}")
    patient = {case: patient_of(case) for case in cases}
    folds = generate_crossval_split(sorted(set(patient.values())), seed=12345, n_splits=5)
    splits = []
    for fold in folds:
        val_patients = set(fold["val"])
        splits.append({"train": [c for c in cases if patient[c] not in val_patients],
                       "val": [c for c in cases if patient[c] in val_patients]})
    target = folders["nnUNet_preprocessed"] / dataset / "splits_final.json"
    target.write_text(json.dumps(splits, indent=4))
    print(f"wrote {target}: (train, val) images per fold {[(len(s['train']), len(s['val'])) for s in splits]}")


if __name__ == "__main__":
    main()
