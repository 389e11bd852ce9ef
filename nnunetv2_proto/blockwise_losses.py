"""Memory-lean equivalents of the full-resolution loss terms MPER adds to nnU-Net's loss.

MPER scores a second, K-channel logit map (the prototype classifier's) with nnU-Net's Dice + CE
and ties it to the linear logits with a probability-consistency term. Through autograd each term
keeps two or three (B, K, *s) tensors for backward (softmaxes, log-softmaxes, one-hot targets,
differences); at K = 14 on the CPU preset that is more than 150 MB next to a 16-channel network,
and it is all alive at the start of backward, when memory peaks. The autograd functions here
keep only their inputs (which the step holds anyway) and a few numbers per class, and recompute
the softmaxes block by block over the voxels in backward (``voxel_blocks``).

- ``BlockwiseDiceCE``: nnU-Net's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` (the
  loss ``nnUNetTrainer._build_loss`` makes) for one output, in value and gradient: batch or
  per-sample Dice, with or without background, nnU-Net's smoothing and clamp, the ignore label as
  nnU-Net handles it, CE weight and Dice weight. ``blockwise_dice_ce(loss)`` returns it for a loss
  it reproduces and the loss itself otherwise (another Dice class, CE weights or label
  smoothing, batch Dice gathered across DDP ranks), so nothing changes meaning silently.
- ``softmax_consistency``: the mean over weighted voxels of the squared difference (or symmetric
  KL) of two softmaxes, as ``losses.probability_consistency_loss`` defines it.

Both are checked against the composed definitions, in value and gradient, in
``tests/test_blockwise_losses.py``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from nnunetv2_proto.voxel_blocks import at_least_fp32, voxel_blocks

_PROBABILITY_FLOOR = 1e-6  # the symmetric KL's clamp, as in losses.probability_consistency_loss


def _flat(tensor: torch.Tensor, leading: int) -> torch.Tensor:
    """(B, [C,] *s) -> (B, [C,] N)."""
    return tensor.reshape(*tensor.shape[:leading], -1)


def _weights_in(dtype: torch.dtype, weights: torch.Tensor) -> torch.Tensor:
    return weights.to(dtype) if weights.dtype != dtype else weights


# --- consistency between two classifiers' softmaxes -----------------------------------------
def _consistency_and_gradients(p: torch.Tensor, q: torch.Tensor, kind: str, need_gradients: bool
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per voxel (B, n): the term and, if asked, its derivatives w.r.t. p and q (B, K, n)."""
    if kind == "mse":
        difference = p - q
        value = (difference * difference).mean(1)
        if not need_gradients:
            return value, None, None
        d_p = difference.mul_(2.0 / p.shape[1])
        return value, d_p, -d_p
    if kind == "kl":
        a, b = p.clamp_min(_PROBABILITY_FLOOR), q.clamp_min(_PROBABILITY_FLOOR)
        log_ratio = a.log() - b.log()
        value = 0.5 * ((a - b) * log_ratio).sum(1)
        if not need_gradients:
            return value, None, None
        # d/da (a - b)(log a - log b) = log a - log b + (a - b) / a; clamp_min passes the gradient where p >= floor
        d_p = 0.5 * (log_ratio + (a - b) / a) * (p >= _PROBABILITY_FLOOR)
        d_q = 0.5 * (-log_ratio + (b - a) / b) * (q >= _PROBABILITY_FLOOR)
        return value, d_p, d_q
    raise ValueError(f"unknown consistency kind '{kind}' (use 'mse' or 'kl')")


