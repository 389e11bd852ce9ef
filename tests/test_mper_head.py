import io
import math

import pytest
import torch
from torch.nn import functional as F

from conftest import small_unet
from nnunetv2_proto import voxel_blocks
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.heads.multi_prototype import (ClassEmbeddingSampler, MultiPrototypeClassifier, SlotBalance,
                                                 balanced_slot_offsets, kmeans_centres)
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.losses import FullResolutionTarget, MPERObjective
from nnunetv2_proto.networks import MPERConfig, MPERNetwork


def initialised_classifier(k=3, m=2, c=6, seed=0):
    classifier = MultiPrototypeClassifier(k, m, c, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    classifier.prototypes.copy_(F.normalize(torch.randn(k, m, c, generator=generator), dim=-1))
    classifier.initialized.fill_(True)
    return classifier


def naive_ema(prototypes, initialized, embedding, labels, valid, momentum):
    k, m, c = prototypes.shape
    e = embedding.movedim(1, -1).reshape(-1, c)
    lab, ok = labels.reshape(-1), valid.reshape(-1)
    sums, counts = torch.zeros(k, m, c), torch.zeros(k, m)
    for v in range(e.shape[0]):
        sims = torch.stack([torch.stack([torch.dot(e[v], prototypes[a, b]) for b in range(m)]) for a in range(k)])
        # the classifier's prediction: uninitialised classes never win
        predicted = int(torch.where(initialized, sims.max(1).values, torch.tensor(-2.0)).argmax())
        true = int(lab[v])
        if not ok[v] or predicted != true or not initialized[true]:
            continue
        nearest = int(sims[true].argmax())
        sums[true, nearest] += e[v]
        counts[true, nearest] += 1
    out = prototypes.clone()
    for a in range(k):
        for b in range(m):
            if counts[a, b] > 0:
                out[a, b] = F.normalize(momentum * prototypes[a, b] + (1 - momentum) * sums[a, b] / counts[a, b], dim=0)
    return out, counts


def test_vectorised_ema_update_equals_a_naive_loop():
    classifier = initialised_classifier()
    classifier.initialized[2] = False  # an uninitialised class never moves
    generator = torch.Generator().manual_seed(1)
    embedding = F.normalize(torch.randn(2, 6, 5, 7, generator=generator), dim=1)
    labels = torch.randint(0, 3, (2, 5, 7), generator=generator)
    valid = torch.rand(2, 5, 7, generator=generator) > 0.2
    expected, expected_counts = naive_ema(classifier.prototypes.clone(), classifier.initialized.clone(), embedding,
                                          labels, valid, 0.9)
    counts = classifier.ema_update(embedding, labels, valid, *classifier.assignments(embedding, labels))
    assert torch.allclose(classifier.prototypes, expected, atol=1e-6)
    assert torch.equal(counts, expected_counts) and counts.sum() > 0


def cosine_similarities(features, prototypes, labels):
    """The definitions: cosine to every prototype (B, K, M, *s) and to the own class's ones (B, M, *s)."""
    m = prototypes.shape[1]
    similarities = torch.einsum("bc...,kmc->bkm...", F.normalize(features, dim=1), prototypes)
    return similarities, similarities.gather(1, labels[:, None, None].expand(-1, 1, m, *labels.shape[1:])).squeeze(1)


def composed_scores(features, prototypes, labels, unseen, temperature, assigned=None):
    """The definitions, with autograd through every (B, K, M, *s) tensor: what the fused function must equal.
    ``assigned``: the own-class prototype each voxel targets; None: its nearest."""
    k, m, _ = prototypes.shape
    similarities, own = cosine_similarities(features, prototypes, labels)
    logits = (similarities.max(2).values / temperature).masked_fill(
        unseen.view(1, k, *([1] * (features.ndim - 2))), -1 / temperature)
    if assigned is None:
        assigned = own.detach().max(1).indices
    contrast = F.cross_entropy(similarities.flatten(1, 2) / temperature, labels * m + assigned, reduction="none")
    distance = (1 - own.gather(1, assigned.unsqueeze(1)).squeeze(1)) ** 2
    return logits, contrast, distance, assigned


@pytest.mark.parametrize("shape,temperature,blocks", [
    ((2, 6, 5, 7), 0.1, 1), ((2, 6, 3, 4, 5), 0.1, 1),
    ((2, 6, 5, 7), 0.005, 1),  # 1/T > 40: the shifted log-sum-exp
    ((2, 6, 5, 7, 4), 0.1, 3), ((2, 6, 5, 7, 4), 0.005, 3)])  # voxel blocks of 64, 64 and 12
def test_fused_scores_equal_the_composed_definitions_in_value_and_gradient(shape, temperature, blocks, monkeypatch):
    monkeypatch.setattr(voxel_blocks, "CPU_BLOCK_BYTES", 1 if blocks > 1 else 1 << 30)
    assert len(voxel_blocks.voxel_blocks(math.prod(shape[2:]), 4 * shape[0] * 6, torch.device("cpu"))) == blocks
    classifier = initialised_classifier().double()
    classifier.temperature = temperature
    classifier.initialized[1] = False
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(*shape, generator=generator, dtype=torch.double, requires_grad=True)
    labels = torch.randint(0, 3, (shape[0], *shape[2:]), generator=generator)
    fused = classifier.scores(features, labels)
    composed = composed_scores(features, classifier.prototypes, labels, ~classifier.initialized, classifier.temperature)
    for ours, expected in zip(fused, composed):
        assert ours.shape == expected.shape and torch.allclose(ours, expected.to(ours.dtype))
    assert torch.equal(fused.correct, composed[0].argmax(1) == labels)
    assert torch.equal(classifier.class_logits(features), fused.logits)  # inference scores as training does
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.double) for t in composed[:3]]

    def gradient(terms):
        return torch.autograd.grad(sum((t * u).sum() for t, u in zip(terms, upstream)), features)[0]
    expected_gradient = gradient(composed[:3])
    assert torch.allclose(gradient(fused[:3]), expected_gradient) and expected_gradient.abs().sum() > 0
    # fast_mode checks a random projection of the Jacobian: full gradchecks of the blocked 3D cases took minutes
    assert torch.autograd.gradcheck(lambda f: classifier.scores(f, labels)[:3], (features,), fast_mode=True)


