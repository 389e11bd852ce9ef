"""nnunetv2-proto: prototype-based segmentation heads (SIPL, MPER) for nnU-Net v2.

The library half of the plugin: heads, losses and semi-supervised machinery as plain
PyTorch modules, plus the command line tools. The nnU-Net trainers that wire them in live
in ``nnunetv2_proto.trainers`` (the repository's top-level ``trainers/`` folder), which
nnU-Net discovers through the ``nnUNet_extTrainer`` environment variable.
"""

__version__ = "0.1.0"
