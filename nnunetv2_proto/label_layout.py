"""How a network's K output channels relate to mutually exclusive classes.

nnU-Net trains either with softmax over K labels (background is channel 0) or with K
sigmoid regions that may overlap (no background channel). Both prototype heads need
*exclusive* classes: SIPL's pseudo masks are a softmax over clusters' classes and MPER's
prototypes each belong to one class. ``LabelLayout`` defines them:

- softmax layout: the K labels themselves;
- region layout: K+1 classes, where class 0 is background and class c (1..K) is
  "the last region, in nnU-Net's ``regions_class_order``, that contains the voxel" -- the
  same rule nnU-Net uses to turn region predictions into a label map. A 0/1 membership
  matrix R (K+1 x K) says which exclusive classes make up each region, so region
  probabilities are ``p_excl @ R``.

The layout is derived from nnU-Net's label manager in the trainer, stored in the
configuration's plans entry (so ``nnUNetv2_predict`` rebuilds the same network), and
turned back into tensors here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from nnunetv2_proto.environment import SetupError


@dataclass(frozen=True)
class LabelLayout:
    num_outputs: int
    # (K+1) x K membership of exclusive classes in regions; None for softmax layouts
    region_membership: Optional[Tuple[Tuple[int, ...], ...]] = None
    # softmax: the label value to ignore; regions: whether the target's last channel is an ignore mask
    ignore_label: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_outputs < 1:
            raise SetupError(f"a head needs at least one output channel, got {self.num_outputs}",
                             "check the dataset's labels in dataset.json")
        if self.region_membership is None and self.num_outputs < 2:
            raise SetupError("a softmax label layout needs background plus at least one class",
                             "add a foreground label to dataset.json")
        if self.region_membership is not None:
            rows = len(self.region_membership)
            if rows != self.num_outputs + 1 or any(len(r) != self.num_outputs for r in self.region_membership):
                raise ValueError("region_membership must be (K+1) x K")
            if any(not any(r[k] for r in self.region_membership) for k in range(self.num_outputs)):
                raise SetupError(
                    "a region of this dataset contains none of the labels listed in regions_class_order, so no "
                    "exclusive class can represent it and the prototype heads cannot serve this label layout",
                    "make regions_class_order in dataset.json name, for each region, a label inside that region",
                )

    @property
    def has_regions(self) -> bool:
        return self.region_membership is not None

    @property
    def num_exclusive(self) -> int:
        return self.num_outputs + 1 if self.has_regions else self.num_outputs

    # --- construction and serialisation -------------------------------------------------
    @classmethod
    def from_label_manager(cls, label_manager) -> "LabelLayout":
        """From nnU-Net's LabelManager (what the trainer holds)."""
        k = label_manager.num_segmentation_heads
        if not label_manager.has_regions:
            return cls(num_outputs=k, ignore_label=label_manager.ignore_label)
        regions = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in label_manager.foreground_regions]
        order = label_manager.regions_class_order
        if order is None or len(order) != len(regions):
            raise SetupError(
                "this region-based dataset has no regions_class_order with one label per region",
                "add regions_class_order to dataset.json (nnU-Net needs it for region training anyway)",
            )
        membership = [[0] * k] + [[int(order[c] in regions[r]) for r in range(k)] for c in range(k)]
        return cls(num_outputs=k, region_membership=tuple(tuple(row) for row in membership),
                   ignore_label=label_manager.ignore_label)

    def to_dict(self) -> dict:
        return {
            "num_outputs": self.num_outputs,
            "region_membership": None if self.region_membership is None else [list(r) for r in self.region_membership],
            "ignore_label": self.ignore_label,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LabelLayout":
        membership = data.get("region_membership")
        return cls(num_outputs=int(data["num_outputs"]),
                   region_membership=None if membership is None else tuple(tuple(int(v) for v in r) for r in membership),
                   ignore_label=data.get("ignore_label"))

    def membership_tensor(self) -> torch.Tensor:
        """(K_excl, K) float matrix; the identity for softmax layouts."""
        if self.region_membership is None:
            return torch.eye(self.num_outputs)
        return torch.tensor(self.region_membership, dtype=torch.float32)

    # --- targets ------------------------------------------------------------------------
    def exclusive_target(self, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """nnU-Net's training target -> (exclusive class index (B, *spatial) long, valid mask (B, *spatial) bool).

        Softmax targets are (B, 1, *spatial) label maps, possibly holding the ignore label.
        Region targets are (B, K[+1], *spatial) 0/1 maps; the optional last channel marks
        ignored voxels.
        """
        if not self.has_regions:
            labels = target[:, 0].long()
            if self.ignore_label is None:
                return labels, torch.ones_like(labels, dtype=torch.bool)
            valid = labels != self.ignore_label
            return torch.where(valid, labels, torch.zeros_like(labels)), valid
        regions = target[:, : self.num_outputs] > 0
        order = torch.arange(1, self.num_outputs + 1, device=target.device).view(1, -1, *([1] * (target.ndim - 2)))
        labels = (regions * order).amax(1).long()
        if self.ignore_label is not None:
            valid = target[:, self.num_outputs] == 0
        else:
            valid = torch.ones_like(labels, dtype=torch.bool)
        return labels, valid

    # --- probabilities --------------------------------------------------------------------
    def output_probabilities_from_exclusive(self, exclusive_probabilities: torch.Tensor) -> torch.Tensor:
        """(B, K_excl, ...) exclusive-class probabilities -> (B, K, ...) probabilities of the output channels."""
        if not self.has_regions:
            return exclusive_probabilities
        membership = self.membership_tensor().to(exclusive_probabilities)
        return torch.einsum("bc...,ck->bk...", exclusive_probabilities, membership)

    def output_probabilities_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What nnU-Net's inference nonlinearity does: softmax for labels, sigmoid for regions."""
        return torch.sigmoid(logits) if self.has_regions else torch.softmax(logits, 1)

    def logits_from_output_probabilities(self, probabilities: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Logits that nnU-Net's nonlinearity maps back to ``probabilities`` (log for softmax, logit for sigmoid)."""
        p = probabilities.clamp(eps, 1 - eps)
        return torch.log(p / (1 - p)) if self.has_regions else torch.log(p)


def full_resolution(target):
    """nnU-Net's training target at full resolution (the first entry under deep supervision)."""
    return target[0] if isinstance(target, (list, tuple)) else target


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *spatial) long -> (B, C, *spatial) one-hot, channel-first like nnU-Net."""
    out = torch.zeros((labels.shape[0], num_classes, *labels.shape[1:]), dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), 1)


def downsample_labels(labels: torch.Tensor, valid: torch.Tensor, size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour resize of a label map and its valid mask or voxel weights, as nnU-Net
    downsamples deep-supervision targets; ``valid`` keeps its dtype (bool mask or float weights)."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels, valid
    stacked = torch.stack((labels.float(), valid.float()), 1)
    resized = torch.nn.functional.interpolate(stacked, size=tuple(size), mode="nearest-exact")
    return resized[:, 0].long(), resized[:, 1].to(valid.dtype)
