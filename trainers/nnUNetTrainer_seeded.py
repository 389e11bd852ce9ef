"""``<AnyTrainer>_seed<N>``: any trainer nnU-Net can find, trained with seed N (made on demand).

nnU-Net looks a trainer up with ``hasattr(module, name)`` on every module in the
``nnUNet_extTrainer`` folders, so this module's ``__getattr__`` answers for every name ending
in ``_seed<N>`` whose base nnU-Net can find, e.g. ``nnUNetTrainer_cpuBudget_seed2`` or
``nnUNetTrainerSIPL_seed1``. See ``nnunetv2_proto.training.seeding``.
"""

from nnunetv2_proto.training.seeding import seeded_trainer_class


def __getattr__(name: str) -> type:
    trainer_class = seeded_trainer_class(name, __name__)
    globals()[name] = trainer_class  # one class per name for the life of the process
    return trainer_class
