"""Named backbone configurations (timm-style): one builder per backbone file, sizes as configs. A registered
name is the whole description of a backbone: builder and size, dimensions, the trainer name nnU-Net finds it by
(every trainer is generated from the registry, ``training/trainers.py``), its family, and the training recipe of
its paper or official code where one is published (``Recipe``; ``training/recipes.py`` runs it).

A builder has the signature
    builder(conv_op, input_channels, num_classes, *, strides, kernel_sizes, patch_size,
            deep_supervision, <option>=<default>, ...) -> LKUNet
where ``strides``/``kernel_sizes`` are the plans' per-stage lists (None = the paper's pyramid). The builder's
keyword-only options and their defaults are the single source of a backbone's options; a registered name
stores only what its size changes (DLKUNet-S: ``levels=3``). ``check_options`` is the one place that
validates user options (build_backbone and derived plans both ask it).
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch.nn as nn

from ..blocks.depthwise import lk_conv_op
from ..blocks.ops import conv_for_dim, conv_dim
from .checkpointing import apply_checkpointing, apply_memory_lean
from .unet import NetworkConfigError


# the plans' arguments every builder takes; everything else keyword-only is a backbone option
PLANS_ARGUMENTS = ("strides", "kernel_sizes", "patch_size", "deep_supervision")
# options every backbone has, applied to the built U skeleton rather than by the builder (``networks.checkpointing``:
# lean block forms recompute cheap operations; activation checkpointing trades one more forward for memory)
SKELETON_OPTIONS = {"memory_lean": "auto", "checkpoint_style": "off"}


def builder_options(builder: Callable[..., nn.Module]) -> Dict[str, object]:
    """The builder's keyword-only options with their defaults (``inspect.Parameter.empty`` if it has none)."""
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in PLANS_ARGUMENTS}


@dataclass(frozen=True)
class Recipe:
    """An optimiser and a learning-rate schedule over progress (data; ``training/recipes.py`` applies it).

    ``schedule``: ``poly`` lr (1 - t)^0.9; ``step`` lr gamma^floor(t / step_every); ``cosine`` from lr to
    ``min_lr`` over the run. ``warmup``: the first fraction of training ramps linearly up to lr (the
    schedule then runs over the rest)."""
    optimizer: str  # sgd | adam | adamw
    lr: float
    weight_decay: float
    schedule: str
    momentum: float = 0.0
    nesterov: bool = False
    step_every: float = 0.0
    gamma: float = 1.0
    min_lr: float = 0.0
    warmup: float = 0.0
    source: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    size: Dict = field(default_factory=dict)  # only what this named size changes
    dims: Tuple[int, ...] = (2, 3)
    paper: str = ""
    description: str = ""
    trainer: str = ""     # nnUNetTrainer<trainer> is the plain trainer nnU-Net finds it by
    family: str = ""      # sizes of one network share a family (dlkunet_s/m/l: dlkunet)
    paper_recipes: Dict[int, Recipe] = field(default_factory=dict)   # dim -> the paper's recipe

    @property
    def trainer_name(self) -> str:
        return f"nnUNetTrainer{self.trainer}"

    def dimension_problem(self, dim: int) -> Optional[str]:
        """Why this backbone cannot be built for a ``dim``-D configuration (None: it can)."""
        if dim in self.dims:
            return None
        return f"{self.name} is a {'/'.join(f'{d}D' for d in self.dims)} network and this configuration is {dim}D"

    def dimension_fix(self) -> str:
        return f"use a {'2d' if 2 in self.dims else '3d_fullres'} configuration"

    @property
    def config(self) -> Dict[str, object]:
        """Every option with its default for this name: the builder's defaults, the skeleton's, then the size's."""
        return {**builder_options(self.builder), **SKELETON_OPTIONS, **self.size}



_REGISTRY: Dict[str, BackboneSpec] = {}


def register_backbone(name: str, builder: Callable[..., nn.Module], *, trainer: str, dims=(2, 3), paper: str = "",
                      description: str = "", family: str = "", paper_recipes: Optional[Dict[int, Recipe]] = None,
                      **size) -> BackboneSpec:
    """Register ``name``; ``trainer``: the trainer name's suffix (``DLKUNetS`` -> nnUNetTrainerDLKUNetS);
    ``family``: default the name up to its first underscore; ``paper_recipes``: dim -> Recipe."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    if not trainer.isidentifier() or any(s.trainer == trainer for s in _REGISTRY.values()):
        raise ValueError(f"{name}: trainer suffix {trainer!r} must be a Python name no other backbone uses")
    unknown_dims = sorted(set(paper_recipes or {}) - set(dims))
    if unknown_dims:
        raise ValueError(f"{name}: paper recipes for {unknown_dims}D, but the backbone is built for {list(dims)}D")
    options = {**builder_options(builder), **SKELETON_OPTIONS}
    unknown = sorted(set(size) - set(options))
    if unknown:
        raise ValueError(f"{name}: {builder.__name__} has no option(s) {unknown}")
    undefined = sorted(k for k, v in options.items() if v is inspect.Parameter.empty and k not in size)
    if undefined:
        raise ValueError(f"{name}: option(s) {undefined} have no default in {builder.__name__}; give them as the size")
    spec = BackboneSpec(name=name, builder=builder, size=dict(size), dims=tuple(dims), paper=paper,
                        description=description, trainer=trainer, family=family or name.split("_")[0],
                        paper_recipes=dict(paper_recipes or {}))
    _REGISTRY[name] = spec
    return spec


def check_options(name: str, options: Dict[str, object]) -> None:
    """A ``NetworkConfigError`` naming the valid options (with defaults) if ``options`` has unknown keys."""
    spec = get_backbone(name)
    unknown = sorted(set(options) - set(spec.config))
    if unknown:
        raise NetworkConfigError(f"{name}: unknown option(s) {unknown}; valid options are "
                                 f"{', '.join(f'{k}={v!r}' for k, v in spec.config.items())}")


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
    problem = spec.dimension_problem(dim)
    if problem:
        raise NetworkConfigError(f"{problem}: {spec.dimension_fix()}.")
    check_options(name, overrides)
    config = {**spec.config, **overrides}
    skeleton = {k: config.pop(k) for k in SKELETON_OPTIONS}
    net = spec.builder(conv_op, input_channels, num_classes, strides=strides, kernel_sizes=kernel_sizes,
                       patch_size=patch_size, deep_supervision=deep_supervision, **config)
    apply_memory_lean(net, skeleton["memory_lean"])
    return apply_checkpointing(net, skeleton["checkpoint_style"])
