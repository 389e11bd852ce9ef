import numpy as np
import pytest
import torch

from conftest import small_unet
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.semi.copy_paste import both_ways, copy_paste, cuboid_masks, swapped_pairs
from nnunetv2_proto.semi.labeled_subset import grouped_labeled_subset, labeled_subset_from_file, seeded_labeled_subset
from nnunetv2_proto.semi.mean_teacher import ema_update_, largest_component, make_teacher

CASES = [f"case_{i:02d}" for i in range(20)]


def test_labeled_subset_is_deterministic_per_seed_and_fold():
    first = seeded_labeled_subset(CASES, 8, seed=12345)
    assert first == seeded_labeled_subset(list(reversed(CASES)), 8, seed=12345)  # order of input irrelevant
    assert len(set(first)) == 8 and set(first) <= set(CASES)
    assert first != seeded_labeled_subset(CASES, 8, seed=12346)  # another fold's seed
    with pytest.raises(SetupError, match="training cases"):
        seeded_labeled_subset(CASES, 21, seed=0)


def test_grouped_subset_labels_every_frame_of_a_patient():
    cases = [f"ACDC_patient{p:03d}_frame0{f}" for p in range(10) for f in (1, 2)]
    chosen = grouped_labeled_subset(cases, 3, r"patient\d+", seed=0)
    patients = {c.split("_frame")[0] for c in chosen}
    assert len(chosen) == 6 and len(patients) == 3


def test_labeled_list_file_rejects_validation_cases(tmp_path):
    path = tmp_path / "labeled_cases.json"
    path.write_text('{"0": ["case_01", "case_99"]}')
    with pytest.raises(SetupError, match="case_99"):
        labeled_subset_from_file(path, 0, CASES)
    path.write_text('["case_03", "case_01"]')
    assert labeled_subset_from_file(path, 4, CASES) == ["case_01", "case_03"]


@pytest.mark.parametrize("spatial", [(12, 18), (6, 9, 12)])
def test_copy_paste_both_ways_keeps_pieces_together_and_uses_every_labelled_voxel_once(spatial):
    batch = 3
    # every voxel of image i and of label i carries i: labelled patches 0..2, unlabelled 10..12
    labeled = torch.arange(batch).view(batch, 1, *[1] * len(spatial)).expand(batch, 2, *spatial).float()
    unlabeled = labeled + 10
    masks = cuboid_masks(batch, spatial, 2 / 3, generator=torch.Generator().manual_seed(0))
    masks = torch.cat((masks, masks))
    images = copy_paste(*both_ways(labeled, unlabeled), masks)
    labels = copy_paste(*both_ways(labeled[:, 0].long(), unlabeled[:, 0].long()), masks)
    from_labeled = copy_paste(*both_ways(torch.ones(batch, *spatial, dtype=torch.bool),
                                         torch.zeros(batch, *spatial, dtype=torch.bool)), masks)
    assert images.shape[0] == 2 * batch
    assert torch.equal(images[:, 0].long(), labels) and torch.equal(images[:, 1], images[:, 0])
    assert torch.equal(from_labeled, labels < 10)
    # x_i = l_i in the cuboid, u_i outside; x_{B+i} = u_i in the cuboid, l_i outside
    assert torch.equal(labels[0], torch.where(masks[0], 0, 10)) and torch.equal(labels[4], torch.where(masks[4], 11, 1))
    # labelled-signal parity: each labelled patch's voxels appear exactly once, as in a labelled-only batch
    for i in range(batch):
        assert int((labels == i).sum()) == labeled[0, 0].numel()
    # each cuboid covers 2/3 of every axis
    expected = 1
    for s in spatial:
        expected *= round(s * 2 / 3)
    assert masks.flatten(1).sum(1).tolist() == [expected] * masks.shape[0]


def test_copy_paste_among_labelled_patches_swaps_partners():
    batch = torch.arange(4).view(4, 1, 1)
    assert swapped_pairs(batch).flatten().tolist() == [1, 0, 3, 2]


