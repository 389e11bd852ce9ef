import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.label_layout import LabelLayout, downsample_labels


def test_softmax_layout_from_nnunet_label_manager_with_ignore_label():
    manager = LabelManager({"background": 0, "a": 1, "b": 2, "ignore": 3}, regions_class_order=None)
    layout = LabelLayout.from_label_manager(manager)
    assert (layout.num_outputs, layout.num_exclusive, layout.has_regions, layout.ignore_label) == (3, 3, False, 3)
    target = torch.tensor([[[0, 1, 2, 3]]])[:, None]  # (B=1, 1, 1, 4)
    labels, valid = layout.exclusive_target(target)
    assert labels.tolist() == [[[0, 1, 2, 0]]]
    assert valid.tolist() == [[[True, True, True, False]]]


def test_region_layout_follows_nnunets_regions_class_order():
    # BraTS-like nesting: whole tumour (1,2,3) > tumour core (2,3) > enhancing (3)
    manager = LabelManager({"background": 0, "wt": [1, 2, 3], "tc": [2, 3], "et": 3}, regions_class_order=[1, 2, 3])
    layout = LabelLayout.from_label_manager(manager)
    assert layout.has_regions and layout.num_exclusive == 4
    # exclusive class c (label regions_class_order[c-1]) lies in every region containing that label
    assert layout.membership_tensor().tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # region target for voxels with original labels 0, 1, 2, 3
    regions = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float32)[None]  # (1, 3, 4)
    labels, valid = layout.exclusive_target(regions)
    assert labels.tolist() == [[0, 1, 2, 3]] and bool(valid.all())
    # probabilities of exclusive classes sum into region probabilities
    exclusive = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # (1, 4)
    assert torch.allclose(layout.output_probabilities_from_exclusive(exclusive), torch.tensor([[0.9, 0.7, 0.4]]))


def test_region_target_ignore_channel_marks_invalid_voxels():
    layout = LabelLayout(2, ((0, 0), (1, 0), (1, 1)), ignore_label=9)
    target = torch.tensor([[[1, 1, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float32)  # regions + ignore channel
    labels, valid = layout.exclusive_target(target)
    assert labels.tolist() == [[1, 2, 0]] and valid.tolist() == [[True, True, False]]


def test_region_that_no_listed_label_represents_is_rejected_with_a_fix():
    with pytest.raises(SetupError, match="regions_class_order"):
        LabelLayout(2, ((0, 0), (1, 0), (1, 0)))


def test_layout_survives_the_plans_json_round_trip():
    layout = LabelLayout(3, ((0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)), ignore_label=4)
    assert LabelLayout.from_dict(layout.to_dict()) == layout


def test_downsampling_matches_nnunets_deep_supervision_targets():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    labels = torch.randint(0, 4, (1, 12, 16, 20))
    ours, valid = downsample_labels(labels, torch.ones_like(labels, dtype=torch.bool), (6, 8, 10))
    theirs = DownsampleSegForDSTransform([[1, 1, 1], [0.5, 0.5, 0.5]])(segmentation=labels.short())["segmentation"][1]
    assert torch.equal(ours, theirs.long()) and bool(valid.all())
