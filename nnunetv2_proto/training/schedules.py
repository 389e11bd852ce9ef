"""Every schedule of the trainer families, and their phase plans, in one place.

Schedules are functions of the epoch (nnU-Net's unit of ``--c``), so a resumed run lands in
the same phase and at the same point of every ramp. Fractions are of the trainer's
``num_epochs``, so a short budget shrinks them with it.

- ``PhasePlan``: a warm-up (the plain segmentation loss; MPER samples embeddings in its last
  epoch) followed by the method's main phase (MPER's prototype losses, self-training with a
  mean teacher), with a sigmoid ramp of the main phase's loss weight. One plan per trainer:
  semi-supervised MPER uses one plan for both, so prototypes and teacher start together.
- ``TauSchedule``: SIPL's SMG filter threshold, rising linearly from ``start`` to ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the semi-supervised trainers at the CPU budgets: 10% of 200 steps would hand self-training to a
# teacher trained for 20 steps
CPU_BUDGET_SEMI_SUPERVISED_WARMUP = 0.3


def sigmoid_rampup(progress: float, rampup_fraction: float = 0.4) -> float:
    """exp(-5 (1 - t)^2) with t = progress / rampup_fraction clipped to [0, 1]; progress in [0, 1]."""
    if rampup_fraction <= 0:
        return 1.0
    t = min(max(progress / rampup_fraction, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_ramp(epoch: int, ramp_epochs: float, start: float, end: float) -> float:
    """``start`` rising linearly to ``end`` at ``ramp_epochs``, then constant."""
    return min(epoch / ramp_epochs, 1.0) * (end - start) + start


@dataclass(frozen=True)
class PhasePlan:
    warmup_fraction: float
    rampup_fraction: float = 0.0  # of all epochs, counted from epoch 0 (0: full weight at once)

    def warmup_epochs(self, num_epochs: int) -> int:
        return max(1, round(self.warmup_fraction * num_epochs))

    def in_main_phase(self, epoch: int, num_epochs: int) -> bool:
        return epoch >= self.warmup_epochs(num_epochs)

    def is_last_warmup_epoch(self, epoch: int, num_epochs: int) -> bool:
        return epoch == self.warmup_epochs(num_epochs) - 1

    def main_loss_weight(self, epoch: int, num_epochs: int) -> float:
        return sigmoid_rampup(epoch / num_epochs, self.rampup_fraction)


@dataclass(frozen=True)
class TauSchedule:
    start: float = 0.1
    end: float = 0.5
    ramp_fraction: float = 50 / 1000  # epoch 50 of nnU-Net's 1000, as in the paper
    # a floor on the ramp's length in optimiser steps, so a short budget does not filter hard while
    # the pseudo masks are still near random (0: the paper's fraction alone)
    min_ramp_iterations: int = 0

    def tau(self, epoch: int, num_epochs: int, iterations_per_epoch: int = 1) -> float:
        ramp_epochs = max(self.ramp_fraction * num_epochs, self.min_ramp_iterations / iterations_per_epoch, 1e-8)
        return linear_ramp(epoch, ramp_epochs, self.start, self.end)


# the families' defaults, written once
MPER_PHASES = PhasePlan(warmup_fraction=0.05, rampup_fraction=0.4)
SEMI_SUPERVISED_PHASES = PhasePlan(warmup_fraction=0.1)
# MPER inside the semi-supervised pipeline: prototypes start with self-training, ramped as in MPER
MPER_SEMI_SUPERVISED_PHASES = PhasePlan(warmup_fraction=SEMI_SUPERVISED_PHASES.warmup_fraction,
                                        rampup_fraction=MPER_PHASES.rampup_fraction)
SIPL_TAU = TauSchedule()
# what the official code runs in effect: its epoch is fixed when the model is built, so tau stays 0.1
SIPL_TAU_OFFICIAL = TauSchedule(start=0.1, end=0.1)
SIPL_TAU_STEP_FLOOR = TauSchedule(min_ramp_iterations=1000)
