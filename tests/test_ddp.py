"""The heads under torch.distributed (gloo, 2 CPU processes), wrapped the way nnU-Net wraps them.

nnU-Net uses DDP without find_unused_parameters: a parameter without a gradient in one
step makes the next step fail. Each scenario therefore runs two steps per training phase
and also checks every gradient explicitly.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from conftest import small_unet
from nnunetv2_proto.heads.multi_prototype import MultiPrototypeClassifier
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.losses import FullResolutionTarget, MPERObjective, SIPLObjective, VoxelTarget, VoxelWeightedDiceCE
from nnunetv2_proto.semi.copy_paste import both_ways, copy_paste, cuboid_masks, swapped_pairs
from nnunetv2_proto.networks import MPERConfig, MPERNetwork, SIPLConfig, SIPLNetwork

WORLD = 2
SIPL_SMALL = dict(num_queries=8, query_dim=16, num_heads=2, prototype_dim=16)


def nnunet_loss(ddp: bool, batch_dice: bool, num_outputs: int):
    """nnU-Net's DC_and_CE loss with its deep-supervision weights (1e-6 on the coarsest output under DDP)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp}, {},
                          dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(num_outputs)])
    weights[-1] = 1e-6 if ddp else 0
    return loss, DeepSupervisionWrapper(loss, weights / weights.sum())


def batch(seed: int, k: int, size=(32, 32)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, *size, generator=generator)
    target = torch.randint(0, k, (4, 1, *size), generator=generator).float()
    targets = [target] + [F.interpolate(target, scale_factor=0.5 ** i, mode="nearest-exact") for i in (1, 2, 3)]
    return x, targets


def sipl_network(config=None):
    torch.manual_seed(7)
    return SIPLNetwork(small_unet(2, 3, stages=5), LabelLayout(3), config or SIPLConfig(**SIPL_SMALL))


def sipl_gradients(network, x, targets, objective):
    outputs, aux = network(x, return_aux=True)
    loss, _ = objective(outputs, aux, targets)
    loss.backward()
    return loss


