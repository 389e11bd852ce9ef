"""MPER network: nnU-Net UNet that keeps its final 1x1 conv and adds a multi-prototype classifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.heads.multi_prototype import MultiPrototypeClassifier, SlotBalance
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.networks.decoder_head_network import DecoderHeadNetwork

INFERENCE_MODES = ("linear", "prototype", "fused")
SLOT_ASSIGNMENTS = ("nearest", "balanced")


@dataclass(frozen=True)
class MPERConfig:
    prototypes_per_class: int = 3
    temperature: float = 0.1
    momentum: float = 0.99
    # what forward() returns outside training: the linear head (vanilla cost), the
    # prototype classifier, or the mean of both classifiers' probabilities
    inference: str = "linear"
    # which own-class prototype a voxel trains (PPC/PPD target) and moves (EMA): its nearest, as the paper
    # and the official code do, or a balanced assignment that keeps every prototype of a class in use
    slot_assignment: str = "nearest"

    def __post_init__(self) -> None:
        if self.inference not in INFERENCE_MODES:
            raise SetupError(f"unknown MPER inference mode '{self.inference}'", f"use one of {INFERENCE_MODES}")
        if self.slot_assignment not in SLOT_ASSIGNMENTS:
            raise SetupError(f"unknown MPER slot assignment '{self.slot_assignment}'", f"use one of {SLOT_ASSIGNMENTS}")
        if self.prototypes_per_class < 1:
            raise SetupError("MPER needs at least one prototype per class", "set prototypes_per_class >= 1")


class MPERAux(NamedTuple):
    """The training step's view of the network; the prototype scores need the labels, so the trainer asks
    ``classifier.scores(features, labels)`` for them."""
    features: torch.Tensor           # (B, C, *s) full-resolution decoder features (the embedding, unnormalised)
    linear_logits: torch.Tensor      # (B, K, *s) the full-resolution linear output


class MPERNetwork(DecoderHeadNetwork):
    def __init__(self, unet: nn.Module, layout: LabelLayout, config: MPERConfig):
        super().__init__(unet, keep_final_linear_layer=True)
        self.layout = layout
        self.inference = config.inference
        balance = SlotBalance() if config.slot_assignment == "balanced" else None
        self.classifier = MultiPrototypeClassifier(layout.num_exclusive, config.prototypes_per_class,
                                                   self.stage_channels()[-1], config.temperature, config.momentum,
                                                   balance)

    def prototype_output_logits(self, prototype_logits: torch.Tensor) -> torch.Tensor:
        """Exclusive-class prototype logits -> logits over the network's output channels."""
        if not self.layout.has_regions:
            return prototype_logits
        probabilities = self.layout.output_probabilities_from_exclusive(torch.softmax(prototype_logits.float(), 1))
        return self.layout.logits_from_output_probabilities(probabilities)

    def full_resolution_output(self, skips, stage_features, return_aux):
        features = stage_features[-1]
        linear = self.decoder.seg_layers[-1](features)
        aux = MPERAux(features, linear) if return_aux else None
        if self.training or self.inference == "linear":
            return linear, aux
        prototype_logits = self.classifier.class_logits(features)
        prototype_output = self.prototype_output_logits(prototype_logits).to(linear.dtype)
        if self.inference == "prototype":
            return prototype_output, aux
        fused = 0.5 * (self.layout.output_probabilities_from_logits(linear.float())
                       + self.layout.output_probabilities_from_logits(prototype_output.float()))
        return self.layout.logits_from_output_probabilities(fused).to(linear.dtype), aux
