"""Losses of the prototype heads, on exclusive-class targets (see ``label_layout``).

All losses are means over samples (Dice per sample and class, cross-entropy per voxel),
never batch statistics across ranks, so that DDP's gradient average equals one process
on the whole batch. ``valid`` is a boolean mask (False: nnU-Net's ignore label) or a float
voxel weight map (copy-paste batches weight pseudo-labelled voxels less); weight-0 voxels
contribute nothing.
Absent classes and empty masks give finite values: the Dice smoothing term keeps every
ratio defined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch.nn import functional as F

from nnunetv2_proto.blockwise_losses import softmax_consistency
from nnunetv2_proto.label_layout import downsample_labels, full_resolution, one_hot


class VoxelTarget(NamedTuple):
    """The full-resolution exclusive-class target of one training step, built once and shared by every loss
    and prototype update of that step."""
    labels: torch.Tensor                        # (B, *s) exclusive class per voxel
    weights: torch.Tensor                       # (B, *s) bool valid mask, or float loss weight (0: nothing)
    update_mask: Optional[torch.Tensor] = None  # voxels allowed to move prototypes; None: every valid voxel
    from_unlabeled: Optional[torch.Tensor] = None  # voxels pasted from unlabelled patches (pseudo labels)

    @property
    def valid(self) -> torch.Tensor:
        return self.weights if self.weights.dtype == torch.bool else self.weights > 0

    @classmethod
    def from_nnunet_target(cls, layout, target) -> "VoxelTarget":
        """nnU-Net's (possibly deep-supervised) training target -> exclusive classes and the ignore mask."""
        labels, valid = layout.exclusive_target(full_resolution(target))
        return cls(labels, valid)


def as_voxel_target(layout, target: Union[VoxelTarget, torch.Tensor, list]) -> VoxelTarget:
    return target if isinstance(target, VoxelTarget) else VoxelTarget.from_nnunet_target(layout, target)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice (every class, background included) + cross-entropy; logits (B, C, *s), labels/valid (B, *s)."""
    log_probs = F.log_softmax(logits.float(), 1)
    ce = _masked_mean(-log_probs.gather(1, labels.unsqueeze(1)).squeeze(1), valid)
    probs = log_probs.exp() * valid.unsqueeze(1)
    target = one_hot(labels, logits.shape[1]) * valid.unsqueeze(1)
    axes = tuple(range(2, logits.ndim))
    dice = (2 * (probs * target).sum(axes) + smooth) / ((probs + target).sum(axes) + smooth)
    return ce + (1 - dice.mean())


def pseudo_mask_loss(pseudo_mask_logits: Sequence[torch.Tensor], labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SIPL's sum over SMG layers of Dice + CE against the target at each layer's resolution."""
    total = labels.new_zeros((), dtype=torch.float32)
    for logits in pseudo_mask_logits:
        layer_labels, layer_valid = downsample_labels(labels, valid, logits.shape[2:])
        total = total + dice_ce_loss(logits, layer_labels, layer_valid)
    return total


def probability_consistency_loss(p_linear: torch.Tensor, p_prototype: torch.Tensor, valid: torch.Tensor,
                                 kind: str = "mse") -> torch.Tensor:
    """Agreement of the two classifiers' probability maps (B, K, *s): 'mse' or symmetric 'kl'."""
    p_linear, p_prototype = p_linear.float(), p_prototype.float()
    if kind == "mse":
        per_voxel = ((p_linear - p_prototype) ** 2).mean(1)
    elif kind == "kl":
        a, b = p_linear.clamp_min(1e-6), p_prototype.clamp_min(1e-6)
        per_voxel = 0.5 * ((a * (a.log() - b.log())).sum(1) + (b * (b.log() - a.log())).sum(1))
    else:
        raise ValueError(f"unknown consistency kind '{kind}' (use 'mse' or 'kl')")
    return _masked_mean(per_voxel, valid)


class SIPLObjective(torch.nn.Module):
    """nnU-Net's segmentation loss + alpha * SIPL's pseudo-mask loss over all SMG layers."""

    def __init__(self, segmentation_loss: torch.nn.Module, layout, aux_weight: float = 0.05):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.layout = layout
        self.aux_weight = aux_weight

    def forward(self, outputs, aux, target, voxels: Optional[VoxelTarget] = None):
        seg = self.segmentation_loss(outputs, target)
        if not aux.pseudo_mask_logits:
            return seg, {"seg": seg}
        voxels = voxels if voxels is not None else as_voxel_target(self.layout, target)
        pseudo = pseudo_mask_loss(aux.pseudo_mask_logits, voxels.labels, voxels.valid)
        return seg + self.aux_weight * pseudo, {"seg": seg, "pseudo_mask": pseudo}


class FullResolutionTarget(torch.nn.Module):
    """Applies a loss to one output and the full-resolution entry of nnU-Net's (possibly deep-supervised) target."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits, target):
        return self.loss(logits, full_resolution(target))


@dataclass(frozen=True)
class MPERLossWeights:
    """Weights of MPER's prototype-phase terms (each further scaled by the ramp lambda(t))."""
    seg_prototype: float = 1.0
    ppc: float = 0.02
    ppd: float = 0.02
    consistency: float = 1.0