def balanced(cosine, labels, weights, num_classes, balance=SlotBalance()):
    return (cosine + balanced_slot_offsets(cosine, labels, weights, num_classes, balance)[labels]).argmax(1)


def test_balanced_assignment_spreads_a_class_that_nearest_puts_on_one_prototype():
    generator = torch.Generator().manual_seed(5)
    n, m = 600, 3
    # every voxel of both classes is nearest to prototype 0, by 0.1 +- noise
    cosine = 0.5 + 0.05 * torch.randn(2 * n, m, generator=generator)
    cosine[:, 0] += 0.1
    labels = torch.cat((torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)))
    assert bool((cosine.argmax(1) == 0).float().mean() > 0.85)
    weights = torch.ones(2 * n)
    weights[n:n + n // 2] = 0  # ignored voxels carry no mass
    assigned = balanced(cosine, labels, weights, 3)  # class 2 is absent from the batch
    for cls in (0, 1):
        counted = (labels == cls) & (weights > 0)
        counts = torch.bincount(assigned[counted], minlength=m)
        assert bool((counts >= 0.25 * counted.sum()).all()), counts
    assert torch.equal(balanced_slot_offsets(cosine, labels, weights, 3, SlotBalance())[2], torch.zeros(m))
    # voxels that already form M equal clusters near M distinct prototypes keep their nearest prototype
    clustered = torch.full((3 * n, m), 0.2)
    clustered[torch.arange(3 * n), torch.arange(3 * n) % m] = 0.9
    clustered += 0.01 * torch.rand(clustered.shape, generator=generator)
    assert torch.equal(balanced(clustered, torch.zeros(3 * n, dtype=torch.long), None, 1), clustered.argmax(1))


@pytest.mark.parametrize("shape,blocks,sample_voxels", [
    ((2, 6, 5, 7), 1, 32768), ((2, 6, 5, 7, 4), 3, 32768),
    ((2, 6, 5, 7, 4), 3, 50)])  # offsets estimated on every 6th voxel
def test_balanced_scores_target_the_balanced_assignment_in_value_and_gradient(shape, blocks, sample_voxels,
                                                                              monkeypatch):
    monkeypatch.setattr(voxel_blocks, "CPU_BLOCK_BYTES", 1 if blocks > 1 else 1 << 30)
    classifier = initialised_classifier().double()
    classifier.balance = SlotBalance(sample_voxels=sample_voxels)
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(*shape, generator=generator, dtype=torch.double, requires_grad=True)
    labels = torch.randint(0, 3, (shape[0], *shape[2:]), generator=generator)
    valid = torch.rand(labels.shape, generator=generator) > 0.2
    fused = classifier.scores(features, labels, valid)
    own = cosine_similarities(features.detach(), classifier.prototypes, labels)[1]
    cosine, flat_labels = own.flatten(2).transpose(1, 2).reshape(-1, own.shape[1]), labels.flatten()  # (B * N, M)
    sample = torch.arange(0, len(flat_labels), -(-len(flat_labels) // sample_voxels))
    offsets = balanced_slot_offsets(cosine[sample], flat_labels[sample], valid.flatten()[sample], 3,
                                    classifier.balance)
    expected_assigned = (cosine + offsets[flat_labels]).argmax(1).view(labels.shape)
    assert torch.equal(fused.assigned, expected_assigned)
    composed = composed_scores(features, classifier.prototypes, labels, ~classifier.initialized,
                               classifier.temperature, assigned=expected_assigned)
    for ours, expected in zip(fused, composed):
        assert torch.allclose(ours, expected.to(ours.dtype))
    # right or wrong is the classifier's answer, whichever prototype the voxel trains
    assert torch.equal(fused.correct, composed[0].argmax(1) == labels)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.double) for t in composed[:3]]

    def gradient(terms):
        return torch.autograd.grad(sum((t * u).sum() for t, u in zip(terms, upstream)), features)[0]
    assert torch.allclose(gradient(fused[:3]), gradient(composed[:3]))
    classifier.balance = None
    assert not torch.equal(classifier.scores(features, labels, valid).assigned, fused.assigned)


def test_mper_config_names_the_slot_assignment():
    assert mper(slot_assignment="balanced").classifier.balance == SlotBalance()
    assert mper().classifier.balance is None
    with pytest.raises(SetupError, match="slot assignment"):
        MPERConfig(slot_assignment="sinkhorn")


@pytest.mark.parametrize("temperature", [0.025, 0.02])  # either side of the shift-free limit 1/T = 40
def test_fp32_contrast_stays_finite_and_exact_at_low_temperature(temperature):
    classifier = initialised_classifier()
    classifier.temperature = temperature
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 9, 9, generator=generator, requires_grad=True)
    labels = torch.randint(0, 3, (2, 9, 9), generator=generator)
    scores = classifier.scores(features, labels)
    expected = composed_scores(features.double(), classifier.prototypes.double(), labels, ~classifier.initialized,
                               temperature)
    assert torch.allclose(scores.contrast.double(), expected[1], rtol=1e-4, atol=1e-4)
    gradient, = torch.autograd.grad(scores.contrast.sum(), features)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_a_class_absent_from_the_batch_keeps_its_prototypes_and_nothing_becomes_nan():
    classifier = initialised_classifier()
    before = classifier.prototypes.clone()
    embedding = F.normalize(torch.randn(2, 6, 4, 4), dim=1)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)  # only class 0 present
    scores = classifier.scores(embedding, labels)
    classifier.ema_update(embedding, labels, torch.ones_like(labels, dtype=torch.bool), scores.assigned,
                          scores.correct)
    assert torch.equal(classifier.prototypes[1:], before[1:])
    assert torch.isfinite(classifier.prototypes).all()
    assert all(torch.isfinite(term).all() for term in scores[:4])


