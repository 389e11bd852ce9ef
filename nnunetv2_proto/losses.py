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

import math
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from nnunetv2_proto.label_layout import downsample_labels, full_resolution, one_hot


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


def own_class_similarities(similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K, M, *s), (B, *s) -> (B, M, *s): each voxel's similarities to its own class's prototypes."""
    m = similarities.shape[2]
    return similarities.gather(1, labels.unsqueeze(1).unsqueeze(1).expand(-1, 1, m, *labels.shape[1:])).squeeze(1)


def prototype_contrast_loss(similarities: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                            temperature: float, own: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel-prototype contrast: cross-entropy over all K*M similarities / T, target = (class, nearest)."""
    own = own_class_similarities(similarities, labels) if own is None else own
    logits = similarities.flatten(1, 2).float() / temperature
    target = labels * similarities.shape[2] + own.detach().max(1).indices
    return _masked_mean(F.cross_entropy(logits, target, reduction="none"), valid)


def prototype_distance_loss(similarities: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                            own: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel-prototype distance: mean of (1 - s_target)^2 for the own class's nearest prototype."""
    own = own_class_similarities(similarities, labels) if own is None else own
    s_target = own.float().amax(1)
    return _masked_mean((1 - s_target) ** 2, valid)


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


def sigmoid_rampup(progress: float, rampup_fraction: float = 0.4) -> float:
    """exp(-5 (1 - t)^2) with t = progress / rampup_fraction clipped to [0, 1]; progress in [0, 1]."""
    if rampup_fraction <= 0:
        return 1.0
    t = min(max(progress / rampup_fraction, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class SIPLObjective(torch.nn.Module):
    """nnU-Net's segmentation loss + alpha * SIPL's pseudo-mask loss over all SMG layers."""

    def __init__(self, segmentation_loss: torch.nn.Module, layout, aux_weight: float = 0.05):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.layout = layout
        self.aux_weight = aux_weight

    def forward(self, outputs, aux, target):
        seg = self.segmentation_loss(outputs, target)
        if not aux.pseudo_mask_logits:
            return seg, {"seg": seg}
        labels, valid = self.layout.exclusive_target(full_resolution(target))
        pseudo = pseudo_mask_loss(aux.pseudo_mask_logits, labels, valid)
        return seg + self.aux_weight * pseudo, {"seg": seg, "pseudo_mask": pseudo}


class FullResolutionTarget(torch.nn.Module):
    """Applies a loss to one output and the full-resolution entry of nnU-Net's (possibly deep-supervised) target."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits, target):
        return self.loss(logits, full_resolution(target))


class MPERObjective(torch.nn.Module):
    """L_seg(linear) + lambda [w_seg L_seg(prototype) + w_ppc PPC + w_ppd PPD + w_cons consistency].

    ``segmentation_loss(outputs, target)`` scores the (possibly deep-supervised) linear outputs,
    ``prototype_loss(logits, target)`` the full-resolution prototype logits, and
    ``voxel_targets(target) -> (labels, weights)`` gives the exclusive class and weight (or
    valid mask) of every full-resolution voxel; by default nnU-Net's loss and target layout.
    ``forward`` with ``prototype_weight=None`` is the warm-up: the linear loss alone.
    """

    def __init__(self, segmentation_loss, prototype_loss, layout, temperature: float = 0.1,
                 weight_prototype_seg: float = 1.0, weight_ppc: float = 0.02, weight_ppd: float = 0.02,
                 weight_consistency: float = 1.0, consistency_kind: str = "mse", voxel_targets=None):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.prototype_loss = prototype_loss
        self.layout = layout
        self.temperature = temperature
        self.weights = {"seg_prototype": weight_prototype_seg, "ppc": weight_ppc, "ppd": weight_ppd,
                        "consistency": weight_consistency}
        self.consistency_kind = consistency_kind
        self.voxel_targets = voxel_targets or (
            lambda target: layout.exclusive_target(full_resolution(target)))

    def forward(self, outputs, aux, target, prototype_output_logits=None, prototype_weight=None):
        linear = self.segmentation_loss(outputs, target)
        if prototype_weight is None:
            return linear, {"seg": linear}
        labels, weights = self.voxel_targets(target)
        own = own_class_similarities(aux.similarities, labels)
        parts = {
            "seg_prototype": self.prototype_loss(prototype_output_logits, target),
            "ppc": prototype_contrast_loss(aux.similarities, labels, weights, self.temperature, own),
            "ppd": prototype_distance_loss(aux.similarities, labels, weights, own),
            "consistency": probability_consistency_loss(
                self.layout.output_probabilities_from_logits(aux.linear_logits.float()),
                self.layout.output_probabilities_from_logits(prototype_output_logits.float()), weights,
                self.consistency_kind),
        }
        total = linear + prototype_weight * sum(self.weights[k] * v for k, v in parts.items())
        return total, {"seg": linear, **parts, "lambda": prototype_weight}


class WeightedDiceCE(torch.nn.Module):
    """Dice + CE with per-voxel weights on a full-resolution output, for copy-paste batches.

    ``target`` is a ``MixedTarget`` (labels and weights at full resolution); with a list of
    outputs (deep supervision) each is scored against the labels and weights downsampled to its
    size and weighted by nnU-Net's deep-supervision factors.
    """

    def __init__(self, deep_supervision_weights=None):
        super().__init__()
        self.deep_supervision_weights = deep_supervision_weights

    def forward(self, outputs, target):
        if not isinstance(outputs, (list, tuple)):
            return dice_ce_loss(outputs, target.labels, target.weights)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for factor, output in zip(self.deep_supervision_weights, outputs):
            if factor == 0:
                continue
            labels, weights = downsample_labels(target.labels, target.weights, output.shape[2:])
            total = total + factor * dice_ce_loss(output, labels, weights)
        return total
