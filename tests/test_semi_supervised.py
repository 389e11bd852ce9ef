import pytest
import torch

from conftest import small_unet
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.semi.copy_paste import bidirectional_pairs, copy_paste, cuboid_masks, swapped_pairs
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
def test_bidirectional_copy_paste_keeps_image_and_label_pieces_together(spatial):
    batch = 4
    # every voxel of image i and of label i carries i: labelled patches 0..3, unlabelled 10..13
    labeled = torch.arange(batch).view(batch, 1, *[1] * len(spatial)).expand(batch, 2, *spatial).float()
    unlabeled = labeled + 10
    masks = cuboid_masks(batch // 2 * 2, spatial, 2 / 3, generator=torch.Generator().manual_seed(0))
    images = copy_paste(*bidirectional_pairs(labeled, unlabeled), masks)
    labels = copy_paste(*bidirectional_pairs(labeled[:, 0].long(), unlabeled[:, 0].long()), masks)
    from_labeled = copy_paste(*bidirectional_pairs(torch.ones(batch, *spatial, dtype=torch.bool),
                                                   torch.zeros(batch, *spatial, dtype=torch.bool)), masks)
    assert torch.equal(images[:, 0].long(), labels) and torch.equal(images[:, 1], images[:, 0])
    assert torch.equal(from_labeled, labels < 10)
    # x1 = l_a in the cuboid, u_a outside; x2 = u_b in the cuboid, l_b outside
    assert torch.equal(labels[0], torch.where(masks[0], 0, 10)) and torch.equal(labels[2], torch.where(masks[2], 11, 1))
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
