"""Building prototype-head networks from nnU-Net plans.

``build_network_architecture`` must be static (``nnUNetv2_predict`` calls it on the class)
and receives no dataset.json, yet the heads depend on the label layout (softmax labels or
regions) and on the trainer's head settings. The trainer therefore writes a
``prototype_head`` entry into its configuration (``head_spec``), nnU-Net copies the plans
into the results folder with it, and ``build_from_plans`` reads it back, so training and
prediction build identical networks.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Union

from torch import nn

from nnunetv2_proto.environment import SetupError
from nnunetv2_proto.label_layout import LabelLayout
from nnunetv2_proto.networks.mper import MPERConfig, MPERNetwork
from nnunetv2_proto.networks.sipl import SIPLConfig, SIPLNetwork

HEAD_SPEC_KEY = "prototype_head"
HEADS = {"sipl": (SIPLConfig, SIPLNetwork), "mper": (MPERConfig, MPERNetwork)}


def head_spec(kind: str, layout: LabelLayout, config: Union[SIPLConfig, MPERConfig]) -> dict:
    return {"kind": kind, "label_layout": layout.to_dict(), "config": asdict(config)}


def config_from_spec(config_class: type, stored: dict):
    """A head config from a stored spec; a field the spec predates takes the value it had then."""
    legacy = getattr(config_class, "LEGACY_VALUES", {})
    return config_class(**{**legacy, **stored})


def normalized_spec(spec: Optional[dict]) -> Optional[dict]:
    """A stored head spec with every field spelled out (as the current code reads it), for comparisons."""
    if not spec or spec.get("kind") not in HEADS:
        return spec
    return {**spec, "config": asdict(config_from_spec(HEADS[spec["kind"]][0], spec["config"]))}


def checkpoint_head_spec(checkpoint: dict) -> Optional[dict]:
    """The head spec a nnU-Net checkpoint was trained with (from the plans it stores), or None."""
    try:
        init_args = checkpoint["init_args"]
        return init_args["plans"]["configurations"][init_args["configuration"]].get(HEAD_SPEC_KEY)
    except (KeyError, TypeError):
        return None


def attach_head_spec(plans_manager, configuration_name: str, configuration_manager, spec: dict) -> None:
    """Record ``spec`` in the trainer's plans (saved to the results folder) and its configuration manager."""
    plans_manager.plans["configurations"][configuration_name][HEAD_SPEC_KEY] = spec
    configuration_manager.configuration[HEAD_SPEC_KEY] = spec


def build_from_plans(unet: nn.Module, configuration_manager) -> nn.Module:
    spec = configuration_manager.configuration.get(HEAD_SPEC_KEY)
    if spec is None:
        raise SetupError(
            "this configuration has no 'prototype_head' entry, so the head's label layout and settings are unknown",
            "build the network through a prototype trainer (it records the entry), or predict from a results "
            "folder whose plans.json was written by one",
        )
    if spec["kind"] not in HEADS:
        raise SetupError(f"unknown prototype head kind '{spec['kind']}'", f"expected one of {sorted(HEADS)}")
    config_class, network_class = HEADS[spec["kind"]]
    return network_class(unet, LabelLayout.from_dict(spec["label_layout"]),
                         config_from_spec(config_class, spec["config"]))