@pytest.mark.parametrize("n", [1, 2, 3, 50])
def test_kmeans_initialisation_handles_tiny_samples(n):
    samples = F.normalize(torch.randn(n, 8), dim=-1).numpy()
    centres = kmeans_centres(samples, 3, seed=0)
    assert centres.shape == (3, 8)
    assert abs(float((centres ** 2).sum(1).min()) - 1) < 1e-5
    # distinct centres even when there are fewer samples than centres
    assert len({tuple(c.round(6)) for c in centres}) == 3


def test_initialize_classes_leaves_unseen_classes_for_later():
    classifier = MultiPrototypeClassifier(3, 2, 4)
    new = classifier.initialize_classes([torch.randn(5, 4), None, torch.randn(1, 4)])
    assert new == [0, 2] and classifier.initialized.tolist() == [True, False, True]
    assert classifier.initialize_classes([None, torch.randn(3, 4), None]) == [1]


def test_uninitialised_classes_never_win_the_prototype_classifier():
    classifier = MultiPrototypeClassifier(2, 1, 4)
    classifier.initialized[0] = True
    classifier.prototypes[1, 0] = torch.tensor([1.0, 0, 0, 0])  # identical to the embedding below
    embedding = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1)
    logits = classifier.class_logits(embedding)
    assert logits[0, :, 0].argmax() == 0