def two_steps(network, run_step):
    """Two optimiser steps: DDP reports a parameter without gradient at the second one."""
    optimiser = torch.optim.SGD(network.parameters(), lr=1e-3)
    for _ in range(2):
        optimiser.zero_grad()
        run_step()
        missing = [n for n, p in network.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"
        optimiser.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    mine = slice(2 * rank, 2 * rank + 2)

    # 1) SIPL gradients under DDP equal one process on the whole batch
    x, targets = batch(0, 3)
    network = DistributedDataParallel(sipl_network())
    # nnU-Net's DDP weights (1e-6, not 0, on the coarsest output: DDP never reduces a bucket holding a
    # parameter without gradient); per-sample Dice, so the loss is a mean over samples
    _, ds_loss = nnunet_loss(ddp=True, batch_dice=False, num_outputs=4)
    network.module.head.smg.set_tau(0.3)
    sipl_gradients(network, x[mine], [t[mine] for t in targets], SIPLObjective(ds_loss, LabelLayout(3)))
    results["sipl_grads"] = {n: p.grad.clone() for n, p in network.module.named_parameters()}

    # 2) every parameter has a gradient in every step, with nnU-Net's DDP loss settings, for each variant
    _, ds_loss = nnunet_loss(ddp=True, batch_dice=True, num_outputs=4)
    for variant in (dict(), dict(use_smg=False), dict(use_instance_proposals=False), dict(predictor="dynamic_conv")):
        ddp = DistributedDataParallel(sipl_network(SIPLConfig(**SIPL_SMALL, **variant)))
        objective = SIPLObjective(ds_loss, LabelLayout(3))
        two_steps(ddp, lambda: sipl_gradients(ddp, x[mine], [t[mine] for t in targets], objective))

    # 3) MPER: warm-up and prototype phases; prototypes identical on every rank
    torch.manual_seed(7)
    mper = DistributedDataParallel(MPERNetwork(small_unet(2, 3, stages=5), LabelLayout(3), MPERConfig(2)))
    full_loss, ds_loss = nnunet_loss(ddp=True, batch_dice=True, num_outputs=4)
    objective = MPERObjective(ds_loss, FullResolutionTarget(full_loss), LabelLayout(3))
    core = mper.module

    def mper_step(prototype_phase: bool):
        outputs, aux = mper(x[mine], return_aux=True)
        labels = targets[0][mine, 0].long()
        scores = core.classifier.scores(aux.features, labels) if prototype_phase else None
        extra = (scores, core.prototype_output_logits(scores.logits), 0.5) if prototype_phase else ()
        loss, _ = objective(outputs, aux, [t[mine] for t in targets], *extra)
        loss.backward()
        if prototype_phase:
            core.classifier.ema_update(aux.features, labels, torch.ones_like(labels, dtype=torch.bool),
                                       scores.assigned, scores.correct)
        else:
            core.classifier.initialize_classes([aux.features.detach().movedim(1, -1)[labels == k] for k in range(3)])

    two_steps(mper, lambda: mper_step(False))
    two_steps(mper, lambda: mper_step(True))
    results["mper_prototypes"] = core.classifier.prototypes.clone()

    # 4) semi-supervised MPER: copy-paste warm-up, then self-training with weighted pseudo labels
    torch.manual_seed(7)
    semi = DistributedDataParallel(MPERNetwork(small_unet(2, 3, stages=5), LabelLayout(3), MPERConfig(2)))
    full_loss, ds_loss = nnunet_loss(ddp=True, batch_dice=True, num_outputs=4)
    mixed_objective = MPERObjective(VoxelWeightedDiceCE(ds_loss), VoxelWeightedDiceCE(full_loss), LabelLayout(3))
    core_semi = semi.module
    core_semi.classifier.initialize_classes([torch.randn(20, 8) for _ in range(3)])

    def semi_step(self_training: bool):
        labels = targets[0][mine, 0].long()
        masks = cuboid_masks(2, labels.shape[1:], generator=torch.Generator().manual_seed(rank))
        if self_training:
            both = torch.cat((masks, masks))
            images = copy_paste(*both_ways(x[mine], x[mine].flip(0)), both)
            mixed = copy_paste(*both_ways(labels, labels.flip(0)), both)
            weights = copy_paste(*both_ways(torch.ones_like(labels).float(), torch.full(labels.shape, 0.5)), both)
        else:
            images = copy_paste(x[mine], swapped_pairs(x[mine]), masks)
            mixed = copy_paste(labels, swapped_pairs(labels), masks)
            weights = torch.ones_like(labels).float()
        target = VoxelTarget(mixed, weights, weights > 0)
        outputs, aux = semi(images, return_aux=True)
        scores = core_semi.classifier.scores(aux.features, mixed) if self_training else None
        extra = (scores, core_semi.prototype_output_logits(scores.logits), 0.5) if self_training else ()
        loss, _ = mixed_objective(outputs, aux, target, *extra)
        loss.backward()

    two_steps(semi, lambda: semi_step(False))
    two_steps(semi, lambda: semi_step(True))

    # 5) EMA and k-means initialisation equal one process that sees the whole batch
    classifier = MultiPrototypeClassifier(3, 2, 6)
    generator = torch.Generator().manual_seed(11)
    embedding = F.normalize(torch.randn(4, 6, 8, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (4, 8, 8), generator=generator)
    samples = [embedding[mine].movedim(1, -1)[labels[mine] == k] for k in range(3)]
    classifier.initialize_classes(samples, seed=3)
    classifier.ema_update(embedding[mine], labels[mine], torch.ones_like(labels[mine], dtype=torch.bool),
                          *classifier.assignments(embedding[mine], labels[mine]))
    results["ema_prototypes"] = classifier.prototypes.clone()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_sipl_gradients_under_ddp_equal_one_process_on_the_whole_batch(ddp_results):
    x, targets = batch(0, 3)
    network = sipl_network()
    network.head.smg.set_tau(0.3)
    _, ds_loss = nnunet_loss(ddp=True, batch_dice=False, num_outputs=4)
    sipl_gradients(network, x, targets, SIPLObjective(ds_loss, LabelLayout(3)))
    for name, parameter in network.named_parameters():
        for rank in range(WORLD):
            # atol covers conv biases before InstanceNorm, whose true gradient is 0 (float noise ~1e-9)
            assert torch.allclose(ddp_results[rank]["sipl_grads"][name], parameter.grad, rtol=1e-4, atol=1e-7), name


def test_every_phase_trains_every_parameter_under_ddp(ddp_results):
    # the worker asserts inside each step; reaching here means all phases and variants passed
    assert all("mper_prototypes" in r for r in ddp_results)


def test_prototypes_stay_identical_across_ranks(ddp_results):
    assert torch.equal(ddp_results[0]["mper_prototypes"], ddp_results[1]["mper_prototypes"])
    assert torch.equal(ddp_results[0]["ema_prototypes"], ddp_results[1]["ema_prototypes"])


def test_distributed_prototype_updates_equal_one_process_on_the_whole_batch(ddp_results):
    classifier = MultiPrototypeClassifier(3, 2, 6)
    generator = torch.Generator().manual_seed(11)
    embedding = F.normalize(torch.randn(4, 6, 8, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (4, 8, 8), generator=generator)
    # rank order = batch order, as all_gather concatenates
    samples = [torch.cat([embedding[s].movedim(1, -1)[labels[s] == k] for s in (slice(0, 2), slice(2, 4))])
               for k in range(3)]
    classifier.initialize_classes(samples, seed=3)
    classifier.ema_update(embedding, labels, torch.ones_like(labels, dtype=torch.bool),
                          *classifier.assignments(embedding, labels))
    assert torch.allclose(ddp_results[0]["ema_prototypes"], classifier.prototypes, atol=1e-6)
