"""What the plugin's trainers share.

``ExtensibleTrainerMixin`` (any nnUNetTrainer): nnU-Net's training step split into hooks
(``training_inputs``, ``voxel_target``, ``forward_and_loss``, ``after_optimizer_step``), loss-part
logging, checkpoint state beyond network/optimizer that ``--c`` must restore, and
``enter_steady_state`` (the phase a profiler should time).

``PhasedTrainerMixin``: a warm-up and a main phase from the trainer's ``PhasePlan``
(``training.schedules``).

``PrototypeTrainerBase``: building the network from the plans' head spec, the head's
auxiliary outputs in the loss, and a clear error when ``--c`` meets a checkpoint written
with a different head.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.losses import VoxelTarget, as_voxel_target
from nnunetv2_proto.networks import (HEAD_SPEC_KEY, attach_head_spec, build_from_plans, checkpoint_head_spec,
                                     head_spec, normalized_spec)
from nnunetv2_proto.training.schedules import PhasePlan

EXTRA_STATE_KEY = "nnunetv2_proto_state"


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def split_batch(data: torch.Tensor, target, voxels: Optional[VoxelTarget], passes: int) -> List[tuple]:
    """(data, target, voxels) cut into ``passes`` equal parts along the batch axis (one part: as given)."""
    if passes == 1:
        return [(data, target, voxels)]

    def parts(value):
        if value is None:
            return [None] * passes
        if isinstance(value, VoxelTarget):
            return [VoxelTarget(*fields) for fields in zip(*(parts(f) for f in value))]
        if isinstance(value, (list, tuple)):
            return [list(p) for p in zip(*(parts(v) for v in value))]
        return list(value.chunk(passes))
    return list(zip(parts(data), parts(target), parts(voxels)))


def concat_batches(parts: Sequence[Any]) -> Any:
    """The inverse of ``split_batch`` for auxiliary outputs: tensors (also inside tuples and lists) joined
    along the batch axis."""
    first = parts[0]
    if len(parts) == 1 or first is None:
        return first
    if torch.is_tensor(first):
        return torch.cat(parts)
    joined = [concat_batches(fields) for fields in zip(*parts)]
    return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)


class ExtensibleTrainerMixin:
    """Put before ``nnUNetTrainer`` (or a subclass) in the bases."""

    @property
    def core_network(self) -> nn.Module:
        return unwrap(self.network)

    @cached_property
    def label_layout(self) -> LabelLayout:
        """The exclusive-class view of the labels (built on first use: plain nnU-Net training never needs it,
        so a layout the heads cannot serve stops only the trainers that do)."""
        return LabelLayout.from_label_manager(self.label_manager)

    def build_objective(self) -> Optional[nn.Module]:
        """The training loss as a library module wrapping nnU-Net's loss (``self.loss``); None: no extra."""
        return None

    def initialize(self):
        super().initialize()
        self.objective = self.build_objective()

    # --- training step ----------------------------------------------------------------------
    def training_inputs(self, batch: dict) -> Tuple[torch.Tensor, Any]:
        """The step's network input and target (a family may build them, e.g. copy-paste batches)."""
        return self.to_device(batch)

    def labelled_batch(self, batch: dict) -> dict:
        """The labelled patches of a training batch as nnU-Net's data loader yields them."""
        return batch

    def to_device(self, batch: dict) -> Tuple[torch.Tensor, Any]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data, target

    def voxel_target(self, target) -> Optional[VoxelTarget]:
        """The step's exclusive-class target, built once for every loss and update that needs it; None: unused."""
        return None

    def forward_and_loss(self, data: torch.Tensor, target, voxels: Optional[VoxelTarget]
                         ) -> Tuple[torch.Tensor, Dict[str, Any], Optional[Any]]:
        """(loss, named loss parts for the log, auxiliary outputs for ``after_optimizer_step``)."""
        loss = self.loss(self.network(data), target)
        return loss, {"seg": loss}, None

    def after_optimizer_step(self, aux, voxels: Optional[VoxelTarget]) -> None:
        """Gradient-free updates after each step (prototype EMA, teacher EMA)."""

    def enter_steady_state(self) -> None:
        """Put the trainer into the phase it spends most steps in, for profiling (``benchmark-heads``):
        extend with super() where a family has phases (prototypes initialised, a teacher)."""

    def micro_batch_count(self, data: torch.Tensor) -> int:
        """Forward/backward passes per optimiser step: a family whose step builds more images than the
        plans' batch size (copy-paste both ways) runs them in passes of that size, so GPU memory stays
        what nnU-Net planned for."""
        return 1

    def autocast(self):
        # nnU-Net autocasts on CUDA only (CPU autocast is slow, MPS unsupported)
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        data, target = self.training_inputs(batch)
        voxels = self.voxel_target(target)
        passes = self.micro_batch_count(data)
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts_of_passes, auxes = [], [], []
        for index, (data_part, target_part, voxels_part) in enumerate(split_batch(data, target, voxels, passes)):
            # DDP all-reduces the gradients once, at the last pass
            last = index == passes - 1
            sync = self.network.no_sync() if isinstance(self.network, DistributedDataParallel) and not last \
                else dummy_context()
            with sync:
                with self.autocast():
                    loss, parts, aux = self.forward_and_loss(data_part, target_part, voxels_part)
                    loss = loss / passes if passes > 1 else loss
                (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
            losses.append(loss.detach())
            parts_of_passes.append(parts)
            auxes.append(aux)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        with torch.no_grad():
            self.after_optimizer_step(concat_batches(auxes), voxels)
        result = {"loss": sum(losses).cpu().numpy()}
        for name in parts_of_passes[0]:
            values = [float(p[name].detach()) if torch.is_tensor(p[name]) else float(p[name]) for p in parts_of_passes]
            result[f"part_{name}"] = float(np.mean(values))
        return result

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        names = sorted(k for k in train_outputs[0] if k.startswith("part_")) if train_outputs else []
        if len(names) > 1:
            means = {n[5:]: round(float(np.mean([o[n] for o in train_outputs])), 4) for n in names}
            self.print_to_log_file(f"loss parts: {means}")

    # --- checkpoints ------------------------------------------------------------------------
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        """Trainer state beyond network/optimizer that ``--c`` must restore; extend with super()."""
        return {}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Restore what ``extra_checkpoint_state`` saved; extend with super()."""

    def check_checkpoint(self, checkpoint: dict, source: str) -> None:
        """Raise a SetupError if ``checkpoint`` cannot be resumed by this trainer."""

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        state = self.extra_checkpoint_state()
        if state and self.local_rank == 0 and not self.disable_checkpointing:
            # nnU-Net's save_checkpoint has no hook for extra entries: add ours to the file it wrote
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[EXTRA_STATE_KEY] = state
            torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("nnU-Net 2.8's load_checkpoint reads a checkpoint file: pass its path")
        checkpoint = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        self.check_checkpoint(checkpoint, filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)
        self.load_extra_checkpoint_state(checkpoint.get(EXTRA_STATE_KEY, {}))


class PhasedTrainerMixin:
    """A warm-up, then the method's main phase, by epoch (so ``--c`` resumes in the right one)."""

    phase_plan: PhasePlan

    @property
    def warmup_epochs(self) -> int:
        return self.phase_plan.warmup_epochs(self.num_epochs, self.num_iterations_per_epoch)

    @property
    def in_main_phase(self) -> bool:
        return self.current_epoch >= self.warmup_epochs

    def main_loss_weight(self) -> float:
        """The ramp of the main phase's loss weight at the current epoch."""
        return self.phase_plan.main_loss_weight(self.current_epoch, self.num_epochs, self.num_iterations_per_epoch)

    def enter_steady_state(self) -> None:
        super().enter_steady_state()
        self.current_epoch = self.warmup_epochs


class PrototypeTrainerBase(ExtensibleTrainerMixin, nnUNetTrainer):
    head_kind: str = ""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        attach_head_spec(self.plans_manager, configuration, self.configuration_manager,
                         head_spec(self.head_kind, self.label_layout, self.head_config()))

    def head_config(self):
        raise NotImplementedError

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        return build_from_plans(unet, configuration_manager)

    @property
    def full_resolution_loss(self) -> nn.Module:
        """nnU-Net's segmentation loss for one (full-resolution) output, without deep supervision weights."""
        return self.loss.loss if isinstance(self.loss, DeepSupervisionWrapper) else self.loss

    def voxel_target(self, target) -> VoxelTarget:
        return as_voxel_target(self.label_layout, target)

    def compute_loss(self, output, aux, target, voxels: VoxelTarget) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.objective(output, aux, target, voxels)

    def forward_and_loss(self, data, target, voxels):
        output, aux = self.network(data, return_aux=True)
        loss, parts = self.compute_loss(output, aux, target, voxels)
        return loss, parts, aux

    def check_checkpoint(self, checkpoint: dict, source: str) -> None:
        super().check_checkpoint(checkpoint, source)
        ours = self.configuration_manager.configuration[HEAD_SPEC_KEY]
        theirs = checkpoint_head_spec(checkpoint)
        if normalized_spec(theirs) != normalized_spec(ours):
            raise SetupError(
                f"the checkpoint {source} (trainer {checkpoint.get('trainer_name')}) was written with the head "
                f"spec {theirs}, but {self.__class__.__name__} builds {ours}; resuming would load mismatched weights",
                "resume with the trainer that wrote the checkpoint, or start a fresh training "
                f"(move {self.output_folder} away)",
            )
