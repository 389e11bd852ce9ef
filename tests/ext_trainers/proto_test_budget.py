"""Tiny-budget trainers for the end-to-end tests (found through nnUNet_extTrainer like any user's own)."""

import os
from dataclasses import replace

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_proto.trainers.nnUNetTrainerBCP import nnUNetTrainerBCP
from nnunetv2_proto.trainers.nnUNetTrainerMPER import (nnUNetTrainerMPER, nnUNetTrainerMPER_balancedSlots,
                                                      nnUNetTrainerMPER_fromVanilla)
from nnunetv2_proto.training.initial_weights import StartFromTrainedModelMixin
from nnunetv2_proto.training.schedules import MPER_PHASES, SEMI_SUPERVISED_FROM_TRAINED_PHASES
from nnunetv2_proto.training.semi_supervised import LabeledSubsetMixin
from nnunetv2_proto.trainers.nnUNetTrainerMPERSemi import nnUNetTrainerMPERSemi
from nnunetv2_proto.trainers.nnUNetTrainerSIPL import nnUNetTrainerSIPL


class TinyBudgetMixin:
    """Three epochs of three iterations; a checkpoint every epoch, so --c can be tested.

    With PROTO_TEST_STOP_AFTER_EPOCH=N the run stops right after epoch N's checkpoint, the
    way a killed job would leave its output folder.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1

    def on_epoch_end(self):
        super().on_epoch_end()
        stop = os.environ.get("PROTO_TEST_STOP_AFTER_EPOCH")
        if stop is not None and self.current_epoch == int(stop) + 1:
            raise SystemExit(75)


class nnUNetTrainer_testBudget(TinyBudgetMixin, nnUNetTrainer):
    pass


class nnUNetTrainerSIPL_testBudget(TinyBudgetMixin, nnUNetTrainerSIPL):
    pass


# MPER's warm-up floor (100 steps) would leave these 9 steps one prototype epoch; one warm-up epoch
# instead, so --c can be tested in the middle of the prototype phase
TEST_MPER_PHASES = replace(MPER_PHASES, min_warmup_iterations=0)


class nnUNetTrainerMPER_testBudget(TinyBudgetMixin, nnUNetTrainerMPER):
    phase_plan = TEST_MPER_PHASES


class nnUNetTrainerMPER_balancedSlots_testBudget(TinyBudgetMixin, nnUNetTrainerMPER_balancedSlots):
    phase_plan = TEST_MPER_PHASES


class nnUNetTrainerMPER_fromVanilla_testBudget(TinyBudgetMixin, nnUNetTrainerMPER_fromVanilla):
    source_trainer = "nnUNetTrainer_testBudget"


class nnUNetTrainer_2labeled_testBudget(TinyBudgetMixin, LabeledSubsetMixin, nnUNetTrainer):
    num_labeled = 2


class nnUNetTrainerBCP_fromLabeled_testBudget(StartFromTrainedModelMixin, TinyBudgetMixin, nnUNetTrainerBCP):
    num_labeled = 2
    source_trainer = "nnUNetTrainer_2labeled_testBudget"
    phase_plan = SEMI_SUPERVISED_FROM_TRAINED_PHASES


class nnUNetTrainerBCP_fromAllLabels_testBudget(nnUNetTrainerBCP_fromLabeled_testBudget):
    """Must be refused: its source saw the labels of the cases this run treats as unlabelled."""
    source_trainer = "nnUNetTrainer_testBudget"


class nnUNetTrainerBCP_testBudget(TinyBudgetMixin, nnUNetTrainerBCP):
    num_labeled = 2


class nnUNetTrainerMPERSemi_testBudget(TinyBudgetMixin, nnUNetTrainerMPERSemi):
    num_labeled = 2


class ResumeProbeMixin:
    """With PROTO_TEST_RESUME_DUMP=path, record what ``--c`` restored (network state, epoch, extra state)."""

    def load_checkpoint(self, filename_or_checkpoint):
        super().load_checkpoint(filename_or_checkpoint)
        dump = os.environ.get("PROTO_TEST_RESUME_DUMP")
        if dump:
            torch.save({"network": {k: v.clone() for k, v in self.core_network.state_dict().items()},
                        "epoch": self.current_epoch, "extra": self.extra_checkpoint_state(),
                        "main_loss_weight": self.main_loss_weight() if hasattr(self, "main_loss_weight") else None},
                       dump)


class nnUNetTrainerSIPL_resumeProbe(ResumeProbeMixin, TinyBudgetMixin, nnUNetTrainerSIPL):
    pass


class nnUNetTrainerMPER_resumeProbe(ResumeProbeMixin, TinyBudgetMixin, nnUNetTrainerMPER):
    phase_plan = replace(TEST_MPER_PHASES, rampup_fraction=1.0)  # the resumed epoch is in the middle of the ramp


class nnUNetTrainerMPERSemi_resumeProbe(ResumeProbeMixin, TinyBudgetMixin, nnUNetTrainerMPERSemi):
    num_labeled = 2
