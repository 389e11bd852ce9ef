"""Two-stage training: start a method from a finished nnU-Net model of the same plans and fold.

The recipe of both official codes (MPER initialises its prototypes from a fully pre-trained
model; BCP pre-trains on the labelled cases to convergence and initialises student and teacher
from that model) and what a user who already has a vanilla model wants: add the method to it.

``StartFromTrainedModelMixin`` loads ``checkpoint_final.pth`` of ``source_trainer`` (same dataset,
plans, configuration and fold; for a ``_seed<N>`` run, the source's ``_seed<N>`` run) into the
network before the first epoch of a fresh training. Every weight of the source is used, the final
1x1 conv included (nnU-Net's ``-pretrained_weights`` skips it, and it refuses networks with
extra entries such as MPER's prototype buffers); the head's own entries keep their
initialisation. A resumed run (``--c``) continues from its own checkpoint and never reloads the
source. The optimiser and learning-rate schedule start afresh, as in the official codes.

Fair comparison: the two stages together take source steps + own steps, so the baseline to
compare against is trained for that total (docs/design.md, "Two-stage training").
"""

from __future__ import annotations

import json
import os
from os.path import isfile, join
from typing import Optional

import torch

from nnunetv2.utilities.file_path_utilities import get_output_folder

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.training.semi_supervised import SPLIT_RECORD

SOURCE_RECORD = "source_model.json"


class StartFromTrainedModelMixin:
    """Put before the trainer family in the bases and set ``source_trainer``."""

    source_trainer: str = "nnUNetTrainer"
    # entries of this trainer's network the source cannot have (the head's own state)
    head_only_prefixes = ("classifier.",)

    def source_trainer_name(self) -> str:
        seed = getattr(self, "run_seed", None)
        return f"{self.source_trainer}_seed{seed}" if seed else self.source_trainer

    def source_checkpoint_path(self) -> str:
        folder = get_output_folder(self.plans_manager.dataset_name, self.source_trainer_name(),
                                   self.plans_manager.plans_name, self.configuration_name, self.fold)
        return join(folder, "checkpoint_final.pth")

    def _train_source_command(self) -> str:
        return (f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} "
                f"-tr {self.source_trainer_name()} -p {self.plans_manager.plans_name}")

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:
            self.load_source_model()

    def load_source_model(self) -> None:
        path = self.source_checkpoint_path()
        if not isfile(path):
            raise SetupError(f"{type(self).__name__} starts from a finished {self.source_trainer_name()} model, "
                             f"but {path} does not exist",
                             f"train it first: {self._train_source_command()}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self._check_source_matches(checkpoint, path)
        network = self.core_network
        ours = network.state_dict()
        theirs = checkpoint["network_weights"]
        own_only = [k for k in ours if k not in theirs]
        unexpected = [k for k in theirs if k not in ours]
        mismatched = [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
        if unexpected or mismatched or any(not k.startswith(self.head_only_prefixes) for k in own_only):
            raise SetupError(
                f"the network in {path} does not fit {type(self).__name__}'s network (missing here: "
                f"{unexpected[:3]}, shape differs: {mismatched[:3]}, missing there: {own_only[:3]})",
                "the source must be trained with the same plans and configuration; retrain it with "
                f"{self._train_source_command()}")
        network.load_state_dict(theirs, strict=False)
        self.print_to_log_file(f"network initialised from {path} ({len(theirs)} entries; "
                               f"{len(own_only)} head entries keep their initialisation)")
        if self.local_rank == 0:
            with open(join(self.output_folder, SOURCE_RECORD), "w") as f:
                json.dump({"source_trainer": self.source_trainer_name(), "checkpoint": path,
                           "source_epochs": checkpoint.get("current_epoch")}, f, indent=2)

    def _check_source_matches(self, checkpoint: dict, path: str) -> None:
        init = checkpoint.get("init_args", {})
        found = (init.get("configuration"), str(init.get("fold")))
        wanted = (self.configuration_name, str(self.fold))
        if found != wanted:
            raise SetupError(f"{path} was trained as configuration/fold {found}, this run is {wanted}",
                             f"train the source for this fold: {self._train_source_command()}")
        labelled = self._labelled_cases()
        if labelled is None:
            return
        # a semi-supervised run must not start from a model that saw the labels of its unlabelled cases
        source_split = join(os.path.dirname(path), SPLIT_RECORD)
        if not isfile(source_split):
            raise SetupError(f"{path} was trained on every labelled case, but this run keeps all but "
                             f"{len(labelled)} unlabelled: starting from it would leak their labels",
                             "start from the labelled-only run with the same labelled cases "
                             "(nnUNetTrainer_<N>labeled)")
        with open(source_split) as f:
            if json.load(f)["labeled"] != labelled:
                raise SetupError(f"{path} was trained on a different labelled subset than this run uses",
                                 "start from the labelled-only run with the same labelled cases and fold")

    def _labelled_cases(self) -> Optional[list]:
        split = getattr(self, "labeled_split", None)
        return split()[0] if callable(split) else None
