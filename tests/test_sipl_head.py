import io
import math
from pathlib import Path

import pytest
import torch

from conftest import small_unet
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.heads.kmeans_decoder import cluster_purity, hard_assignment, kmeans_update
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.losses import SIPLObjective, pseudo_mask_loss
from nnunetv2_proto.networks import SIPLConfig, SIPLNetwork

SMALL = SIPLConfig(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16)


def sipl(dim, k, config=SMALL, layout=None, **unet_kwargs):
    # five stages as in the CPU preset: decoder stages at 1/8, 1/4, 1/2 and full resolution
    return SIPLNetwork(small_unet(dim, k, stages=5, **unet_kwargs), layout or LabelLayout(k), config)


@pytest.mark.parametrize("dim,shape", [(2, (32, 32)), (3, (16, 32, 32))])
@pytest.mark.parametrize("k", [2, 4, 14])
def test_output_shapes_follow_nnunets_deep_supervision_contract(dim, shape, k):
    network = sipl(dim, k)
    x = torch.randn(2, 1, *shape)
    outputs, aux = network(x, return_aux=True)
    assert [tuple(o.shape) for o in outputs] == [(2, k, *[s // 2 ** i for s in shape]) for i in range(4)]
    assert len(aux.pseudo_mask_logits) == 6  # two layers on each of the three coarsest decoder stages
    stage_sizes = [[s // 2 ** i for s in shape] for i in (3, 3, 2, 2, 1, 1)]
    assert [tuple(p.shape) for p in aux.pseudo_mask_logits] == [(2, k, *s) for s in stage_sizes]
    network.decoder.deep_supervision = False
    network.eval()
    with torch.no_grad():
        single = network(x)
    assert torch.is_tensor(single) and tuple(single.shape) == (2, k, *shape)


def naive_kmeans_update(values, cluster_logits, filter_labels, tau, num_classes):
    batch, depth, voxels = values.shape
    clusters = cluster_logits.shape[1]
    out = torch.zeros(batch, clusters, depth)
    for b in range(batch):
        owner = [int(cluster_logits[b, :, v].argmax()) for v in range(voxels)]
        for n in range(clusters):
            members = [v for v in range(voxels) if owner[v] == n]
            if not members:
                continue
            if filter_labels is not None:
                best = 0.0
                for c in range(1, num_classes):
                    inside = sum(1 for v in members if int(filter_labels[b, v]) == c)
                    best = max(best, inside / len(members))
                if best < float(tau):
                    continue
            out[b, n] = torch.stack([values[b, :, v] for v in members]).mean(0)
    return out


@pytest.mark.parametrize("use_filter", [False, True])
def test_vectorised_filtered_kmeans_update_equals_a_naive_loop(use_filter):
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(2, 5, 60, generator=generator)
    cluster_logits = torch.randn(2, 7, 60, generator=generator)
    labels = torch.randint(0, 4, (2, 60), generator=generator) if use_filter else None
    tau = torch.tensor(0.3)
    expected = naive_kmeans_update(values, cluster_logits, labels, tau, 4)
    assert torch.allclose(kmeans_update(values, cluster_logits, labels, tau, 4), expected, atol=1e-6)


def test_purity_is_zero_for_an_empty_cluster_and_max_class_share_otherwise():
    logits = torch.tensor([[[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0], [-9.0, -9.0, -9.0, -9.0]]])
    classes = torch.nn.functional.one_hot(torch.tensor([[1, 1, 1, 2]]), 3)[..., 1:].float()
    assert cluster_purity(hard_assignment(logits), classes).tolist() == [[1.0, 0.5, 0.0]]


def test_gradients_reach_queries_common_proposals_and_the_prototype_mlp():
    network = sipl(3, 3)
    outputs, aux = network(torch.randn(2, 1, 16, 32, 32), return_aux=True)
    labels = torch.randint(0, 3, (2, 16, 32, 32))
    loss = sum(o.mean() for o in outputs) + pseudo_mask_loss(aux.pseudo_mask_logits, labels, torch.ones_like(labels, dtype=torch.bool))
    loss.backward()
    head = network.head
    for parameter in (head.smg.queries, head.generator.common_proposals, *head.generator.mlp.parameters()):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert all(p.grad is not None for p in network.parameters())


def test_no_nan_when_classes_are_absent_and_clusters_empty():
    network = sipl(3, 4)
    x = torch.randn(2, 1, 16, 32, 32)
    # only background in the patch: three classes absent; with 8 queries and one class many clusters own nothing
    target = torch.zeros(2, 1, 16, 32, 32)
    seg_loss = lambda outputs, t: outputs[0].mean()  # noqa: E731 - the pseudo-mask part is under test
    network.head.smg.set_tau(0.5)
    objective = SIPLObjective(seg_loss, LabelLayout(4))
    outputs, aux = network(x, return_aux=True)
    loss, parts = objective(outputs, aux, target)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)


def test_state_dict_round_trip_into_a_network_built_without_deep_supervision():
    trained = sipl(2, 3, deep_supervision=True)
    trained.head.smg.set_tau(0.37)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = sipl(2, 3, deep_supervision=False)
    fresh.load_state_dict(torch.load(buffer), strict=True)  # what nnUNetv2_predict does
    assert float(fresh.head.smg.tau) == pytest.approx(0.37)
    trained.eval(), fresh.eval()
    trained.decoder.deep_supervision = False
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), fresh(x))


@pytest.mark.parametrize("config", [SIPLConfig(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16, use_smg=False),
                                    SIPLConfig(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16,
                                               use_instance_proposals=False),
                                    SIPLConfig(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16,
                                               predictor="dynamic_conv")])
def test_variants_train_every_parameter(config):
    network = sipl(2, 3, config)
    outputs, aux = network(torch.randn(2, 1, 32, 32), return_aux=True)
    labels = torch.randint(0, 3, (2, 32, 32))
    loss = sum(o.mean() for o in outputs)
    if aux.pseudo_mask_logits:
        loss = loss + pseudo_mask_loss(aux.pseudo_mask_logits, labels, torch.ones_like(labels, dtype=torch.bool))
    loss.backward()
    assert [n for n, p in network.named_parameters() if p.grad is None] == []


def test_region_layout_uses_a_background_channel_for_pseudo_masks():
    layout = LabelLayout(2, ((0, 0), (1, 0), (1, 1)))
    network = sipl(2, 2, layout=layout)
    outputs, aux = network(torch.randn(1, 1, 32, 32), return_aux=True)
    assert outputs[0].shape[1] == 2 and aux.pseudo_mask_logits[0].shape[1] == 3


def test_residual_encoder_unet_is_supported():
    network = sipl(3, 2, residual=True)
    outputs, _ = network(torch.randn(1, 1, 16, 32, 32), return_aux=True)
    assert outputs[0].shape == (1, 2, 16, 32, 32)


def test_an_architecture_without_decoder_stages_is_rejected_with_a_fix():
    with pytest.raises(SetupError, match="PlainConvUNet"):
        SIPLNetwork(torch.nn.Conv2d(1, 2, 1), LabelLayout(2), SMALL)


def test_forward_traces_as_one_graph_for_torch_compile():
    """nnU-Net compiles the network on CUDA: no graph breaks (data-dependent Python, .item())."""
    torch._dynamo.reset()
    network = sipl(2, 3)
    compiled = torch.compile(network, backend="eager", fullgraph=True)
    outputs, aux = compiled(torch.randn(2, 1, 32, 32), return_aux=True)
    network.eval()
    network.decoder.deep_supervision = False
    compiled(torch.randn(1, 1, 32, 32))
    assert len(aux.pseudo_mask_logits) == 6 and outputs[0].shape == (2, 3, 32, 32)


def test_smg_never_runs_at_full_resolution_in_shallow_plans():
    # four stages (small images): decoder stages at 1/4, 1/2 and 1; SMG takes the two coarse ones
    network = SIPLNetwork(small_unet(2, 3, stages=4), LabelLayout(3), SMALL)
    _, aux = network(torch.randn(1, 1, 32, 32), return_aux=True)
    assert [tuple(p.shape[2:]) for p in aux.pseudo_mask_logits] == [(8, 8), (8, 8), (16, 16), (16, 16)]


def test_ignore_label_voxels_do_not_touch_the_auxiliary_loss():
    layout = LabelLayout(3, ignore_label=3)
    network = sipl(2, 3, layout=layout)
    outputs, aux = network(torch.randn(1, 1, 32, 32), return_aux=True)
    for logits in aux.pseudo_mask_logits:
        logits.retain_grad()
    target = torch.randint(0, 3, (1, 1, 32, 32)).float()
    target[..., :16] = 3  # the left half carries the ignore label
    objective = SIPLObjective(lambda outs, t: outs[0].sum() * 0, layout)
    loss, parts = objective(outputs, aux, [target])
    parts["pseudo_mask"].backward()
    assert torch.isfinite(loss)
    for logits in aux.pseudo_mask_logits:  # no gradient reaches pseudo-mask voxels inside the ignored half
        ignored = logits.grad[..., : logits.shape[-1] // 2]
        assert torch.count_nonzero(ignored) == 0 and torch.count_nonzero(logits.grad) > 0


@pytest.mark.parametrize("dim,shape", [(2, (32, 32)), (3, (16, 32, 32))])
def test_autocast_keeps_similarities_and_pseudo_masks_in_fp32(dim, shape):
    network = sipl(dim, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, aux = network(torch.randn(2, 1, *shape), return_aux=True)
    assert all(p.dtype == torch.float32 for p in aux.pseudo_mask_logits)
    assert all(torch.isfinite(o.float()).all() for o in outputs)


# --- issue: the SMG -> IPL path computes the same thing in training and inference -------------------
def pseudo_masks(network, x, training: bool):
    network.train(training)
    with torch.no_grad():
        _, aux = network(x, return_aux=True)
    return [p.clone() for p in aux.pseudo_mask_logits]


@pytest.mark.parametrize("filter_at_inference", [True, False])
def test_the_filter_runs_identically_in_train_and_eval(filter_at_inference):
    torch.manual_seed(5)
    network = sipl(3, 3, config=SIPLConfig(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16,
                                           filter_at_inference=filter_at_inference))
    network.head.smg.set_tau(0.5)  # a threshold that drops clusters of a random network
    x = torch.randn(2, 1, 16, 32, 32)
    trained, inferred = pseudo_masks(network, x, True), pseudo_masks(network, x, False)
    # equal up to float rounding (eval mode takes PyTorch's fused attention path)
    same = all(torch.allclose(a, b, atol=1e-5) and torch.equal(a.argmax(1), b.argmax(1))
               for a, b in zip(trained, inferred))
    assert same == filter_at_inference  # the legacy setting (filter in training only) must differ


def test_a_stored_spec_without_the_new_fields_rebuilds_the_old_computation():
    from nnunetv2_proto.networks import config_from_spec, normalized_spec
    from dataclasses import asdict
    stored = {k: v for k, v in asdict(SIPLConfig()).items() if k not in SIPLConfig.LEGACY_VALUES}
    assert config_from_spec(SIPLConfig, stored).filter_at_inference is False
    spec = {"kind": "sipl", "label_layout": LabelLayout(2).to_dict(), "config": stored}
    assert normalized_spec(spec)["config"]["filter_at_inference"] is False
    assert normalized_spec(spec) != normalized_spec({**spec, "config": asdict(SIPLConfig())})  # resume refused


def test_the_default_proposals_are_mass_normalised_and_the_papers_average_is_a_variant():
    from nnunetv2_proto.trainers.nnUNetTrainerSIPL import (nnUNetTrainerSIPL, nnUNetTrainerSIPL_massProposals_noSMG,
                                                          nnUNetTrainerSIPL_noSMG, nnUNetTrainerSIPL_plainProposals)
    assert nnUNetTrainerSIPL.sipl_config.normalize_proposals_by_mass
    assert not nnUNetTrainerSIPL_plainProposals.sipl_config.normalize_proposals_by_mass
    assert nnUNetTrainerSIPL_massProposals_noSMG.sipl_config == nnUNetTrainerSIPL_noSMG.sipl_config
    assert not nnUNetTrainerSIPL_noSMG.sipl_config.use_smg


def test_the_proposal_scale_does_not_split_specs_where_it_has_no_effect():
    """Without instance proposals the scale is inert: a _noIPL run keeps one spec under either proposal
    default (it resumes and rebuilds as the same network), while a plain-average SIPL run is not resumed
    as the mass-normalised default."""
    from dataclasses import asdict
    from nnunetv2_proto.networks import normalized_spec

    def spec(config: dict) -> dict:
        return {"kind": "sipl", "label_layout": LabelLayout(2).to_dict(), "config": config}
    no_ipl = asdict(SIPLConfig(use_instance_proposals=False))
    assert no_ipl["normalize_proposals_by_mass"] is False
    assert normalized_spec(spec({**no_ipl, "normalize_proposals_by_mass": True})) == normalized_spec(spec(no_ipl))
    plain = asdict(SIPLConfig(normalize_proposals_by_mass=False))
    assert normalized_spec(spec(plain)) != normalized_spec(spec(asdict(SIPLConfig())))


def test_prototypes_follow_the_masks_of_the_input():
    """Instance adaptivity: other masks, other prototypes; without instance proposals, the same ones."""
    from nnunetv2_proto.heads.instance_prototypes import PrototypeGenerator
    torch.manual_seed(0)
    features = torch.randn(2, 8, 4, 4, 4)
    masks = torch.rand(2, 3, 8, 8, 8)
    other = torch.rand(2, 3, 8, 8, 8)
    adaptive = PrototypeGenerator(3, 8, 16)
    assert not torch.allclose(adaptive(features, masks).prototypes, adaptive(features, other).prototypes)
    fixed = PrototypeGenerator(3, 8, 16, use_instance_proposals=False)
    assert torch.equal(fixed(features, masks).prototypes, fixed(features, other).prototypes)


def test_mass_normalised_proposals_do_not_shrink_with_a_small_structure():
    from nnunetv2_proto.heads.instance_prototypes import PrototypeGenerator
    features = torch.ones(1, 4, 8, 8, 8)
    small, large = torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8)
    small[:, 1, :2, :2, :2], large[:, 1, :, :4] = 1, 1
    plain, by_mass = PrototypeGenerator(2, 4, 8), PrototypeGenerator(2, 4, 8, normalize_by_mass=True)
    assert plain.instance_proposals(features, small)[0, 1, 0] < 0.05 * plain.instance_proposals(features, large)[0, 1, 0]
    assert torch.allclose(by_mass.instance_proposals(features, small)[0, 1], by_mass.instance_proposals(features, large)[0, 1])


def test_the_segmentation_loss_alone_trains_the_smg_through_the_ipl_path():
    """No auxiliary loss: the prototypes' masks come from SMG, so its parameters still get gradients."""
    torch.manual_seed(1)
    network = sipl(3, 3)
    outputs, _ = network(torch.randn(2, 1, 16, 32, 32), return_aux=True)
    outputs[0].square().mean().backward()
    smg = network.head.smg
    assert smg.queries.grad is not None and smg.queries.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in smg.layers[-1].parameters())


def test_kmax_initialisation_starts_every_layer_as_the_identity_branch():
    from nnunetv2_proto.heads.kmeans_decoder import KMeansDecoderLayer
    layer = KMeansDecoderLayer(torch.nn.Conv3d, 8, 16, 4, num_heads=2, identity_init=True)
    for last in (layer.kmeans_projection, layer.self_attention.out_proj, layer.ffn[-1]):
        assert not last.weight.any() and not last.bias.any()
    assert float(layer.cluster_to_class[-1].bias[0].detach()) == pytest.approx(math.log(3 * 0.9 / 0.1))


def test_diagnostics_report_filter_and_proposal_norms():
    network = sipl(3, 3)
    network.head.smg.set_tau(0.5)
    _, aux = network(torch.randn(2, 1, 16, 32, 32), return_aux=True)
    assert set(aux.diagnostics) == {"filter_kept_fraction", "instance_proposal_norm", "common_proposal_norm",
                                    "prototype_spread"}
    assert 0.0 <= float(aux.diagnostics["filter_kept_fraction"]) <= 1.0
    assert float(aux.diagnostics["prototype_spread"]) > 0  # two different inputs, two sets of prototypes
    assert all(not v.requires_grad for v in aux.diagnostics.values())


def test_prototype_spread_is_zero_for_fixed_prototypes_and_relative_otherwise():
    from nnunetv2_proto.networks.sipl import prototype_spread
    fixed = torch.randn(1, 3, 8).expand(4, -1, -1)
    assert float(prototype_spread(fixed)) == 0.0
    # two samples at +-d around a mean m (|d| = 0.1 |m|, per class): RMS distance / |m| = 0.1
    mean, offset = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.3, -0.4]])
    assert float(prototype_spread(torch.stack((mean + offset, mean - offset)))) == pytest.approx(0.1)
    assert float(prototype_spread(torch.stack((mean + offset, mean - offset)) * 7)) == pytest.approx(0.1)


