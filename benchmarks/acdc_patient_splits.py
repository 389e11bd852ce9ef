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
import os
import re
from pathlib import Path

from nnunetv2.utilities.crossval_split import generate_crossval_split

PATIENT = re.compile(r"patient\d+")


def patient_of(case: str) -> str:
    match = PATIENT.search(case)
    if match is None:
        raise SystemExit(f"case '{case}' has no 'patientNNN' in its name; is this an ACDC dataset?")
    return match.group(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="Dataset502_ACDC", help="dataset folder name")
    args = parser.parse_args()
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        if variable not in os.environ:
            raise SystemExit(f"{variable} is not set; export it as for nnUNetv2_train")
    images = Path(os.environ["nnUNet_raw"]) / args.dataset / "imagesTr"
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    if not cases:
        raise SystemExit(f"no *_0000.nii.gz images in {images}")
    folds = generate_crossval_split(sorted({patient_of(c) for c in cases}), seed=12345, n_splits=5)
    splits = [{part: [c for c in cases if patient_of(c) in set(fold[part])] for part in ("train", "val")}
              for fold in folds]
    target = Path(os.environ["nnUNet_preprocessed"]) / args.dataset / "splits_final.json"
    target.write_text(json.dumps(splits, indent=4))
    print(f"wrote {target}: (train, val) images per fold {[(len(s['train']), len(s['val'])) for s in splits]}")


if __name__ == "__main__":
    main()
