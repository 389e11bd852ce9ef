"""An nnU-Net UNet whose full-resolution classifier is replaced or accompanied by a head.

dynamic-network-architectures' ``UNetDecoder`` and ``UNetResDecoder`` (PlainConvUNet,
ResidualEncoderUNet, ResidualUNet) build the same pieces: ``transpconvs``, ``stages`` and
one 1x1 ``seg_layers`` conv per stage. ``DecoderHeadNetwork`` reuses those modules as they
are (so state-dict keys stay nnU-Net's), runs the decoder loop itself to expose every
stage's features, keeps the lower-resolution deep-supervision outputs linear, and lets a
subclass produce the full-resolution output. ``decoder.deep_supervision`` still switches
between a list of outputs and one tensor, which is what nnU-Net's
``set_deep_supervision_enabled`` and ``nnUNetv2_predict`` rely on.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nnunetv2_proto.environment import SetupError

Outputs = Union[torch.Tensor, List[torch.Tensor]]


def check_decoder_exposes_stages(network: nn.Module) -> None:
    decoder = getattr(network, "decoder", None)
    required = ("stages", "transpconvs", "seg_layers", "deep_supervision")
    if getattr(network, "encoder", None) is None or decoder is None or not all(hasattr(decoder, a) for a in required):
        raise SetupError(
            f"{type(network).__name__} does not expose an encoder and a UNet decoder with per-stage features "
            "(stages / transpconvs / seg_layers), which the prototype heads attach to",
            "use a plans configuration whose architecture is PlainConvUNet, ResidualEncoderUNet or ResidualUNet",
        )


def decoder_stage_features(decoder: nn.Module, skips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Outputs of every decoder stage, coarse to fine (the last one is full resolution)."""
    features = []
    below = skips[-1]
    for s, (transpconv, stage) in enumerate(zip(decoder.transpconvs, decoder.stages)):
        below = stage(torch.cat((transpconv(below), skips[-(s + 2)]), 1))
        features.append(below)
    return features


class DecoderHeadNetwork(nn.Module):
    """Base class: encoder + decoder of an nnU-Net UNet, full-resolution output from a head.

    ``forward(x)`` behaves exactly like the wrapped UNet's. ``forward(x, return_aux=True)``
    additionally returns the head's auxiliary outputs (a NamedTuple) for training losses;
    the flag is a Python constant, so ``torch.compile`` and DDP see a static graph.
    """

    def __init__(self, unet: nn.Module, keep_final_linear_layer: bool):
        super().__init__()
        check_decoder_exposes_stages(unet)
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        if not keep_final_linear_layer:
            # the head is the full-resolution classifier; an unused conv would have no gradient,
            # which DDP without find_unused_parameters rejects
            self.decoder.seg_layers = nn.ModuleList(list(self.decoder.seg_layers)[:-1])

    @property
    def conv_op(self) -> type:
        return self.encoder.conv_op

    def stage_channels(self) -> List[int]:
        """Channels of each decoder stage's output, coarse to fine."""
        return [int(c) for c in list(self.encoder.output_channels)[-2::-1]]

    def full_resolution_output(self, skips: Sequence[torch.Tensor], stage_features: List[torch.Tensor],
                               return_aux: bool) -> Tuple[torch.Tensor, Optional[Any]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        skips = self.encoder(x)
        stage_features = decoder_stage_features(self.decoder, skips)
        final, aux = self.full_resolution_output(skips, stage_features, return_aux)
        if self.decoder.deep_supervision:
            # nnU-Net's order: full resolution first, then ever coarser linear outputs
            lower = [self.decoder.seg_layers[s](stage_features[s]) for s in range(len(stage_features) - 1)]
            outputs: Outputs = [final] + lower[::-1]
        else:
            outputs = final
        return (outputs, aux) if return_aux else outputs