def test_tau_schedules():
    from nnunetv2_proto.training.schedules import SIPL_TAU, SIPL_TAU_OFFICIAL, SIPL_TAU_STEP_FLOOR
    assert SIPL_TAU.tau(0, 1000) == pytest.approx(0.1) and SIPL_TAU.tau(25, 1000) == pytest.approx(0.3)
    assert SIPL_TAU.tau(50, 1000) == pytest.approx(0.5) and SIPL_TAU.tau(10, 20) == pytest.approx(0.5)
    assert SIPL_TAU_OFFICIAL.tau(10, 20) == pytest.approx(0.1)
    # 20 epochs x 10 steps: the floor stretches the ramp over 1000 steps, so epoch 10 (100 steps) is at 0.14
    assert SIPL_TAU_STEP_FLOOR.tau(10, 20, 10) == pytest.approx(0.1 + 0.4 * 100 / 1000)
    assert SIPL_TAU_STEP_FLOOR.tau(50, 1000, 250) == pytest.approx(SIPL_TAU.tau(50, 1000))  # long runs: unchanged


def test_spread_script_reads_which_label_each_mask_channel_covers():
    import importlib.util
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sipl_prototype_spread.py"
    spec = importlib.util.spec_from_file_location("sipl_prototype_spread", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 3]]])  # (B, x, y): every class on two voxels
    valid = torch.ones_like(labels, dtype=torch.bool)
    # a permuted first pass: channel 1 sits on label 2, channel 2 on label 3, channel 3 on label 1
    permuted = torch.tensor([0, 3, 1, 2])[labels]
    masks = torch.nn.functional.one_hot(permuted, 4).movedim(-1, 1).float()
    found = module.read_mask_confusion(module.label_by_channel(masks, labels, valid))
    assert found["mask_covers"] == [2, 3, 1]
    assert found["mask_dice"] == pytest.approx([0.0, 0.0, 0.0])
    aligned = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    assert module.read_mask_confusion(module.label_by_channel(aligned, labels, valid)) == {
        "mask_dice": pytest.approx([1.0, 1.0, 1.0]), "mask_covers": [1, 2, 3]}
