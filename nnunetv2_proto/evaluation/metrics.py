"""Overlap and surface metrics for one binary structure, in millimetres.

Surface metrics follow medpy's definitions, which the LA and ACDC papers of this field
report: the surface of a mask is the mask minus its erosion (face connectivity);
HD95 is the 95th percentile of the pooled directed surface distances (prediction ->
reference and reference -> prediction); ASD is the mean distance from the prediction's
surface to the reference's surface. Distances come from scipy's Euclidean distance
transform with the voxel spacing, computed only inside the bounding box of both masks
(the nearest reference surface point of any prediction surface point lies inside it),
which keeps a 512x512x200 CT case to seconds per structure (benchmarks/evaluation_speed.py).

Empty masks (documented convention, never NaN):
- both empty: Dice = IoU = 1, HD95 = ASD = 0 (perfect agreement about absence);
- exactly one empty: Dice = IoU = 0, HD95 = ASD = the image diagonal in mm (the largest
  distance possible in the image), so a missed or hallucinated structure is penalised
  and means stay finite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np
from scipy import ndimage

METRICS = ("Dice", "IoU", "HD95", "ASD")


@dataclass(frozen=True)
class StructureMetrics:
    Dice: float
    IoU: float
    HD95: float
    ASD: float
    reference_voxels: int
    prediction_voxels: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape) * np.asarray(spacing, dtype=float)) ** 2)))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def directed_surface_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``source`` to the surface of ``target`` (both non-empty)."""
    union = source | target
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(union))
    source_surface = _surface(source[box])
    target_surface = _surface(target[box])
    distance_to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    return distance_to_target[source_surface]


def structure_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> StructureMetrics:
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {reference.ndim}D image")
    n_ref, n_pred = int(reference.sum()), int(prediction.sum())
    if n_ref == 0 and n_pred == 0:
        return StructureMetrics(1.0, 1.0, 0.0, 0.0, 0, 0)
    if n_ref == 0 or n_pred == 0:
        worst = image_diagonal_mm(reference.shape, spacing)
        return StructureMetrics(0.0, 0.0, worst, worst, n_ref, n_pred)
    intersection = int((reference & prediction).sum())
    dice = 2 * intersection / (n_ref + n_pred)
    iou = intersection / (n_ref + n_pred - intersection)
    pred_to_ref = directed_surface_distances(prediction, reference, spacing)
    ref_to_pred = directed_surface_distances(reference, prediction, spacing)
    hd95 = float(np.percentile(np.concatenate((pred_to_ref, ref_to_pred)), 95))
    return StructureMetrics(dice, iou, hd95, float(pred_to_ref.mean()), n_ref, n_pred)
