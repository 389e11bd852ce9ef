"""How instance-adaptive a trained SIPL model's prototypes are, on its fold's validation patches.

SIPL's prototypes g_k = MLP(instance proposal (+) common proposal) should change with the input
(the paper's "instance-adaptive"); the common proposal is one learnt vector per class. For each
trained run this prints, over patches from nnU-Net's validation loader of the run's fold:

- spread: per class, the RMS distance of the patches' prototypes from their mean, over the norm of
  that mean (0: every input gets the same prototypes, i.e. a fixed linear classifier);
- instance share: how far the prototypes move when the instance proposal is replaced by zeros,
  over their norm (0: the MLP ignores the instance proposal);
- the mean norms of the instance and common proposals (the training log's diagnostic);
- mask Dice (label layouts): per foreground class, the Dice of the masks the instance proposals pool over (argmax on
  their grid) against the validation target: the last SMG pseudo mask for full SIPL, the head's
  first-pass prediction for ``_noSMG``. An instance proposal is only as good as the mask it averages.
- mask channel covers: per foreground class, the label that most of the voxels where that class's mask
  wins the argmax carry (``-`` where it never wins). Only full SIPL's masks are trained against the
  labels (the SMG's auxiliary loss); ``_noSMG``'s first pass is not, so nothing ties its channel k
  to class k, and on a multi-class layout the pooled region of a class can be another class's.

Run: python benchmarks/sipl_prototype_spread.py -d 501 -c 3d_cpu -f 0 \\
         -tr nnUNetTrainerSIPL_cpuBudgetLong_seed1 nnUNetTrainerSIPL_noSMG_cpuBudgetLong_seed1 --batches 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from nnunetv2_proto.label_layout import downsample_labels
from nnunetv2_proto.networks import attach_head_spec, checkpoint_head_spec
from nnunetv2_proto.networks.sipl import prototype_spread


def measure_run(dataset: str, configuration: str, fold: int, trainer_name: str, batches: int) -> Dict[str, object]:
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, device=torch.device("cpu"))
    # leave the run's folder as it was: nnU-Net's constructor has already opened a training log there
    Path(trainer.log_file).unlink(missing_ok=True)
    trainer.log_file = os.path.join(tempfile.mkdtemp(), "log.txt")
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint} does not exist: train {trainer_name} fold {fold} first")
    # the head as the run was trained (a run may predate a change of the trainer's defaults), as
    # nnUNetv2_predict builds it from the run's own plans
    stored = checkpoint_head_spec(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True))
    attach_head_spec(trainer.plans_manager, configuration, trainer.configuration_manager, stored)
    trainer.initialize()
    trainer.load_checkpoint(str(checkpoint))
    network = trainer.core_network.eval()
    generator = network.head.generator
    if not generator.use_instance_proposals:
        print(f"{trainer_name}: no instance proposals (common proposals only): spread 0 by construction")
    calls: List = []  # (masks, prototypes) of each generator call
    handle = generator.register_forward_hook(lambda module, inputs, output: calls.append((inputs[1], output)))
    captured: List = []  # the prototypes each forward pass predicts with
    mask_confusions: List[torch.Tensor] = []
    _, validation_loader = trainer.get_dataloaders()
    try:
        with torch.no_grad():
            for _ in range(batches):
                data, target = trainer.to_device(next(validation_loader))
                calls.clear()
                network(data)
                masks, prototypes = calls[-1]  # without SMG a first call (no instance proposals) precedes it
                captured.append(prototypes)
                # region masks overlap, so an argmax over them is no segmentation: label layouts only
                if masks is not None and not trainer.label_layout.has_regions:
                    voxels = trainer.voxel_target(target)
                    mask_confusions.append(label_by_channel(masks, voxels.labels, voxels.valid))
    finally:
        handle.remove()
    found = summarise(generator, captured)
    if mask_confusions:
        found.update(read_mask_confusion(sum(mask_confusions)))
    return found


def label_by_channel(masks: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(K, K) voxel counts: row = label, column = the mask channel that wins the argmax, on the masks' grid."""
    labels, valid = downsample_labels(labels, valid, masks.shape[2:])
    num_classes = masks.shape[1]
    inside = valid.bool()
    pairs = labels[inside].long() * num_classes + masks.argmax(1)[inside].long()
    return torch.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def read_mask_confusion(confusion: torch.Tensor) -> Dict[str, List]:
    """Per foreground class: Dice of its mask channel, and the label most of that channel's voxels carry."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    both = confusion.sum(0) + confusion.sum(1)  # predicted + reference voxels of each class
    dice = torch.where(both > 0, 2 * true_positive / both.clamp_min(1), torch.full_like(both, float("nan")))
    covers = [int(confusion[:, k].argmax()) if confusion[:, k].sum() > 0 else None
              for k in range(confusion.shape[1])]
    return {"mask_dice": dice[1:].tolist(), "mask_covers": covers[1:]}


@torch.no_grad()
def summarise(generator, captured: List) -> Dict[str, float]:
    prototypes = torch.cat([c.prototypes for c in captured]).float()
    common = torch.cat([c.common_proposals for c in captured]).float()
    found = {"patches": float(prototypes.shape[0]), "spread": float(prototype_spread(prototypes)),
             "common_norm": float(common.norm(dim=-1).mean())}
    if captured[0].instance_proposals is not None:
        instance = torch.cat([c.instance_proposals for c in captured]).float()
        without_instance = generator.mlp(torch.cat((torch.zeros_like(instance), common), -1)).float()
        found["instance_share"] = float(((prototypes - without_instance).norm(dim=-1)
                                         / prototypes.norm(dim=-1).clamp_min(1e-12)).mean())
        found["instance_norm"] = float(instance.norm(dim=-1).mean())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", required=True)
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trained SIPL runs (trainer names)")
    parser.add_argument("--batches", type=int, default=8, help="validation batches (of the plans' batch size)")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # in-process loading: a handful of batches
    print("| run | patches | prototype spread | instance share | instance proposal norm | common proposal norm "
          "| mask Dice per class | mask channel covers label |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.trainers:
        r = measure_run(args.dataset, args.configuration, args.fold, name, args.batches)
        instance = (f"{r['instance_share']:.3f} | {r['instance_norm']:.2f}" if "instance_share" in r else "- | -")
        masks = " / ".join(f"{d:.3f}" for d in r["mask_dice"]) if "mask_dice" in r else "-"
        covers = (" / ".join("-" if label is None else str(label) for label in r["mask_covers"])
                  if "mask_covers" in r else "-")
        print(f"| `{name}` | {r['patches']:.0f} | {r['spread']:.4f} | {instance} | {r['common_norm']:.2f} | {masks} "
              f"| {covers} |")


if __name__ == "__main__":
    main()