def test_embedding_sampler_is_bounded_uniform_and_uses_only_valid_voxels():
    sampler = ClassEmbeddingSampler(num_classes=3, capacity=50, seed=0)
    for step in range(4):
        embedding = torch.full((1, 2, 100), float(step))
        labels = torch.tensor([0] * 60 + [1] * 40).view(1, 100)
        valid = torch.ones_like(labels, dtype=torch.bool)
        valid[0, :5] = False
        sampler.add(embedding, labels, valid)
    samples = sampler.samples()
    assert samples[0].shape == (50, 2) and samples[1].shape == (50, 2) and samples[2] is None
    # every batch contributed (uniform over 4 batches, not the last one only)
    assert len(set(samples[1][:, 0].tolist())) == 4


def mper(k=3, inference="linear", layout=None, dim=2, slot_assignment="nearest"):
    return MPERNetwork(small_unet(dim, k), layout or LabelLayout(k),
                       MPERConfig(prototypes_per_class=2, inference=inference, slot_assignment=slot_assignment))


def test_linear_inference_returns_exactly_the_final_linear_layer():
    network = mper().eval()
    network.decoder.deep_supervision = False
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        skips = network.encoder(x)
        from nnunetv2_proto.networks.decoder_head_network import decoder_stage_features
        linear = network.decoder.seg_layers[-1](decoder_stage_features(network.decoder, skips)[-1])
        assert torch.equal(network(x), linear)


@pytest.mark.parametrize("inference", ["prototype", "fused"])
@pytest.mark.parametrize("regions", [False, True])
def test_prototype_and_fused_inference_give_logits_for_every_output(inference, regions):
    layout = LabelLayout(2, ((0, 0), (1, 0), (1, 1))) if regions else LabelLayout(3)
    network = mper(layout.num_outputs, inference, layout).eval()
    network.classifier.initialized.fill_(True)
    network.decoder.deep_supervision = False
    with torch.no_grad():
        out = network(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, layout.num_outputs, 32, 32) and torch.isfinite(out).all()


def test_objective_phases_and_state_dict_round_trip():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    network = mper(3, dim=3)
    network.classifier.initialized.fill_(True)
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, dice_class=MemoryEfficientSoftDiceLoss)
    objective = MPERObjective(lambda outs, t: loss(outs[0], t[0]), FullResolutionTarget(loss), LabelLayout(3))
    target = torch.randint(0, 3, (2, 1, 16, 32, 32)).float()
    outputs, aux = network(torch.randn(2, 1, 16, 32, 32), return_aux=True)
    warm, warm_parts = objective(outputs, aux, [target])
    scores = network.classifier.scores(aux.features, target[:, 0].long())
    full, parts = objective(outputs, aux, [target], scores, network.prototype_output_logits(scores.logits), 0.5)
    assert set(warm_parts) == {"seg"} and {"seg_prototype", "ppc", "ppd", "consistency"} <= set(parts)
    assert torch.isfinite(full) and full > warm
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    buffer.seek(0)
    fresh = mper(3, dim=3)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    assert torch.equal(fresh.classifier.prototypes, network.classifier.prototypes)
    assert bool(fresh.classifier.initialized.all())


def test_mper_forward_traces_as_one_graph_for_torch_compile():
    torch._dynamo.reset()
    network = mper(3)
    compiled = torch.compile(network, backend="eager", fullgraph=True)
    outputs, aux = compiled(torch.randn(2, 1, 32, 32), return_aux=True)
    assert aux.features.shape[2:] == (32, 32) and aux.linear_logits.shape == (2, 3, 32, 32)


def test_autocast_keeps_the_prototype_path_finite():
    network = mper(3, dim=3)
    network.classifier.initialized.fill_(True)
    labels = torch.randint(0, 3, (2, 16, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, aux = network(torch.randn(2, 1, 16, 32, 32), return_aux=True)
        scores = network.classifier.scores(aux.features, labels)
    assert all(term.dtype in (torch.float32, torch.int64) for term in scores[:4])
    assert all(torch.isfinite(term).all() for term in scores[:4]) and scores.logits.abs().max() <= 1.01 / 0.1
    scores.contrast.mean().backward()
