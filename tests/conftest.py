"""Shared helpers: small nnU-Net UNets and nnU-Net folder environments for the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn

TESTS = Path(__file__).resolve().parent
TEST_TRAINER_DIR = TESTS / "ext_trainers"


def small_unet(dim: int, num_outputs: int, deep_supervision: bool = True, stages: int = 4, base: int = 8,
               residual: bool = False) -> nn.Module:
    """A real dynamic-network-architectures UNet, narrow enough for fast CPU tests."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    features = [min(base * 2 ** i, 64) for i in range(stages)]
    common = dict(input_channels=1, n_stages=stages, features_per_stage=features, conv_op=conv, kernel_sizes=3,
                  strides=[1] + [2] * (stages - 1), num_classes=num_outputs, n_conv_per_stage_decoder=1,
                  conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    if residual:
        return ResidualEncoderUNet(n_blocks_per_stage=1, **common)
    return PlainConvUNet(n_conv_per_stage=1, **common)


def nnunet_environment(root: Path) -> Dict[str, str]:
    from nnunetv2_proto.environment import trainer_directory
    values = {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": os.pathsep.join([str(trainer_directory()), str(TEST_TRAINER_DIR)]),
        "nnUNet_def_n_proc": "1",
        "nnUNet_n_proc_DA": "1",
    }
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(values[key]).mkdir(parents=True, exist_ok=True)
    return values


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> Dict[str, str]:
    values = nnunet_environment(tmp_path)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
