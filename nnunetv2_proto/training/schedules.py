"""Every schedule of the trainer families, and their phase plans, in one place.

Schedules are functions of the epoch (nnU-Net's unit of ``--c``), so a resumed run lands in
the same phase and at the same point of every ramp. Fractions are of the trainer's
``num_epochs``, so a short budget shrinks them with it.

- ``PhasePlan``: a warm-up (the plain segmentation loss) followed by the method's main phase
  (MPER's prototype losses, self-training with a mean teacher), with a sigmoid ramp of the main
  phase's loss weight over the first part of the main phase. One plan per trainer:
  semi-supervised MPER uses one plan for both, so prototypes and teacher start together.
- ``TauSchedule``: SIPL's SMG filter threshold, rising linearly from ``start`` to ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    # of the main phase, counted from its first epoch (0: full weight at once): the ramp starts where
    # the method starts, whatever the warm-up's length
    rampup_fraction: float = 0.0
    # a floor on the warm-up in optimiser steps, so that a short budget does not start the method on
    # the features of a near-random network (0: the fraction alone)
    min_warmup_iterations: int = 0

    def warmup_epochs(self, num_epochs: int, iterations_per_epoch: int = 1) -> int:
        """0 only for a plan without warm-up (a trainer that starts from a trained network); otherwise at
        least one epoch, and at most ``num_epochs - 1`` so the main phase always runs."""
        if self.warmup_fraction <= 0 and self.min_warmup_iterations <= 0:
            return 0
        floor = math.ceil(self.min_warmup_iterations / iterations_per_epoch)
        return max(1, min(max(round(self.warmup_fraction * num_epochs), floor), num_epochs - 1))

    def main_loss_weight(self, epoch: int, num_epochs: int, iterations_per_epoch: int = 1) -> float:
        warmup = self.warmup_epochs(num_epochs, iterations_per_epoch)
        progress = (epoch - warmup) / max(num_epochs - warmup, 1)
        return sigmoid_rampup(progress, self.rampup_fraction)


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


# the families' defaults, written once.
# MPER: prototypes start from the features of a network that already segments. The warm-up length
# is read off vanilla nnU-Net's pseudo-Dice curves (docs/design.md): LA at 200 steps reaches about
# 90% of its final pseudo-Dice after 60-80 steps, ACDC at 1000 steps sees all three structures
# only after 300-600; 30% of the budget with a floor of 100 steps covers both.
MPER_PHASES = PhasePlan(warmup_fraction=0.3, rampup_fraction=0.4, min_warmup_iterations=100)
# the official code's recipe: its ramp runs over 75% of the prototype stage
MPER_OFFICIAL_PHASES = replace(MPER_PHASES, rampup_fraction=0.75)
# starting from a finished nnU-Net model: the features already mean something, no warm-up
MPER_FROM_TRAINED_PHASES = replace(MPER_PHASES, warmup_fraction=0.0, min_warmup_iterations=0)
SEMI_SUPERVISED_PHASES = PhasePlan(warmup_fraction=0.1)
# MPER inside the semi-supervised pipeline: prototypes start with self-training, ramped as in MPER
MPER_SEMI_SUPERVISED_PHASES = PhasePlan(warmup_fraction=SEMI_SUPERVISED_PHASES.warmup_fraction,
                                        rampup_fraction=MPER_PHASES.rampup_fraction)
# self-training from a finished labelled-only model (BCP's own two-stage recipe): no warm-up
SEMI_SUPERVISED_FROM_TRAINED_PHASES = PhasePlan(warmup_fraction=0.0)
MPER_SEMI_SUPERVISED_FROM_TRAINED_PHASES = replace(MPER_SEMI_SUPERVISED_PHASES, warmup_fraction=0.0)
SIPL_TAU = TauSchedule()
# what the official code runs in effect: its epoch is fixed when the model is built, so tau stays 0.1
SIPL_TAU_OFFICIAL = TauSchedule(start=0.1, end=0.1)
SIPL_TAU_STEP_FLOOR = TauSchedule(min_ramp_iterations=1000)
