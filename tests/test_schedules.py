"""Phase plans and the training step's micro-batches: pure functions, checked against hand values."""

import math

import pytest
import torch
from torch.nn import functional as F

from nnunetv2_proto.heads.multi_prototype import MultiPrototypeClassifier
from nnunetv2_proto.losses import VoxelTarget
from nnunetv2_proto.training.schedules import (MPER_FROM_TRAINED_PHASES, MPER_OFFICIAL_PHASES, MPER_PHASES,
                                               PhasePlan)
from nnunetv2_proto.training.trainer_base import concat_batches, split_batch


def test_mper_warmup_is_a_fraction_of_the_budget_with_a_floor_in_steps():
    # 1000 steps (50 x 20): 30% = 15 epochs; 200 steps (20 x 10): the 100-step floor = 10 epochs
    assert MPER_PHASES.warmup_epochs(50, 20) == 15
    assert MPER_PHASES.warmup_epochs(20, 10) == 10
    # nnU-Net's default 1000 x 250: 300 epochs
    assert MPER_PHASES.warmup_epochs(1000, 250) == 300
    # a budget shorter than the floor still gets one prototype epoch
    assert MPER_PHASES.warmup_epochs(3, 3) == 2
    assert MPER_FROM_TRAINED_PHASES.warmup_epochs(50, 20) == 0
    assert PhasePlan(warmup_fraction=0.01).warmup_epochs(10) == 1


def test_the_ramp_starts_with_the_main_phase_and_reaches_one_at_its_fraction_of_it():
    epochs, per_epoch = 50, 20
    warmup = MPER_PHASES.warmup_epochs(epochs, per_epoch)  # 15; main phase 35 epochs, ramp 40% of it = 14
    weight = lambda plan, e: plan.main_loss_weight(e, epochs, per_epoch)  # noqa: E731
    assert weight(MPER_PHASES, warmup) == pytest.approx(math.exp(-5))
    assert weight(MPER_PHASES, warmup + 7) == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert weight(MPER_PHASES, warmup + 14) == 1.0 and weight(MPER_PHASES, epochs - 1) == 1.0
    # the official recipe ramps over 75% of the prototype phase (26.25 epochs)
    assert weight(MPER_OFFICIAL_PHASES, warmup + 14) == pytest.approx(math.exp(-5 * (1 - 14 / 26.25) ** 2))
    assert weight(MPER_OFFICIAL_PHASES, warmup + 27) == 1.0
    # without a warm-up the ramp starts at epoch 0
    assert MPER_FROM_TRAINED_PHASES.main_loss_weight(0, 50, 20) == pytest.approx(math.exp(-5))


def test_ppc_targets_the_true_class_and_its_nearest_prototype_at_temperature_t():
    generator = torch.Generator().manual_seed(0)
    k, m, c, t = 3, 2, 5, 0.07
    classifier = MultiPrototypeClassifier(k, m, c, temperature=t)
    features = torch.randn(2, c, 4, 5, generator=generator)
    labels = torch.randint(0, k, (2, 4, 5), generator=generator)
    scores = classifier.scores(features, labels)
    for b in range(2):  # the definition, voxel by voxel
        for y in range(4):
            for x in range(5):
                s = F.cosine_similarity(features[b, :, y, x].view(1, 1, c), classifier.prototypes, dim=-1)
                true = int(labels[b, y, x])
                target = true * m + int(s[true].argmax())
                expected = F.cross_entropy((s.flatten() / t)[None], torch.tensor([target]))
                assert float(scores.contrast[b, y, x]) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
                assert float(scores.distance[b, y, x]) == pytest.approx(float((1 - s[true].max()) ** 2), abs=1e-6)
                assert int(scores.assigned[b, y, x]) == int(s[true].argmax())


def test_split_batch_and_concat_batches_are_inverse():
    data = torch.arange(4 * 2 * 3).view(4, 2, 3).float()
    target = VoxelTarget(torch.arange(12).view(4, 3), torch.ones(4, 3), None, torch.zeros(4, 3, dtype=torch.bool))
    parts = split_batch(data, [data, data[:, :1]], target, 2)
    assert len(parts) == 2 and parts[1][0].shape[0] == 2
    assert torch.equal(parts[1][2].labels, target.labels[2:]) and parts[1][2].update_mask is None
    assert torch.equal(concat_batches([p[0] for p in parts]), data)
    joined = concat_batches([p[2] for p in parts])
    assert isinstance(joined, VoxelTarget) and torch.equal(joined.labels, target.labels)
    assert split_batch(data, None, None, 1) == [(data, None, None)]
