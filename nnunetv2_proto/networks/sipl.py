"""SIPL network: nnU-Net UNet whose final 1x1 conv is replaced by the IPL head, guided by SMG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.heads.instance_prototypes import DotProductPredictor, DynamicConvPredictor, PrototypeGenerator
from nnunetv2_proto.heads.mask_generator import SelfSupervisedMaskGenerator
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.networks.decoder_head_network import DecoderHeadNetwork

PREDICTORS = {"dot_product": DotProductPredictor, "dynamic_conv": DynamicConvPredictor}


@dataclass(frozen=True)
class SIPLConfig:
    num_queries: int = 32
    query_dim: int = 64
    num_heads: int = 8
    smg_stages: int = 3
    layers_per_stage: int = 2
    prototype_dim: int = 64
    use_smg: bool = True
    use_instance_proposals: bool = True
    # instance proposals as mask-weighted means, not the paper's plain average over the grid, which
    # shrinks a small structure's proposal (norm 1.5-3 against the common one's 15 in trained runs) and
    # leaves the prototypes nearly input-independent (docs/design.md, "Proposal scale")
    normalize_proposals_by_mass: bool = True
    predictor: str = "dot_product"
    # the SMG filter at inference as in training (the official code filters at test time too)
    filter_at_inference: bool = True
    # k-means layers start as the identity with clusters leaning towards background (official kMaX)
    kmeans_identity_init: bool = False

    # what a head spec written before a field existed meant, so older models rebuild unchanged
    LEGACY_VALUES = {"filter_at_inference": False, "kmeans_identity_init": False}

    def __post_init__(self) -> None:
        if not self.use_instance_proposals and self.normalize_proposals_by_mass:
            # inert without instance proposals: one spelling, so such a model's spec does not change with
            # the proposal default (a run of either default resumes and rebuilds as the same network)
            object.__setattr__(self, "normalize_proposals_by_mass", False)
        if self.predictor not in PREDICTORS:
            raise SetupError(f"unknown SIPL predictor '{self.predictor}'", f"use one of {sorted(PREDICTORS)}")
        if self.query_dim % self.num_heads or self.query_dim % 8:
            raise SetupError(f"query_dim {self.query_dim} must be divisible by num_heads ({self.num_heads}) and 8",
                             "pick a multiple of both, e.g. 64 or 128")
        if self.num_queries < 2 or self.smg_stages < 1 or self.layers_per_stage < 1:
            raise SetupError("SMG needs at least 2 queries, 1 stage and 1 layer per stage",
                             "check the trainer's SIPL settings")


class SIPLAux(NamedTuple):
    pseudo_mask_logits: List[torch.Tensor]  # one (B, K_excl, *s_l) tensor per SMG layer
    diagnostics: Dict[str, torch.Tensor]    # 0-dim, no gradient: filter_kept_fraction, proposal norms


class SIPLHead(nn.Module):
    """SMG (optional) -> masks -> prototypes from bottleneck features -> per-voxel logits."""

    def __init__(self, conv_op: type, stage_channels: Sequence[int], bottleneck_channels: int,
                 layout: LabelLayout, config: SIPLConfig):
        super().__init__()
        self.has_regions = layout.has_regions
        self.uses_masks = config.use_instance_proposals
        self.register_buffer("membership", layout.membership_tensor(), persistent=False)
        self.smg: Optional[SelfSupervisedMaskGenerator] = None
        if config.use_smg:
            # the coarsest decoder stages, never the full-resolution one: shallow plans (small images)
            # have few stages, and SMG at full resolution would cost as much as the decoder itself
            stages = list(stage_channels[: min(config.smg_stages, len(stage_channels) - 1)])
            if not stages:
                raise SetupError("SMG needs at least one decoder stage below full resolution",
                                 "use plans with two or more resolution stages, or the _noSMG variant")
            self.smg = SelfSupervisedMaskGenerator(conv_op, stages, layout.num_exclusive, config.num_queries,
                                                   config.query_dim, config.layers_per_stage, config.num_heads,
                                                   filter_at_inference=config.filter_at_inference,
                                                   identity_init=config.kmeans_identity_init)
        self.generator = PrototypeGenerator(layout.num_outputs, bottleneck_channels, config.prototype_dim,
                                            config.use_instance_proposals, config.normalize_proposals_by_mass)
        self.predictor = PREDICTORS[config.predictor](conv_op, stage_channels[-1], config.prototype_dim,
                                                      layout.num_outputs)

    def forward(self, bottleneck: torch.Tensor, stage_features: Sequence[torch.Tensor],
                need_aux: bool) -> Tuple[torch.Tensor, Optional[SIPLAux]]:
        full_resolution = stage_features[-1]
        pseudo: List[torch.Tensor] = []
        masks = None
        kept = None
        if self.smg is not None and (self.uses_masks or need_aux):
            pseudo, kept = self.smg(stage_features[: self.smg.num_stages])
            exclusive = torch.softmax(pseudo[-1].float(), 1)
            masks = torch.einsum("bc...,ck->bk...", exclusive, self.membership)
        elif self.smg is None and self.uses_masks:
            # no SMG: instance proposals come from the head's own prediction with common proposals only
            first_pass = self.predictor(full_resolution, self.generator(bottleneck, None).prototypes)
            masks = torch.sigmoid(first_pass.float()) if self.has_regions else torch.softmax(first_pass.float(), 1)
        generated = self.generator(bottleneck, masks)
        logits = self.predictor(full_resolution, generated.prototypes)
        if not need_aux:
            return logits, None
        return logits, SIPLAux(pseudo, self.diagnostics(generated, kept))

    @staticmethod
    @torch.no_grad()
    def diagnostics(generated, kept: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        found = {"common_proposal_norm": generated.common_proposals.float().norm(dim=-1).mean(),
                 "prototype_spread": prototype_spread(generated.prototypes)}
        if generated.instance_proposals is not None:
            found["instance_proposal_norm"] = generated.instance_proposals.float().norm(dim=-1).mean()
        if kept is not None:
            found["filter_kept_fraction"] = kept
        return found


def prototype_spread(prototypes: torch.Tensor) -> torch.Tensor:
    """How much the prototypes (B, K, D) differ between the batch's samples: per class, the RMS distance of
    the samples' prototypes from their mean over the norm of that mean, averaged over classes. 0 means the
    same prototypes for every input (a fixed classifier); IPL is instance-adaptive only as far as this is not 0."""
    prototypes = prototypes.float()
    mean = prototypes.mean(0)
    deviation = (prototypes - mean).square().sum(-1).mean(0).sqrt()
    return (deviation / mean.norm(dim=-1).clamp_min(1e-12)).mean()


class SIPLNetwork(DecoderHeadNetwork):
    def __init__(self, unet: nn.Module, layout: LabelLayout, config: SIPLConfig):
        super().__init__(unet, keep_final_linear_layer=False)
        self.head = SIPLHead(self.conv_op, self.stage_channels(), int(self.encoder.output_channels[-1]),
                             layout, config)

    @property
    def mask_generator(self) -> Optional[SelfSupervisedMaskGenerator]:
        return self.head.smg

    def full_resolution_output(self, skips, stage_features, return_aux):
        return self.head(skips[-1], stage_features, need_aux=return_aux)
