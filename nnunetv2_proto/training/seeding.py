"""Seeded training runs, with the seed in the run's identity.

``<Trainer>_seed<N>`` is ``<Trainer>`` trained with seed N: Python's, NumPy's and torch's
global generators are seeded before nnU-Net builds anything, and nnU-Net's data-augmentation
workers (which otherwise reseed themselves from the OS) get seeds derived from N. Because the
seed is part of the trainer name, several seeds of one trainer live side by side in nnU-Net's
results layout (``<Trainer>_seed<N>__<plans>__<configuration>/fold_X``), and
``nnUNetv2_predict -tr <Trainer>_seed<N>`` and ``nnunetv2-proto compare --seeds`` find them
by name. The classes are made on demand (``trainers/nnUNetTrainer_seeded.py``) for any
trainer nnU-Net can find, its own included.

Bit-for-bit repeatable on the CPU when data augmentation runs in at most one worker
(``nnUNet_n_proc_DA`` 0 or 1): with several workers each worker's stream is fixed by the
seed, but the order in which their batches arrive is not (nnU-Net's non-deterministic
augmenter). Seeds make runs distinct and documented; they do not make a CUDA run bitwise
repeatable (cuDNN autotuning stays on, as in nnU-Net).
"""

from __future__ import annotations

import json
import random
import re
from os.path import join
from typing import List, Optional, Tuple

import numpy as np
import torch

from nnunetv2_proto.environment import find_trainer_class

SEED_RECORD = "run_seed.json"
_SEEDED_NAME = re.compile(r"(?P<base>.+)_seed(?P<seed>\d+)")


def split_seeded_name(trainer_name: str) -> Optional[Tuple[str, int]]:
    """``nnUNetTrainerSIPL_seed3`` -> (``nnUNetTrainerSIPL``, 3); None for a name without a seed suffix."""
    match = _SEEDED_NAME.fullmatch(trainer_name)
    return (match.group("base"), int(match.group("seed"))) if match else None


def seeded_name(trainer_name: str, seed: int) -> str:
    return f"{trainer_name}_seed{seed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices, CUDA included


def worker_seeds(seed: int, stream: int, count: int) -> List[int]:
    """Independent 32-bit seeds for ``count`` workers of one data stream of a run."""
    return [int(np.random.SeedSequence([seed, stream, worker]).generate_state(1)[0]) for worker in range(count)]


def reseed_augmenter(augmenter, seeds: List[int]) -> None:
    """Restart a batchgenerators multi-process augmenter with the given worker seeds (no-op without workers).

    nnU-Net builds its augmenters with ``seeds=None`` (each worker seeds itself from the OS) and
    starts them at once, so the only way in without copying ``get_dataloaders`` is a restart.
    """
    if not hasattr(augmenter, "seeds") or not hasattr(augmenter, "num_processes"):
        return  # SingleThreadedAugmenter: runs in this process, on the generators seeded above
    augmenter._finish()
    augmenter.seeds = seeds[:augmenter.num_processes]
    next(augmenter)  # start the workers again, as nnU-Net's get_dataloaders does


def augmenters_of(loader) -> List:
    """The augmenters behind a training or validation loader (a paired semi-supervised loader has two)."""
    return list(loader.augmenters()) if hasattr(loader, "augmenters") else [loader]


class SeededRunMixin:
    """Put first in the bases: ``type(name, (SeededRunMixin, Trainer), {"run_seed": N})``."""

    run_seed: int = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed_everything(self.run_seed)
        super().__init__(plans, configuration, fold, dataset_json, device)

    def get_dataloaders(self):
        train, validation = super().get_dataloaders()
        augmenters = augmenters_of(train) + augmenters_of(validation)
        for stream, augmenter in enumerate(augmenters):
            reseed_augmenter(augmenter, worker_seeds(self.run_seed, stream, getattr(augmenter, "num_processes", 0)))
        return train, validation

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            base = next(c.__name__ for c in type(self).__mro__[1:] if c is not SeededRunMixin)
            record = {"seed": self.run_seed, "trainer": type(self).__name__, "base_trainer": base}
            with open(join(self.output_folder, SEED_RECORD), "w") as f:
                json.dump(record, f, indent=2)
            self.print_to_log_file(f"run seed {self.run_seed} (Python, NumPy, torch and data-augmentation workers)")


def seeded_trainer_class(trainer_name: str, module: str) -> type:
    """The class ``<Base>_seed<N>`` for a name of that form; AttributeError otherwise (module ``__getattr__``)."""
    parsed = split_seeded_name(trainer_name)
    if parsed is None:
        raise AttributeError(trainer_name)
    base_name, seed = parsed
    try:
        base = find_trainer_class(base_name)
    except RuntimeError as error:  # nnU-Net's "could not find requested nnunet trainer"
        raise AttributeError(f"{trainer_name}: no trainer {base_name} to seed") from error
    return type(trainer_name, (SeededRunMixin, base),
                {"run_seed": seed, "__module__": module,
                 "__doc__": f"{base_name} trained with seed {seed} (see nnunetv2_proto.training.seeding)."})

