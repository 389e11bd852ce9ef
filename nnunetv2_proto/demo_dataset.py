"""A synthetic nnU-Net raw dataset with real intra-class variation, for the demo and the tests.

Every foreground class comes in two sub-types that look different (one bright, one dark
or textured), while sub-types of *different* classes share intensities. A linear
classifier with one weight vector per class has to cover two unrelated appearances, which
is the situation both prototype methods target; shape and texture, not intensity alone,
separate the classes. Shapes, positions, a multiplicative bias field and noise are drawn
per case from a seeded generator, so a given ``--seed`` always writes the same files.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_proto.environment import SetupError, dataset_folders

CLASS_NAMES = ("nodule", "vessel", "cyst")
SUBTYPES = {
    "nodule": ("bright_solid", "dark_core_bright_rim"),
    "vessel": ("bright_smooth", "dark_speckled"),
    "cyst": ("intensity_ramp", "checkerboard"),
}
MANIFEST_NAME = "nnunetv2_proto_demo.json"


@dataclass(frozen=True)
class DemoDatasetSpec:
    num_cases: int = 20
    shape_zyx: Tuple[int, int, int] = (20, 40, 40)
    spacing_zyx: Tuple[float, float, float] = (1.5, 1.0, 1.0)
    seed: int = 0
    min_voxels_per_class: int = 30

    def __post_init__(self) -> None:
        if self.num_cases < 5:
            raise SetupError(
                f"--num-cases {self.num_cases} is too small for nnU-Net's 5-fold split",
                "use at least 5 cases (the demo default is 20)",
            )
        if min(self.shape_zyx) < 16:
            raise SetupError(f"volume shape {self.shape_zyx} is too small", "use at least 16 voxels per axis")


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], coarse: Tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std random field that varies on the scale of shape/coarse voxels."""
    low = rng.standard_normal(coarse)
    field = ndimage.zoom(low, [s / c for s, c in zip(shape, coarse)], order=3, mode="reflect")
    field = field[tuple(slice(0, s) for s in shape)]
    return (field - field.mean()) / (field.std() + 1e-8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _ellipsoid(grid: np.ndarray, rng: np.random.Generator, shape: Tuple[int, int, int]) -> np.ndarray:
    centre = np.array([rng.uniform(0.25, 0.75) * s for s in shape])
    radii = rng.uniform(3.8, 7.0, size=3) * np.array([0.7, 1.0, 1.0])
    local = np.einsum("ij,j...->i...", _random_rotation(rng), grid - centre[:, None, None, None])
    return (((local / radii[:, None, None, None]) ** 2).sum(0)) < 1.0


def _tube(grid: np.ndarray, rng: np.random.Generator, shape: Tuple[int, int, int]) -> np.ndarray:
    # a quadratic Bezier curve across the volume; distance to it via a distance transform
    controls = np.array([[rng.uniform(0.15, 0.85) * s for s in shape] for _ in range(3)])
    t = np.linspace(0, 1, 200)[:, None]
    curve = (1 - t) ** 2 * controls[0] + 2 * (1 - t) * t * controls[1] + t ** 2 * controls[2]
    on_curve = np.zeros(shape, dtype=bool)
    idx = np.clip(np.round(curve).astype(int), 0, np.array(shape) - 1)
    on_curve[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    distance = ndimage.distance_transform_edt(~on_curve)
    return distance < rng.uniform(1.9, 3.0)


def _rounded_box(grid: np.ndarray, rng: np.random.Generator, shape: Tuple[int, int, int]) -> np.ndarray:
    centre = np.array([rng.uniform(0.25, 0.75) * s for s in shape])
    half = rng.uniform(3.8, 7.0, size=3) * np.array([0.7, 1.0, 1.0])
    local = np.einsum("ij,j...->i...", _random_rotation(rng), grid - centre[:, None, None, None])
    # superellipsoid with exponent 4: a box with rounded corners
    return ((np.abs(local / half[:, None, None, None]) ** 4).sum(0)) < 1.0


SHAPES: Dict[str, Callable[[np.ndarray, np.random.Generator, Tuple[int, int, int]], np.ndarray]] = {
    "nodule": _ellipsoid,
    "vessel": _tube,
    "cyst": _rounded_box,
}


def _appearance(subtype: str, mask: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity of one object (defined on the whole grid, used inside ``mask``)."""
    if subtype == "bright_solid":
        return np.full(mask.shape, 1.6)
    if subtype == "dark_core_bright_rim":
        depth = ndimage.distance_transform_edt(mask)
        return np.where(depth <= 1.5, 1.5, -0.8)
    if subtype == "bright_smooth":
        return np.full(mask.shape, 1.3)
    if subtype == "dark_speckled":
        return -0.9 + 0.6 * rng.standard_normal(mask.shape)
    if subtype == "intensity_ramp":
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        ramp = np.einsum("i,i...->...", direction, grid)
        inside = ramp[mask]
        return -0.2 + 2.2 * (ramp - inside.min()) / (np.ptp(inside) + 1e-8)
    if subtype == "checkerboard":
        period = int(rng.integers(2, 4))
        cells = (grid // period).astype(int).sum(0) % 2
        return np.where(cells == 1, 1.2, -0.4)
    raise ValueError(f"unknown subtype {subtype}")


def generate_case(spec: DemoDatasetSpec, case_seed: np.random.SeedSequence) -> Tuple[np.ndarray, np.ndarray, Dict[str, List[str]]]:
    """One (image, label, sub-types) triple. Retries shape draws until every class is visible."""
    rng = np.random.default_rng(case_seed)
    shape = spec.shape_zyx
    grid = np.indices(shape).astype(np.float32)
    for _ in range(50):
        label = np.zeros(shape, dtype=np.uint8)
        image = 0.25 * _smooth_field(rng, shape, (3, 4, 4))
        subtypes: Dict[str, List[str]] = {}
        for class_index, name in enumerate(CLASS_NAMES, start=1):
            # usually one object, sometimes a second one of the other sub-type in the same image
            first = int(rng.integers(2))
            picks = [first] if rng.uniform() < 0.6 else [first, 1 - first]
            subtypes[name] = []
            for pick in picks:
                subtype = SUBTYPES[name][pick]
                mask = SHAPES[name](grid, rng, shape)
                image = np.where(mask, _appearance(subtype, mask, grid, rng), image)
                label[mask] = class_index
                subtypes[name].append(subtype)
        counts = np.bincount(label.ravel(), minlength=len(CLASS_NAMES) + 1)
        if counts[1:].min() >= spec.min_voxels_per_class:
            break
    else:
        raise RuntimeError("could not place all demo classes; increase the volume shape")
    bias = np.exp(0.25 * _smooth_field(rng, shape, (2, 2, 2)))
    image = image * bias + 0.2 * rng.standard_normal(shape)
    # an MR-like positive intensity range; nnU-Net z-scores it anyway
    image = (image * 120 + 400).astype(np.float32)
    return image, label, subtypes


def _write_nifti(array: np.ndarray, spacing_zyx: Tuple[float, float, float], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path), useCompression=True)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def write_demo_dataset(raw_root: Path, dataset_id: int = 990, name: str = "ProtoDemo",
                       spec: DemoDatasetSpec = DemoDatasetSpec(), progress: Callable[[str], None] = print) -> Path:
    """Write (or confirm) the demo dataset under ``raw_root``; never overwrites other data.

    If the target folder exists and holds the same demo (same spec), nothing is written.
    Any other content, or another dataset that already uses ``dataset_id``, is an error.
    """
    if not 1 <= dataset_id <= 999:
        raise SetupError(f"dataset id {dataset_id} is outside nnU-Net's range 1-999 (DatasetXXX_Name)",
                         "pass --dataset-id between 1 and 999 that no other dataset uses")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SetupError(f"dataset name '{name}' is not a plain folder name", "use letters, digits, _ . - only "
                         "(no / or spaces), e.g. --name ProtoDemo")
    folder = raw_root / dataset_folder_name(dataset_id, name)
    manifest = {"generator": "nnunetv2_proto.demo_dataset", **asdict(spec)}
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as stored on disk
    other = dataset_folders(raw_root).get(dataset_id)
    if other is not None and other.name != folder.name:
        raise SetupError(
            f"dataset id {dataset_id} is already used by {other}",
            "choose a free id with --dataset-id, or use another nnUNet_raw folder",
        )
    if folder.exists():
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest \
                and len(list((folder / "labelsTr").glob("*.nii.gz"))) == spec.num_cases:
            progress(f"demo dataset already present: {folder}")
            return folder
        raise SetupError(
            f"{folder} already exists and holds a different dataset (or a different demo spec)",
            "pick another --dataset-id / work folder, or delete that folder if it is a stale demo",
        )
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    seeds = np.random.SeedSequence(spec.seed).spawn(spec.num_cases)
    all_subtypes = {}
    for index, case_seed in enumerate(seeds):
        case = f"demo_{index:03d}"
        image, label, subtypes = generate_case(spec, case_seed)
        _write_nifti(image, spec.spacing_zyx, folder / "imagesTr" / f"{case}_0000.nii.gz")
        _write_nifti(label, spec.spacing_zyx, folder / "labelsTr" / f"{case}.nii.gz")
        all_subtypes[case] = subtypes
        progress(f"  demo case {index + 1}/{spec.num_cases}: {case}")
    dataset_json = {
        "channel_names": {"0": "synthetic_MR"},
        "labels": {"background": 0, **{n: i for i, n in enumerate(CLASS_NAMES, start=1)}},
        "numTraining": spec.num_cases,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic nnunetv2-proto demo: 3 classes, 2 visually distinct sub-types each",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (folder / "subtypes.json").write_text(json.dumps(all_subtypes, indent=2))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return folder
