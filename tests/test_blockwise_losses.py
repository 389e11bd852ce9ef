"""The blockwise loss terms equal nnU-Net's loss and the composed consistency definition, in value and gradient,
and keep nothing K channels wide for backward beyond their inputs."""

import math

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss

from nnunetv2_proto import voxel_blocks
from nnunetv2_proto.blockwise_losses import BlockwiseDiceCE, blockwise_dice_ce, softmax_consistency
from nnunetv2_proto.losses import probability_consistency_loss

SHAPES = [(2, 4, 9, 11), (2, 4, 5, 6, 7)]  # 2D and 3D; 99 and 210 voxels per sample


def nnunet_dice_ce(batch_dice=True, do_bg=False, ignore_label=None, weight_ce=1.0, weight_dice=1.0,
                   dice_class=MemoryEfficientSoftDiceLoss, ce_kwargs=None):
    """As nnUNetTrainer._build_loss makes it for one output (softmax layouts)."""
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": do_bg, "ddp": False}, ce_kwargs or {},
                          weight_ce=weight_ce, weight_dice=weight_dice, ignore_label=ignore_label,
                          dice_class=dice_class)


def set_blocks(monkeypatch, blocks: bool) -> None:
    monkeypatch.setattr(voxel_blocks, "CPU_BLOCK_BYTES", 1 if blocks else 1 << 40)


def value_and_gradient(loss_fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = loss_fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch_dice,do_bg", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("ignore_label", [None, 4])
@pytest.mark.parametrize("blocks", [False, True])
def test_blockwise_dice_ce_equals_nnunets_loss(shape, batch_dice, do_bg, ignore_label, blocks, monkeypatch):
    set_blocks(monkeypatch, blocks)
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(*shape, generator=generator)
    # class 3 never occurs (an empty class), label 4 is nnU-Net's ignore label where one is set
    labels = torch.randint(0, 3 if ignore_label is None else 5, (shape[0], 1, *shape[2:]), generator=generator)
    labels[labels == 3] = 0
    target = labels.float()  # nnU-Net's targets are float label maps (B, 1, *s)
    reference = nnunet_dice_ce(batch_dice, do_bg, ignore_label, weight_ce=0.7, weight_dice=1.3)
    ours = blockwise_dice_ce(reference)
    assert isinstance(ours, BlockwiseDiceCE)
    expected_value, (expected_gradient,) = value_and_gradient(lambda x: reference(x, target), logits)
    value, (gradient,) = value_and_gradient(lambda x: ours(x, target), logits)
    assert torch.allclose(value, expected_value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-8) and expected_gradient.abs().sum() > 0


def test_blockwise_dice_ce_with_every_voxel_ignored_is_nnunets_dice_alone():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.full((2, 1, 4, 5), 3.0)
    reference = nnunet_dice_ce(ignore_label=3)
    expected_value, (expected_gradient,) = value_and_gradient(lambda x: reference(x, target), logits)
    value, (gradient,) = value_and_gradient(lambda x: blockwise_dice_ce(reference)(x, target), logits)
    assert torch.allclose(value, expected_value) and torch.isfinite(value)
    assert torch.allclose(gradient, expected_gradient)


@pytest.mark.parametrize("blocks", [False, True])
def test_blockwise_dice_ce_gradcheck(blocks, monkeypatch):
    set_blocks(monkeypatch, blocks)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.double, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 8, 8), generator=generator).double()
    loss = blockwise_dice_ce(nnunet_dice_ce(batch_dice=False, ignore_label=3))
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (logits,))


def test_losses_it_does_not_reproduce_are_returned_unchanged():
    for loss in (nnunet_dice_ce(dice_class=SoftDiceLoss), nnunet_dice_ce(ce_kwargs={"label_smoothing": 0.1}),
                 nnunet_dice_ce(ce_kwargs={"weight": torch.ones(3)})):
        assert blockwise_dice_ce(loss) is loss


def composed_consistency(a, b, weights, kind):
    return probability_consistency_loss(torch.softmax(a, 1), torch.softmax(b, 1), weights, kind)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("weights_kind", ["bool", "float"])
@pytest.mark.parametrize("blocks", [False, True])
def test_softmax_consistency_equals_the_composed_definition(shape, kind, weights_kind, blocks, monkeypatch):
    set_blocks(monkeypatch, blocks)
    generator = torch.Generator().manual_seed(2)
    a, b = 4 * torch.randn(*shape, generator=generator, dtype=torch.double), \
        4 * torch.randn(*shape, generator=generator, dtype=torch.double)
    spatial = (shape[0], *shape[2:])
    weights = torch.rand(spatial, generator=generator, dtype=torch.double)
    weights = weights > 0.3 if weights_kind == "bool" else weights.masked_fill(weights < 0.3, 0.0)
    expected_value, expected_gradients = value_and_gradient(lambda x, y: composed_consistency(x, y, weights, kind),
                                                            a, b)
    value, gradients = value_and_gradient(lambda x, y: softmax_consistency(x, y, weights, kind), a, b)
    # the composed definition computes in fp32; ours keeps the inputs' fp64
    assert torch.allclose(value, expected_value.double(), rtol=1e-5, atol=1e-7)
    for ours, expected in zip(gradients, expected_gradients):
        assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-7) and expected.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_softmax_consistency_gradcheck(kind, monkeypatch):
    set_blocks(monkeypatch, True)
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 3, 60, generator=generator, dtype=torch.double, requires_grad=True) for _ in range(2))
    weights = torch.rand(2, 60, generator=generator, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x, y: softmax_consistency(x, y, weights, kind), (a, b))


def test_softmax_consistency_names_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown consistency kind 'l1'"):
        softmax_consistency(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool), "l1")


def saved_storages(fn, *inputs):
    """Bytes of every storage autograd keeps for backward while ``fn`` runs, by data pointer."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return saved


def test_nothing_k_channels_wide_is_kept_for_backward_beyond_the_inputs(monkeypatch):
    """The point of these functions: autograd through the definitions keeps softmaxes, log-softmaxes and one-hot
    targets of the logits' size; the blockwise terms keep their inputs and per-voxel or per-class numbers."""
    set_blocks(monkeypatch, True)
    a = torch.randn(2, 6, 16, 16, 16, requires_grad=True)
    b = torch.randn(2, 6, 16, 16, 16, requires_grad=True)
    target = torch.randint(0, 6, (2, 1, 16, 16, 16)).float()
    weights = torch.ones(2, 16, 16, 16, dtype=torch.bool)
    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr(), target.untyped_storage().data_ptr()}
    logits_bytes, voxels = a.numel() * a.element_size(), a.numel() // a.shape[1]
    reference = nnunet_dice_ce()
    for fn in (lambda: blockwise_dice_ce(reference)(a, target), lambda: softmax_consistency(a, b, weights)):
        extra = {ptr: size for ptr, size in saved_storages(fn).items() if ptr not in inputs}
        assert sum(extra.values()) <= 8 * voxels + 1024  # at most an int64 label map and per-class numbers
    for fn in (lambda: reference(a, target), lambda: composed_consistency(a, b, weights, "mse")):
        extra = {ptr: size for ptr, size in saved_storages(fn).items() if ptr not in inputs}
        assert sum(extra.values()) >= 2 * logits_bytes  # what the definitions keep, for contrast
    assert math.prod(a.shape) > 16 * 1024  # several blocks at the patched block size
