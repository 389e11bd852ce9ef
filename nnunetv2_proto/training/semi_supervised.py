"""Labelled subsets and BCP-style semi-supervised training for any nnU-Net trainer family.

``LabeledSubsetMixin``: a fold's training cases split into labelled (seeded choice of
``num_labeled`` cases, or an explicit list file) and unlabelled; written to
``fold_X/labeled_split.json`` and kept in the checkpoint (``--c`` refuses a different split).
Alone it trains on the labelled cases only: the supervised lower bound.

``SemiSupervisedMixin`` adds the unlabelled cases: a second stream through nnU-Net's own
augmentation that reads images only (never labels, no foreground oversampling), a mean
teacher, and bidirectional copy-paste (BCP). Phases by epoch (``phase_plan``):
1. warm-up: copy-paste among labelled patches;
2. self-training: the teacher (initialised from the warmed-up student, then EMA) labels the
   unlabelled patches; every labelled patch is pasted with an unlabelled one both ways, so a
   step holds all the labelled voxels of a labelled-only nnU-Net step (labelled-signal parity)
   in twice the images, run as two forward/backward passes of the plans' batch size (about 2x
   the step time of the baseline, the same GPU memory); voxels from unlabelled patches weigh
   ``unlabeled_weight`` in the loss.
``_fromLabeled`` variants skip the warm-up: student and teacher start from the finished
labelled-only run of the same labelled cases (``training.initial_weights``), BCP's own recipe.
Prediction and nnU-Net's validation use the student, the network nnU-Net checkpoints; the
teacher lives in the checkpoint's extra state.
"""

from __future__ import annotations

import json
from os.path import join
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_proto.diagnostics import foreground_confusion, summarise_epoch
from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.losses import VoxelTarget, VoxelWeightedDiceCE
from nnunetv2_proto.semi.copy_paste import both_ways, copy_paste, cuboid_masks, swapped_pairs
from nnunetv2_proto.semi.image_only_dataset import ImageOnlyDataset
from nnunetv2_proto.semi.labeled_subset import (labeled_subset_from_file, seeded_labeled_subset,
                                                split_labeled)
from nnunetv2_proto.semi.mean_teacher import ema_update_, largest_component, make_teacher
from nnunetv2_proto.training.schedules import SEMI_SUPERVISED_PHASES, PhasePlan
from nnunetv2_proto.training.trainer_base import ExtensibleTrainerMixin, PhasedTrainerMixin

# this run's labelled / unlabelled cases (the user's input list is semi.labeled_subset.LABELED_LIST_FILE)
SPLIT_RECORD = "labeled_split.json"
DIAGNOSTIC_PREFIX = "semi_diagnostic_"


