"""The short training budgets shared by every trainer family, for CPU-scale comparisons.

``<Trainer>_cpuBudget`` variants combine this mixin with a trainer family, so vanilla,
SIPL, MPER and the semi-supervised trainers see exactly the same number of optimiser steps
(``CPU_BUDGET_EPOCHS * CPU_BUDGET_ITERATIONS_PER_EPOCH``), like nnU-Net's ``_5epochs``
variants. ``<Trainer>_cpuBudgetLong`` variants give five times as many steps for datasets
where 200 steps do not get vanilla nnU-Net off the all-background solution (2D ACDC at batch
7 is one: its pseudo-Dice is still about 0.02 after 200 steps), and ``_cpuBudgetXL`` variants
three times that again (2D ACDC at 1000 steps still misses the right ventricle in some seeds).
``_cpuBudgetDouble`` / ``_cpuBudgetLongDouble`` variants train twice ``_cpuBudget`` /
``_cpuBudgetLong``: they are the baselines of the two-stage (``_from...``) trainers, whose source run
and own run each take one budget, so the fair baseline of ``<X>_from<Source>_cpuBudget`` is
``<Source>_cpuBudgetDouble``. ``_cpuBudgetXLPlusLong`` (4000 steps) is the same for the two-stage runs
that start from an XL source and train one long budget themselves (``..._fromLabeledXL_cpuBudgetLong``).
The mixin also times the training phase of each epoch (iterations only, not validation) and
writes ``training_timing.json`` next to the checkpoints, which is where the demo's and
benchmarks' seconds-per-iteration figures come from.

The budgets predict without test-time mirroring (nnU-Net's final validation and
``nnUNetv2_predict`` of these models): in 3D that is 8x fewer forward passes per tile, which
makes several seeds per comparison affordable on a CPU. Training augmentation (mirroring
included) is nnU-Net's own. Every trainer family gets the same setting, so comparisons stay fair.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from os.path import join
from typing import List

import numpy as np
import torch

from nnunetv2_proto.training.schedules import CPU_BUDGET_SEMI_SUPERVISED_WARMUP

CPU_BUDGET_EPOCHS = 20
CPU_BUDGET_ITERATIONS_PER_EPOCH = 10
CPU_BUDGET_VALIDATION_ITERATIONS = 4
LONG_CPU_BUDGET_EPOCHS = 50
LONG_CPU_BUDGET_ITERATIONS_PER_EPOCH = 20
XL_CPU_BUDGET_EPOCHS = 150
TIMING_FILE = "training_timing.json"
CHECKPOINT_EVERY_EPOCHS = 5  # nnU-Net's 50 would leave a cut short-budget run nothing to resume with --c


class CpuBudgetMixin:
    """Put before the trainer class in the bases: ``class X_cpuBudget(CpuBudgetMixin, X)``."""

    budget_epochs: int = CPU_BUDGET_EPOCHS
    budget_iterations_per_epoch: int = CPU_BUDGET_ITERATIONS_PER_EPOCH

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget_epochs
        self.num_iterations_per_epoch = self.budget_iterations_per_epoch
        self.num_val_iterations_per_epoch = CPU_BUDGET_VALIDATION_ITERATIONS
        self.save_every = CHECKPOINT_EVERY_EPOCHS
        self._train_phase_started = 0.0
        self._train_phase_seconds: List[float] = []

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # see the module docstring: no test-time mirroring
        return configured

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._train_phase_started = time.perf_counter()

    def on_train_epoch_end(self, train_outputs):
        self._train_phase_seconds.append(time.perf_counter() - self._train_phase_started)
        super().on_train_epoch_end(train_outputs)
        if self.local_rank == 0:
            seconds = self._train_phase_seconds
            # the first epoch also pays for data loader start-up; leave it out of the median when we can
            steady = seconds[1:] if len(seconds) > 1 else seconds
            record = {
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "train_phase_seconds_per_epoch": seconds,
                "median_seconds_per_iteration": float(np.median(steady)) / self.num_iterations_per_epoch,
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
            }
            with open(join(self.output_folder, TIMING_FILE), "w") as f:
                json.dump(record, f, indent=2)


class CpuBudgetLongMixin(CpuBudgetMixin):
    """The long budget: ``class X_cpuBudgetLong(CpuBudgetLongMixin, X)``."""

    budget_epochs = LONG_CPU_BUDGET_EPOCHS
    budget_iterations_per_epoch = LONG_CPU_BUDGET_ITERATIONS_PER_EPOCH


class CpuBudgetXLMixin(CpuBudgetMixin):
    """Three times the long budget (3000 steps): ``class X_cpuBudgetXL(CpuBudgetXLMixin, X)``. For 2D ACDC,
    where vanilla nnU-Net at 1000 steps still leaves a structure unlearnt in some seeds."""

    budget_epochs = XL_CPU_BUDGET_EPOCHS
    budget_iterations_per_epoch = LONG_CPU_BUDGET_ITERATIONS_PER_EPOCH


class CpuBudgetDoubleMixin(CpuBudgetMixin):
    """Source + own steps of a two-stage run at ``_cpuBudget`` (400): ``class X_cpuBudgetDouble(CpuBudgetDoubleMixin, X)``."""

    budget_epochs = 2 * CPU_BUDGET_EPOCHS


class CpuBudgetLongDoubleMixin(CpuBudgetLongMixin):
    """Source + own steps of a two-stage run at ``_cpuBudgetLong`` (2000)."""

    budget_epochs = 2 * LONG_CPU_BUDGET_EPOCHS


class CpuBudgetXLPlusLongMixin(CpuBudgetMixin):
    """Source + own steps of a two-stage run from an ``_cpuBudgetXL`` source whose own stage is
    ``_cpuBudgetLong`` (``..._fromLabeledXL_cpuBudgetLong``; 4000 steps). 2D ACDC's labelled-only source
    needs XL to learn every structure, while a semi-supervised stage of XL length would cost about
    3.5 h per run on 2 CPU cores."""

    budget_epochs = XL_CPU_BUDGET_EPOCHS + LONG_CPU_BUDGET_EPOCHS
    budget_iterations_per_epoch = LONG_CPU_BUDGET_ITERATIONS_PER_EPOCH


class SemiSupervisedCpuBudgetMixin(CpuBudgetMixin):
    """The CPU budget for the semi-supervised families, with the longer warm-up that budget needs
    (``schedules.CPU_BUDGET_SEMI_SUPERVISED_WARMUP``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.phase_plan = replace(self.phase_plan, warmup_fraction=CPU_BUDGET_SEMI_SUPERVISED_WARMUP)