def test_teacher_is_an_exponential_moving_average_of_the_student():
    student = small_unet(2, 3)
    teacher = make_teacher(student)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(teacher, student, 0.99)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, 0.99 * old + 0.01 * s)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_largest_component_keeps_only_the_biggest_blob():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 1:3, 1:3] = 1   # 4 pixels
    labels[0, 5:9, 5:9] = 1   # 16 pixels
    kept = largest_component(labels)
    assert int(kept.sum()) == 16 and int(kept[0, 1, 1]) == 0


def nnunet_dice_ce(batch_dice: bool, ignore_label=None, outputs: int = 4):
    """nnU-Net's softmax loss exactly as nnUNetTrainer._build_loss makes it (single process)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(outputs)])
    weights[-1] = 0
    return loss, DeepSupervisionWrapper(loss, weights / weights.sum())


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_weighted_loss_with_unit_weights_is_nnunets_loss(batch_dice, ignore_label):
    """The semi-supervised trainers' loss = nnU-Net's (batch Dice, no background Dice, deep supervision
    weights, ignore label) when every voxel weighs 1: values and gradients."""
    from torch.nn import functional as F
    from nnunetv2_proto.label_layout import LabelLayout
    from nnunetv2_proto.losses import VoxelTarget, VoxelWeightedDiceCE
    generator = torch.Generator().manual_seed(3)
    sizes = [(16, 20, 24), (8, 10, 12), (4, 5, 6), (2, 3, 3)]
    logits = [torch.randn(2, 3, *s, generator=generator, requires_grad=True) for s in sizes]
    target = torch.randint(0, 3 if ignore_label is None else 4, (2, 1, *sizes[0]), generator=generator).float()
    targets = [target] + [F.interpolate(target, size=s, mode="nearest-exact") for s in sizes[1:]]
    _, nnunet_loss = nnunet_dice_ce(batch_dice, ignore_label)
    theirs = nnunet_loss(logits, targets)
    their_grads = torch.autograd.grad(theirs, logits[:3])  # the coarsest output has weight 0
    layout = LabelLayout(3, ignore_label=ignore_label)
    voxels = VoxelTarget.from_nnunet_target(layout, targets)
    ours = VoxelWeightedDiceCE(nnunet_loss)(logits, VoxelTarget(voxels.labels, voxels.valid.float()))
    our_grads = torch.autograd.grad(ours, logits[:3])
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-7)
    for a, b in zip(our_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)


def test_weights_enter_the_dice_linearly():
    """Weight 0.5 on every voxel is the same Dice as weight 1 (it cancels), not a squared weight."""
    from nnunetv2_proto.losses import VoxelTarget, VoxelWeightedDiceCE
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (2, 8, 8, 8), generator=generator)
    loss, _ = nnunet_dice_ce(batch_dice=True)
    objective = VoxelWeightedDiceCE(loss)
    full = objective(logits, VoxelTarget(labels, torch.ones(labels.shape)))
    half = objective(logits, VoxelTarget(labels, torch.full(labels.shape, 0.5)))
    assert float(half) == pytest.approx(float(full), rel=1e-5)


def test_foreground_removed_by_the_component_filter_is_not_confident():
    from types import SimpleNamespace
    from nnunetv2_proto.training.semi_supervised import SemiSupervisedMixin
    logits = torch.full((1, 2, 1, 12, 12), -4.0)
    logits[:, 1, :, 1:4, 1:4] = 4.0    # a small blob, confidently foreground
    logits[:, 1, :, 6:11, 6:11] = 4.0  # the largest component
    logits[:, 0] = -logits[:, 1]
    teacher = lambda images: logits  # noqa: E731  (stands for the teacher network)
    teacher.decoder = SimpleNamespace(deep_supervision=False)
    from nnunetv2.utilities.helpers import dummy_context
    trainer = SimpleNamespace(teacher=teacher, device=torch.device("cpu"), largest_component=True,
                              autocast=dummy_context)
    labels, confidence = SemiSupervisedMixin.pseudo_labels(trainer, None)
    assert labels[0, 0, 2, 2] == 0 and confidence[0, 0, 2, 2] == 0.0   # removed: label 0, not confident
    assert labels[0, 0, 8, 8] == 1 and confidence[0, 0, 8, 8] > 0.99
    assert confidence[0, 0, 0, 11] > 0.99                               # true background stays confident