class MPERObjective(torch.nn.Module):
    """L_seg(linear) + lambda [w_seg L_seg(prototype) + w_ppc PPC + w_ppd PPD + w_cons consistency].

    ``segmentation_loss(outputs, target)`` scores the (possibly deep-supervised) linear outputs and
    ``prototype_loss(logits, target)`` the full-resolution prototype logits; PPC and PPD come per voxel
    from the classifier's ``PrototypeScores`` (temperature included) and are averaged with the step's
    ``VoxelTarget`` weights (given, or built from nnU-Net's target). The terms come back by
    name, unweighted; ``total`` is the one place they are weighted. ``forward`` with
    ``prototype_weight=None`` is the warm-up: the linear loss alone.
    """

    def __init__(self, segmentation_loss, prototype_loss, layout, weights: MPERLossWeights = MPERLossWeights(),
                 consistency_kind: str = "mse"):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.prototype_loss = prototype_loss
        self.layout = layout
        self.weights = asdict(weights)
        self.consistency_kind = consistency_kind

    def consistency(self, linear_logits: torch.Tensor, prototype_logits: torch.Tensor, weights: torch.Tensor
                    ) -> torch.Tensor:
        """Agreement of the two classifiers' output probabilities; for softmax layouts without keeping (B, K, *s)
        softmaxes for backward (``softmax_consistency``, same value and gradient)."""
        if not self.layout.has_regions:
            return softmax_consistency(linear_logits, prototype_logits, weights, self.consistency_kind)
        return probability_consistency_loss(self.layout.output_probabilities_from_logits(linear_logits.float()),
                                            self.layout.output_probabilities_from_logits(prototype_logits.float()),
                                            weights, self.consistency_kind)

    def total(self, linear: torch.Tensor, parts: dict, prototype_weight: float) -> torch.Tensor:
        return linear + prototype_weight * sum(self.weights[k] * v for k, v in parts.items())

    def forward(self, outputs, aux, target, scores=None, prototype_output_logits=None, prototype_weight=None,
                voxels: Optional[VoxelTarget] = None):
        """``scores``: the step's ``PrototypeScores`` (PPC and PPD per voxel); ``prototype_output_logits``: their
        logits mapped to the network's output channels."""
        linear = self.segmentation_loss(outputs, target)
        if prototype_weight is None:
            return linear, {"seg": linear}
        voxels = voxels if voxels is not None else as_voxel_target(self.layout, target)
        weights = voxels.weights
        parts = {
            "seg_prototype": self.prototype_loss(prototype_output_logits, target),
            "ppc": _masked_mean(scores.contrast, weights),
            "ppd": _masked_mean(scores.distance, weights),
            "consistency": self.consistency(aux.linear_logits, prototype_output_logits, weights),
        }
        return self.total(linear, parts, prototype_weight), {"seg": linear, **parts, "lambda": prototype_weight}


class VoxelWeightedDiceCE(torch.nn.Module):
    """nnU-Net's own Dice + CE (softmax layouts) with per-voxel weights, for copy-paste batches.

    Built from the trainer's nnU-Net loss (``DC_and_CE_loss``, inside nnU-Net's deep-supervision
    wrapper or not), so batch Dice, background handling, smoothing, DDP gathering and the
    deep-supervision weights are the plans' own. The weights are nnU-Net's Dice loss mask (they
    enter every sum once, linearly) and weight the cross-entropy's mean; ignored voxels weigh 0.
    With every weight 1 this is nnU-Net's loss on the same batch. ``target`` is a ``VoxelTarget``
    at full resolution; each deep-supervision output gets it downsampled as nnU-Net does.
    """

    def __init__(self, nnunet_loss: torch.nn.Module):
        super().__init__()
        wrapped = hasattr(nnunet_loss, "weight_factors")
        self.deep_supervision_weights = nnunet_loss.weight_factors if wrapped else None
        self.dice_ce = nnunet_loss.loss if wrapped else nnunet_loss
        if not hasattr(self.dice_ce, "dc") or not hasattr(self.dice_ce, "weight_ce"):
            raise TypeError(f"expected nnU-Net's DC_and_CE_loss (softmax layouts), got {type(self.dice_ce).__name__}")

    def single_output(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.float()
        dice = self.dice_ce.dc(logits, labels.unsqueeze(1), loss_mask=weights.unsqueeze(1))
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        ce = (ce * weights).sum() / weights.sum().clamp_min(1e-8)
        return self.dice_ce.weight_ce * ce + self.dice_ce.weight_dice * dice

    def forward(self, outputs, target: VoxelTarget) -> torch.Tensor:
        if not isinstance(outputs, (list, tuple)):
            return self.single_output(outputs, target.labels, target.weights)
        total = 0
        for factor, output in zip(self.deep_supervision_weights, outputs):
            if factor != 0:  # as nnU-Net's wrapper: unused outputs are not even evaluated
                labels, weights = downsample_labels(target.labels, target.weights, output.shape[2:])
                total = total + factor * self.single_output(output, labels, weights)
        return total
