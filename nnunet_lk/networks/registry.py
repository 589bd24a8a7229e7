"""Named backbone configurations (timm-style): one builder per backbone file, sizes as configs.

A builder has the signature
    builder(conv_op, input_channels, num_classes, *, strides, kernel_sizes, patch_size,
            deep_supervision, **config) -> LKUNet
where ``strides``/``kernel_sizes`` are the plans' per-stage lists (None = the paper's pyramid) and
``config`` holds the registered defaults, updated by user overrides.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch.nn as nn

from ..blocks.depthwise import lk_conv_op
from ..blocks.ops import conv_for_dim, conv_dim
from .unet import NetworkConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    config: Dict = field(default_factory=dict)
    dims: Tuple[int, ...] = (2, 3)
    paper: str = ""
    description: str = ""


_REGISTRY: Dict[str, BackboneSpec] = {}


def register_backbone(name: str, builder: Callable[..., nn.Module], *, dims=(2, 3), paper: str = "",
                      description: str = "", **config) -> BackboneSpec:
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    spec = BackboneSpec(name=name, builder=builder, config=dict(config), dims=tuple(dims), paper=paper,
                        description=description)
    _REGISTRY[name] = spec
    return spec


def list_backbones() -> list:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise NetworkConfigError(f"unknown backbone {name!r}.{hint} Known backbones: {', '.join(list_backbones())} "
                                 f"(`nnunet-lk list` shows them with their trainers).")
    return _REGISTRY[name]


def build_backbone(name: str, *, input_channels: int, num_classes: int, dim: Optional[int] = None, conv_op=None,
                   strides: Optional[Sequence] = None, kernel_sizes: Optional[Sequence] = None,
                   patch_size: Optional[Sequence[int]] = None, deep_supervision: bool = False,
                   **overrides) -> nn.Module:
    """Build a registered backbone. Give ``dim`` (2/3) or ``conv_op``; unknown overrides are an error.
    A plain ``nn.Conv2d``/``nn.Conv3d`` becomes ``LKConv2d``/``LKConv3d`` (same parameters and state-dict
    keys; depthwise convs through ``grouped_conv``)."""
    spec = get_backbone(name)
    if conv_op is None:
        if dim is None:
            raise ValueError("give dim (2 or 3) or conv_op")
        conv_op = conv_for_dim(dim)
    conv_op = lk_conv_op(conv_op)
    dim = conv_dim(conv_op)
    if dim not in spec.dims:
        raise NetworkConfigError(
            f"{name} is a {'/'.join(f'{d}D' for d in spec.dims)} network and cannot be built for a {dim}D "
            f"configuration; train it on a {'2d' if 2 in spec.dims else '3d_fullres'} configuration instead.")
    unknown = sorted(set(overrides) - set(spec.config))
    if unknown:
        raise NetworkConfigError(f"{name}: unknown option(s) {unknown}; valid options are {sorted(spec.config)}")
    config = {**spec.config, **overrides}
    return spec.builder(conv_op, input_channels, num_classes, strides=strides, kernel_sizes=kernel_sizes,
                        patch_size=patch_size, deep_supervision=deep_supervision, **config)