def _softmax_backward(probabilities: torch.Tensor, grad_probabilities: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the logits of softmax over dim 1: p * (g - <g, p>)."""
    dot = (grad_probabilities * probabilities).sum(1, keepdim=True)
    return grad_probabilities.sub_(dot).mul_(probabilities)


class _BlockwiseSoftmaxConsistency(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_a: torch.Tensor, logits_b: torch.Tensor, weights: torch.Tensor, kind: str):
        a, b = at_least_fp32(_flat(logits_a, 2)), at_least_fp32(_flat(logits_b, 2))
        w = _weights_in(a.dtype, _flat(weights, 1))
        batch, classes, num_voxels = a.shape
        total = a.new_zeros(())
        for block in voxel_blocks(num_voxels, 4 * batch * classes, a.device):
            value, _, _ = _consistency_and_gradients(torch.softmax(a[..., block], 1), torch.softmax(b[..., block], 1),
                                                     kind, need_gradients=False)
            total += (value * w[:, block]).sum()
        normaliser = w.sum().clamp_min(1.0)
        ctx.kind = kind
        ctx.save_for_backward(logits_a, logits_b, weights, normaliser)
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_output):
        logits_a, logits_b, weights, normaliser = ctx.saved_tensors
        a, b = at_least_fp32(_flat(logits_a, 2)), at_least_fp32(_flat(logits_b, 2))
        scale = _weights_in(a.dtype, _flat(weights, 1)) * (grad_output / normaliser)
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        batch, classes, num_voxels = a.shape
        for block in voxel_blocks(num_voxels, 4 * batch * classes, a.device):
            p, q = torch.softmax(a[..., block], 1), torch.softmax(b[..., block], 1)
            _, d_p, d_q = _consistency_and_gradients(p, q, ctx.kind, need_gradients=True)
            voxel_scale = scale[:, None, block]
            grad_a[..., block] = _softmax_backward(p, d_p.mul_(voxel_scale))
            grad_b[..., block] = _softmax_backward(q, d_q.mul_(voxel_scale))
        return (grad_a.view(logits_a.shape).to(logits_a.dtype), grad_b.view(logits_b.shape).to(logits_b.dtype),
                None, None)


def softmax_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor, weights: torch.Tensor,
                        kind: str = "mse") -> torch.Tensor:
    """Weighted mean over voxels of the agreement of softmax(logits_a) and softmax(logits_b), (B, K, *s) each:
    'mse' (mean over classes of the squared difference) or symmetric 'kl'. ``weights`` (B, *s), bool or float."""
    return _BlockwiseSoftmaxConsistency.apply(logits_a, logits_b, weights, kind)


# --- nnU-Net's Dice + CE for one output -----------------------------------------------------
def _without_ignore_label(labels: torch.Tensor, ignore_label: Optional[int]
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """As nnU-Net's DC_and_CE_loss: ignored voxels get class 0 and a False in the mask (None: no ignore label)."""
    if ignore_label is None:
        return labels, None
    valid = labels != ignore_label
    return labels.masked_fill(~valid, 0), valid


class _BlockwiseSoftmaxDiceCE(torch.autograd.Function):
    """nnU-Net's DC_and_CE_loss(MemoryEfficientSoftDiceLoss) on (B, K, *s) logits and (B, *s) labels.

    With p = softmax(x), per (sample or batch, class c): I = sum p_c y_c m, P = sum p_c m, G = sum y_c m
    (m: not the ignore label), Dice_c = (2I + s) / max(G + P + s, 1e-8), loss = w_ce CE - w_dice mean_c Dice_c.
    Backward: dDice_c/dp_c(v) = m(v) (2 y_c(v) / D_c - (2I_c + s) / D_c^2), through the softmax as
    p (g - <g, p>), plus w_ce (p - y) m / |m| for the CE. Saved: the logits, the labels, and the loss's
    derivatives w.r.t. the per-class sums (K numbers per sample).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, settings: "BlockwiseDiceCE"):
        x = at_least_fp32(_flat(logits, 2))
        batch, classes, num_voxels = x.shape
        labels = _flat(labels, 1).long()
        dice_labels, valid = _without_ignore_label(labels, settings.ignore_label)
        valid_f = valid.to(x.dtype) if valid is not None else None
        intersect, sum_pred = x.new_zeros(batch, classes), x.new_zeros(batch, classes)
        sum_gt = x.new_zeros(batch, classes).scatter_add_(
            1, dice_labels, valid_f if valid_f is not None else x.new_ones(batch, num_voxels))
        ce_sum = x.new_zeros(())
        for block in voxel_blocks(num_voxels, 4 * batch * classes, x.device):
            log_p = torch.log_softmax(x[..., block], 1)
            block_labels, block_valid = dice_labels[:, block], valid_f[:, block] if valid_f is not None else None
            log_p_label = log_p.gather(1, block_labels.unsqueeze(1)).squeeze(1)
            p = log_p.exp_()
            p_label = p.gather(1, block_labels.unsqueeze(1)).squeeze(1)
            if block_valid is not None:
                p.mul_(block_valid.unsqueeze(1))
                p_label.mul_(block_valid)
                log_p_label.mul_(block_valid)
            sum_pred += p.sum(-1)
            intersect.scatter_add_(1, block_labels, p_label)
            ce_sum -= log_p_label.sum()
        # an all-ignored patch has ce_sum 0 (every term masked): the clamp makes its CE 0, as nnU-Net skips it,
        # without asking the device whether the count is 0
        ce_count = (valid_f.sum() if valid_f is not None else x.new_tensor(float(batch * num_voxels))).clamp_min(1.0)
        dice, d_intersect, d_sum_pred = settings.dice_and_gradients(intersect, sum_pred, sum_gt)
        ce = ce_sum / ce_count
        ctx.settings = settings
        ctx.save_for_backward(logits, labels, d_intersect, d_sum_pred, ce_count)
        return settings.weight_ce * ce + settings.weight_dice * dice

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, d_intersect, d_sum_pred, ce_count = ctx.saved_tensors
        settings = ctx.settings
        x = at_least_fp32(_flat(logits, 2))
        batch, classes, num_voxels = x.shape
        dice_labels, valid = _without_ignore_label(labels, settings.ignore_label)
        d_intersect = (settings.weight_dice * grad_output) * d_intersect  # (B, K)
        d_sum_pred = ((settings.weight_dice * grad_output) * d_sum_pred).unsqueeze(-1)  # (B, K, 1)
        ce_scale = settings.weight_ce * grad_output / ce_count if settings.weight_ce != 0 else None
        grad = torch.empty_like(x)
        for block in voxel_blocks(num_voxels, 4 * batch * classes, x.device):
            p = torch.softmax(x[..., block], 1)
            block_labels = dice_labels[:, block].unsqueeze(1)
            block_valid = valid[:, None, block].to(x.dtype) if valid is not None else None
            grad_p = d_sum_pred.expand(-1, -1, p.shape[-1]).clone()
            grad_p.scatter_add_(1, block_labels, d_intersect.gather(1, block_labels.squeeze(1)).unsqueeze(1))
            if block_valid is not None:
                grad_p.mul_(block_valid)
            grad_block = _softmax_backward(p, grad_p)
            if ce_scale is not None:
                ce_weight = ce_scale * block_valid if block_valid is not None else ce_scale.expand(batch, 1, p.shape[-1])
                grad_block.add_(p * ce_weight).scatter_add_(1, block_labels, -ce_weight)
            grad[..., block] = grad_block
        return grad.view(logits.shape).to(logits.dtype), None, None


class BlockwiseDiceCE(nn.Module):
    """nnU-Net's ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss`` for one output, same value and gradient,
    without keeping (B, K, *s) tensors for backward. Build it with ``blockwise_dice_ce``."""

    def __init__(self, weight_ce: float, weight_dice: float, ignore_label: Optional[int], batch_dice: bool,
                 do_bg: bool, smooth: float):
        super().__init__()
        self.weight_ce, self.weight_dice, self.ignore_label = weight_ce, weight_dice, ignore_label
        self.batch_dice, self.do_bg, self.smooth = batch_dice, do_bg, smooth

    def dice_and_gradients(self, intersect: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-mean Dice from the per-sample (B, K) sums, and its derivatives w.r.t. them, (B, K) each."""
        first = 0 if self.do_bg else 1
        shape = intersect.shape
        intersect, sum_pred, sum_gt = intersect[:, first:], sum_pred[:, first:], sum_gt[:, first:]
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        numerator = 2 * intersect + self.smooth
        raw_denominator = sum_gt + sum_pred + self.smooth
        denominator = raw_denominator.clamp_min(1e-8)
        dice = -(numerator / denominator).mean()
        d_dice = -1.0 / numerator.numel()
        d_numerator_part = d_dice * 2 / denominator
        d_denominator_part = -d_dice * numerator / denominator ** 2 * (raw_denominator >= 1e-8)
        d_intersect, d_sum_pred = intersect.new_zeros(shape), intersect.new_zeros(shape)
        # a batch Dice's per-class derivative applies to every sample's sums
        d_intersect[:, first:] = d_numerator_part
        d_sum_pred[:, first:] = d_denominator_part
        return dice, d_intersect, d_sum_pred

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *s); target (B, 1, *s) or (B, *s) label map, as nnU-Net's loss takes it."""
        if target.ndim == logits.ndim:
            target = target[:, 0]
        return _BlockwiseSoftmaxDiceCE.apply(logits, target, self)


def blockwise_dice_ce(loss: nn.Module) -> nn.Module:
    """``BlockwiseDiceCE`` in place of nnU-Net's single-output ``DC_and_CE_loss`` when it computes the same
    thing, else ``loss`` unchanged."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
    if type(loss) is not DC_and_CE_loss or type(loss.dc) is not MemoryEfficientSoftDiceLoss \
            or type(loss.ce) is not RobustCrossEntropyLoss:
        return loss
    dice, ce = loss.dc, loss.ce
    plain_ce = ce.weight is None and ce.label_smoothing == 0 and ce.reduction == "mean"
    gathered_batch_dice = dice.batch_dice and dice.ddp and dist.is_available() and dist.is_initialized()
    if dice.apply_nonlin is not softmax_helper_dim1 or not plain_ce or gathered_batch_dice:
        return loss
    return BlockwiseDiceCE(loss.weight_ce, loss.weight_dice, loss.ignore_label, dice.batch_dice, dice.do_bg,
                           dice.smooth)
