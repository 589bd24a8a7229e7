"""Which patch sizes a re-planned configuration can train on, and the nearest ones that can.

nnU-Net's experiment planner (``get_pool_and_conv_props``) decides the topology for a patch: it pools an
axis while its bottleneck keeps at least 4 voxels (respecting the spacing's anisotropy) and pads the patch
up to a multiple of the total stride. A patch works here when

- every size is a positive integer,
- nnU-Net plans it as it is (no padding: each axis is a multiple of its total stride), and
- the topology has at least ``MIN_STAGES`` stages (two poolings). With fewer, every nnunet-lk backbone has
  one decoder level, so one deep-supervision output; nnU-Net weights its lowest output 0 and normalises the
  weights, 0 / 0, and training stops with a NaN loss at its first iteration. (Stock nnU-Net's trainer fails
  the same way on such plans.) Anisotropic axes that nnU-Net does not pool stay allowed, as it plans them.

Suggestions are computed with the same planner, never hard-coded.
"""
from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence

from .errors import NetworkConfigError

MIN_STAGES = 3
_MIN_BOTTLENECK = 4  # nnU-Net's min_feature_map_size in its experiment planners
_MAX_STEPS = 64


class Topology(NamedTuple):
    strides: List[List[int]]
    kernel_sizes: List[List[int]]
    planned_patch: List[int]  # the patch padded to a multiple of the total stride

    @property
    def n_stages(self) -> int:
        return len(self.strides)


def planned_topology(spacing: Sequence[float], patch_size: Sequence[int]) -> Topology:
    """nnU-Net's own plan for ``patch_size`` (its ``get_pool_and_conv_props``, as its planner calls it)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, planned, _ = get_pool_and_conv_props(list(spacing), list(patch_size), _MIN_BOTTLENECK,
                                                              999999)
    return Topology([[int(v) for v in s] for s in strides], [[int(v) for v in k] for k in kernels],
                    [int(p) for p in planned])


def fits(spacing, patch_size) -> bool:
    """nnU-Net plans ``patch_size`` as it is, with enough stages to train."""
    topology = planned_topology(spacing, patch_size)
    return topology.planned_patch == list(patch_size) and topology.n_stages >= MIN_STAGES


def _nearest_above(spacing, patch_size) -> List[int]:
    """Pad to the total stride until nnU-Net plans the padded patch as it is (padding can add a stage)."""
    patch = list(patch_size)
    for _ in range(_MAX_STEPS):
        planned = planned_topology(spacing, patch).planned_patch
        if planned == patch:
            return patch
        patch = planned
    raise RuntimeError(f"nnU-Net's planner did not settle on a patch from {list(patch_size)}")


def _nearest_below(spacing, patch_size) -> Optional[List[int]]:
    """Round down to the total stride until nnU-Net plans the patch as it is; None if nothing trainable."""
    patch = list(patch_size)
    for _ in range(_MAX_STEPS):
        if min(patch) < 1:
            return None
        topology = planned_topology(spacing, patch)
        if topology.planned_patch == patch:
            return patch if topology.n_stages >= MIN_STAGES else None
        multiples = [_total_stride(topology.strides, axis) for axis in range(len(patch))]
        patch = [p // m * m for p, m in zip(patch, multiples)]
    return None


def _total_stride(strides, axis: int) -> int:
    total = 1
    for s in strides:
        total *= s[axis]
    return total


def nearest_fitting_patches(spacing, patch_size):
    """(nearest below or None, nearest above): the patches nnU-Net plans as they are on either side."""
    return _nearest_below(spacing, patch_size), _nearest_above(spacing, patch_size)


def smallest_working_patch(spacing, patch_size) -> List[int]:
    """The smallest patch in the proportions of ``patch_size`` that works: every axis scaled by the same
    factor (in steps of 1/8), rounded up and padded to the total stride nnU-Net plans for it."""
    patch = [max(1, int(p)) for p in patch_size]
    for eighths in range(8, 8 * 4096):
        scaled = [-(-p * eighths // 8) for p in patch]
        candidate = _nearest_above(spacing, scaled)
        if planned_topology(spacing, candidate).n_stages >= MIN_STAGES:
            return candidate
    raise RuntimeError(f"no trainable patch found from {list(patch_size)}")


def _flag(patch) -> str:
    return "--patch " + " ".join(str(int(p)) for p in patch)


def check_patch(spacing, patch_size, planned_patch=None) -> Topology:
    """The topology nnU-Net plans for ``patch_size``; a ``NetworkConfigError`` naming the problem and the
    nearest working sizes if it is not a patch the re-planned configuration can train on."""
    if any(not isinstance(p, numbers.Integral) or p < 1 for p in patch_size):
        hint = f" (the configuration's own patch: {_flag(planned_patch)})" if planned_patch else ""
        raise NetworkConfigError(f"patch size {list(patch_size)}: every size must be a positive number of "
                                 f"voxels{hint}.")
    patch = [int(p) for p in patch_size]
    topology = planned_topology(spacing, patch)
    if topology.n_stages < MIN_STAGES:
        smallest = smallest_working_patch(spacing, patch)
        raise NetworkConfigError(
            f"patch size {patch} is too small: nnU-Net plans {topology.n_stages} stage(s) for it "
            f"({topology.n_stages - 1} pooling(s)), and training needs at least {MIN_STAGES} ({MIN_STAGES - 1} "
            f"poolings, so that every nnunet-lk backbone has at least two decoder levels): with one, there is a "
            f"single deep-supervision output, nnU-Net's loss weights it 0 / 0 and training stops with a NaN loss at "
            f"its first iteration. The smallest patch in the proportions of {patch} that works is {smallest}: "
            f"use {_flag(smallest)}.")
    if topology.planned_patch != patch:
        below, above = nearest_fitting_patches(spacing, patch)
        choices = ([f"{_flag(below)} (nearest below)"] if below else []) + [f"{_flag(above)} (nearest above)"]
        raise NetworkConfigError(
            f"patch size {patch} does not fit the network nnU-Net plans for it: each axis must be a multiple of "
            f"its total stride {[_total_stride(topology.strides, a) for a in range(len(patch))]}. Use "
            f"{' or '.join(choices)}.")
    return topology