class LabeledSubsetMixin(ExtensibleTrainerMixin):
    num_labeled: Optional[int] = None
    labeled_list_file: Optional[str] = None  # relative to nnUNet_preprocessed/<dataset>/
    labeled_seed = 12345

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if (self.num_labeled is None) == (self.labeled_list_file is None):
            raise SetupError(f"{self.__class__.__name__} must set exactly one of num_labeled / labeled_list_file",
                             "use a _<N>labeled or _labeledList variant")
        self._labeled_split: Optional[Tuple[List[str], List[str]]] = None

    def labeled_split(self) -> Tuple[List[str], List[str]]:
        """(labelled, unlabelled) training cases of this fold; computed once and recorded."""
        if self._labeled_split is None:
            training_cases, _ = self.do_split()
            if self.labeled_list_file is not None:
                source = join(self.preprocessed_dataset_folder_base, self.labeled_list_file)
                labeled = labeled_subset_from_file(source, self.fold, training_cases)
            else:
                seed = self.labeled_seed + (int(self.fold) if str(self.fold).isdigit() else 0)
                source = f"seeded choice (seed {seed})"
                labeled = seeded_labeled_subset(training_cases, self.num_labeled, seed)
            self._labeled_split = split_labeled(training_cases, labeled)
            if self.local_rank == 0:
                with open(join(self.output_folder, SPLIT_RECORD), "w") as f:
                    json.dump({"source": source, "labeled": self._labeled_split[0],
                               "unlabeled": self._labeled_split[1]}, f, indent=2)
            self.print_to_log_file(f"{len(self._labeled_split[0])} labelled and {len(self._labeled_split[1])} "
                                   f"unlabelled training cases ({source})")
        return self._labeled_split

    def get_tr_and_val_datasets(self):
        _, dataset_val = super().get_tr_and_val_datasets()
        labeled, _ = self.labeled_split()
        dataset_tr = self.dataset_class(self.preprocessed_dataset_folder, labeled,
                                        folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return dataset_tr, dataset_val

    def extra_checkpoint_state(self) -> Dict[str, Any]:
        return {**super().extra_checkpoint_state(), "labeled_cases": self.labeled_split()[0]}

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if "labeled_cases" in state and state["labeled_cases"] != self.labeled_split()[0]:
            raise SetupError(
                "the checkpoint was trained with a different labelled subset than this trainer selects now "
                f"({len(state['labeled_cases'])} recorded vs {len(self.labeled_split()[0])} now)",
                "resume with the same variant, seed and labelled-case list, or start a fresh training")


class PairedLoader:
    """Draws one labelled and one unlabelled batch per training step."""

    def __init__(self, labeled, unlabeled):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __next__(self) -> dict:
        return {"labeled": next(self.labeled), "unlabeled": next(self.unlabeled)}

    def augmenters(self) -> tuple:
        return self.labeled, self.unlabeled

    def _finish(self) -> None:
        for loader in (self.labeled, self.unlabeled):
            if hasattr(loader, "_finish"):
                loader._finish()


class SemiSupervisedMixin(PhasedTrainerMixin, LabeledSubsetMixin):
    phase_plan: PhasePlan = SEMI_SUPERVISED_PHASES
    teacher_decay = 0.99
    unlabeled_weight = 0.5
    copy_paste_fraction = 2 / 3
    confidence_threshold = 0.9
    # keep only the largest connected component of pseudo labels; None: for single-structure datasets
    largest_component: Optional[bool] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise SetupError("semi-supervised training needs a softmax label layout; this dataset trains regions",
                             "use a label (non-region) dataset.json, or a supervised prototype trainer")
        if self.is_cascaded:
            raise SetupError("semi-supervised trainers do not support the cascade's second stage",
                             "train 3d_fullres, 3d_lowres, 2d or a CPU preset instead")
        self.teacher: Optional[torch.nn.Module] = None
        self._confident_fractions: List[float] = []  # this epoch's, for the log
        if self.largest_component is None:
            self.largest_component = len(self.label_manager.foreground_labels) == 1

    def initialize(self):
        super().initialize()
        if self.batch_size < 2:
            raise SetupError(
                f"copy-paste pairs patches, but each process gets a batch of {self.batch_size} "
                f"(plans: {self.configuration_manager.batch_size}, divided among DDP processes)",
                "use a configuration with batch size >= 2 per GPU (edit batch_size in the plans, or use fewer GPUs)")

    @property
    def in_self_training(self) -> bool:
        return self.in_main_phase

    def enter_steady_state(self) -> None:
        super().enter_steady_state()
        self.teacher = make_teacher(self.core_network)

    # --- data --------------------------------------------------------------------------------
    def get_dataloaders(self):
        labeled, validation = super().get_dataloaders()
        return PairedLoader(labeled, self._unlabeled_loader()), validation

    def _unlabeled_loader(self):
        _, unlabeled = self.labeled_split()
        if not unlabeled:
            raise SetupError("no unlabelled training cases are left in this fold",
                             "use a variant with fewer labelled cases")
        file_format = "b2nd" if self.dataset_class is nnUNetDatasetBlosc2 else "npz"
        dataset = ImageOnlyDataset(self.preprocessed_dataset_folder, unlabeled, file_format)
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = nnUNetDataLoader(dataset, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                                  transforms=transforms, probabilistic_oversampling=False)
        loader.has_ignore = False  # random crops: no label-derived sampling locations exist for these cases
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=processes,
                                            num_cached=max(6, processes // 2), seeds=None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_train, PairedLoader):
            self.dataloader_train._finish()

    # --- phases and the teacher ------------------------------------------------------------
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._confident_fractions = []
        if self.in_self_training and self.teacher is None:
            self.teacher = make_teacher(self.core_network)
            self.print_to_log_file("self-training starts: mean teacher initialised from the warmed-up student")

    # --- diagnostics (validation batches only for Dice) -------------------------------------
    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self._confident_fractions:
            self.print_to_log_file(f"self-training: {100 * float(np.mean(self._confident_fractions)):.1f}% of "
                                   f"unlabelled voxels above teacher confidence {self.confidence_threshold}")

    def validation_step(self, batch: dict) -> dict:
        result = super().validation_step(batch)
        if self.teacher is None:
            return result
        data, target = self.to_device(batch)
        voxels = VoxelTarget.from_nnunet_target(self.label_layout, target)
        self.teacher.decoder.deep_supervision = False
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(data)
        result[f"{DIAGNOSTIC_PREFIX}teacher_confusion"] = foreground_confusion(teacher_logits, voxels.labels,
                                                                               voxels.valid)
        # the student's: nnU-Net's own counts of this batch (its pseudo Dice)
        result[f"{DIAGNOSTIC_PREFIX}student_confusion"] = np.stack(
            [result["tp_hard"], result["fp_hard"], result["fn_hard"]])
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        records = [{k: o.pop(k) for k in list(o) if k.startswith(DIAGNOSTIC_PREFIX)} for o in val_outputs]
        super().on_validation_epoch_end(val_outputs)
        summary = summarise_epoch([r for r in records if r])
        if summary:
            teacher, student = (summary[f"{DIAGNOSTIC_PREFIX}{who}_dice"] for who in ("teacher", "student"))
            self.print_to_log_file("self-training Dice on validation patches: teacher (pseudo labels) ["
                                   + ", ".join(f"{d:.3f}" for d in teacher) + "], student ["
                                   + ", ".join(f"{d:.3f}" for d in student) + "]")

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.teacher.decoder.deep_supervision = False
        with self.autocast():
            logits = self.teacher(images)
        probabilities = torch.softmax(logits.float(), 1)
        confidence, labels = probabilities.max(1)
        if self.largest_component:
            kept = largest_component(labels)
            # foreground the filter removed is not confident background: it must not move prototypes
            confidence = confidence.masked_fill(kept != labels, 0.0)
            labels = kept
        return labels, confidence

    def after_optimizer_step(self, aux, voxels) -> None:
        super().after_optimizer_step(aux, voxels)
        if self.teacher is not None:
            ema_update_(self.teacher, self.core_network, self.teacher_decay)

    # --- copy-paste batches ----------------------------------------------------------------
    def labelled_batch(self, batch: dict) -> dict:
        return batch["labeled"]

    def training_inputs(self, batch: dict):
        data, target = self.to_device(self.labelled_batch(batch))
        exclusive = VoxelTarget.from_nnunet_target(self.label_layout, target)
        labels, valid = exclusive.labels, exclusive.valid
        valid = valid.float()
        if not self.in_self_training:
            # copy-paste among labelled patches: partners swap cuboids, every labelled voxel is used once
            pairs = 2 * (data.shape[0] // 2)
            data, labels, valid = data[:pairs], labels[:pairs], valid[:pairs]
            masks = cuboid_masks(pairs, data.shape[2:], self.copy_paste_fraction, device=data.device)
            images = copy_paste(data, swapped_pairs(data), masks)
            mixed_labels = copy_paste(labels, swapped_pairs(labels), masks)
            weights = copy_paste(valid, swapped_pairs(valid), masks)
            return images, VoxelTarget(mixed_labels, weights, weights > 0)
        count = data.shape[0]
        unlabeled = batch["unlabeled"]["data"][:count].to(self.device, non_blocking=True)
        pseudo, confidence = self.pseudo_labels(unlabeled)
        masks = cuboid_masks(count, data.shape[2:], self.copy_paste_fraction, device=data.device)
        masks = torch.cat((masks, masks))
        images = copy_paste(*both_ways(data, unlabeled), masks)
        mixed_labels = copy_paste(*both_ways(labels, pseudo), masks)
        weights = copy_paste(*both_ways(valid, torch.full_like(valid, self.unlabeled_weight)), masks)
        confident = confidence > self.confidence_threshold
        trusted = copy_paste(*both_ways(valid > 0, confident), masks)
        from_unlabeled = copy_paste(*both_ways(torch.zeros_like(confident), torch.ones_like(confident)), masks)
        self._confident_fractions.append(float(confident.float().mean()))
        return images, VoxelTarget(mixed_labels, weights, trusted, from_unlabeled)

    def micro_batch_count(self, data: torch.Tensor) -> int:
        # self-training pastes every pair both ways: twice the plans' batch, run as two passes
        return 2 if self.in_self_training else 1

    def voxel_target(self, target: VoxelTarget) -> VoxelTarget:
        return target  # copy-paste batches come with their voxel target

    def mixed_batch_loss(self) -> VoxelWeightedDiceCE:
        """nnU-Net's loss as the plans build it (``self.loss``), with the copy-paste voxel weights."""
        return VoxelWeightedDiceCE(self.loss)

    # --- checkpoints ---------------------------------------------------------------------------
    def extra_checkpoint_state(self) -> Dict[str, Any]:
        state = super().extra_checkpoint_state()
        if self.teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return state

    def load_extra_checkpoint_state(self, state: Dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if "teacher" in state:
            self.teacher = make_teacher(self.core_network)
            self.teacher.load_state_dict(state["teacher"])
