"""Re-planning a configuration's patch and batch so that one backbone's training fits a memory target, by
nnU-Net's own rule for its network (``ExperimentPlanner.get_plans_for_configuration``):

- while the estimate at the minimum batch (2) exceeds the target, shrink the axis whose size most exceeds the
  median image shape's proportions by that axis's total stride, re-planning the topology each time (nnU-Net's
  ``get_pool_and_conv_props``, via ``plans.derive_plans``);
- then take the largest batch that fits, at least 2, and at most what covers the planner's share of the dataset's
  voxels (5% for nnU-Net's default planner; the residual-encoder planners set no cap: 100%).

The target is ``--gpu-memory`` GB (the estimate is kept under ``HEADROOM`` of it: CUDA's context, cuDNN
workspaces and allocator fragmentation are not tensors), or by default what nnU-Net planned for: stock
nnU-Net's estimate at the original plans. Estimates are at AMP dtypes, as nnU-Net trains on CUDA.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

from ..errors import NetworkConfigError
from ..plans import plans_context
from ..patch_sizes import MIN_STAGES, planned_topology
from ..plans import derive_plans, network_class, validate_configuration
from .estimate import MemoryEstimate, estimate_for_plans
from .tracker import MiB

HEADROOM = 0.85       # the estimate may use this share of --gpu-memory
MIN_BATCH = 2         # nnU-Net's minimum batch size
MAX_DATASET_SHARE = 0.05  # nnU-Net caps a batch at 5% of the dataset's voxels
# planners that set another share (``max_dataset_covered`` in their __init__), by the name plans record them under
DATASET_SHARE_BY_PLANNER = {"nnUNetPlannerResEncM": 1.0, "nnUNetPlannerResEncL": 1.0, "nnUNetPlannerResEncXL": 1.0}
_MAX_SHRINK_STEPS = 200


class MemoryPlan(NamedTuple):
    plans: dict
    patch_size: List[int]
    batch_size: int
    estimate: MemoryEstimate
    target_bytes: int
    target_source: str
    original_patch: List[int]
    original_batch: int


def estimate_plans(trainer_cls, plans: dict, dataset_json: dict, configuration: str, *, batch: Optional[int] = None,
                   amp: bool = True) -> MemoryEstimate:
    """The training estimate of ``trainer_cls`` on ``plans``' configuration (its own batch unless given)."""
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    return estimate_for_plans(trainer_cls, pm, cm, n_in, n_out, batch=batch, amp=amp)


def stock_target(plans: dict, dataset_json: dict, configuration: str, amp: bool = True) -> int:
    """What nnU-Net planned for: its own network's estimate at its own plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return estimate_plans(nnUNetTrainer, plans, dataset_json, configuration, amp=amp).total


def _axis_to_shrink(patch: List[int], median_shape: List[float]) -> int:
    return int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])


def dataset_share(plans: dict) -> float:
    """The share of the dataset's voxels a batch may cover, by the planner that wrote ``plans``."""
    return DATASET_SHARE_BY_PLANNER.get(str(plans.get("experiment_planner_used", "")), MAX_DATASET_SHARE)


def plan_for_memory(trainer_cls, plans: dict, dataset_json: dict, configuration: str, plans_name: str, *,
                    gpu_memory_gb: Optional[float] = None, amp: bool = True,
                    log: Callable[[str], None] = lambda m: None) -> MemoryPlan:
    """Plans named ``plans_name`` whose ``configuration`` trains ``trainer_cls``'s network within the target."""
    config = validate_configuration(plans, configuration)
    original_patch, original_batch = [int(p) for p in config["patch_size"]], int(config["batch_size"])
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise NetworkConfigError(f"--gpu-memory must be positive (GB), got {gpu_memory_gb}")
        target = int(gpu_memory_gb * 2 ** 30 * HEADROOM)
        source = f"{HEADROOM:.0%} of {gpu_memory_gb:g} GB"
    else:
        target = stock_target(plans, dataset_json, configuration, amp)
        source = (f"stock nnU-Net's estimate at the original plans ({network_class(config)}, {original_batch} x "
                  f"{original_patch})")
    spacing = [float(s) for s in config["spacing"]]
    median = [float(m) for m in config.get("median_image_size_in_voxels", original_patch)]
    # nnU-Net counts the dataset's voxels in 3D for every configuration: the full-resolution median shape
    full = plans.get("configurations", {}).get("3d_fullres", {}).get("median_image_size_in_voxels")
    volume = full or plans.get("original_median_shape_after_transp") or median
    n_cases = int(dataset_json.get("numTraining", 0)) or 1
    share = dataset_share(plans)
    dataset_voxels = float(np.prod(volume, dtype=np.float64) * n_cases)

    cache: Dict[tuple, MemoryEstimate] = {}

    def estimate(patch: List[int], batch: int) -> MemoryEstimate:
        key = (tuple(patch), batch)
        if key not in cache:
            derived = derive_plans(plans, configuration, plans_name, patch_size=patch if patch != original_patch else None,
                                   batch_size=batch)
            cache[key] = estimate_plans(trainer_cls, derived, dataset_json, configuration, amp=amp)
        return cache[key]

    patch = list(original_patch)
    for _ in range(_MAX_SHRINK_STEPS):
        current = estimate(patch, MIN_BATCH)
        log(f"  patch {patch}, batch {MIN_BATCH}: estimate {current.total / MiB:.0f} MiB (target {target / MiB:.0f})")
        if current.total <= target:
            break
        topology = planned_topology(spacing, patch)
        axis = _axis_to_shrink(patch, median)
        divisor = int(np.prod([s[axis] for s in topology.strides]))
        candidate = list(patch)
        candidate[axis] -= divisor
        candidate = planned_topology(spacing, candidate).planned_patch if candidate[axis] > 0 else candidate
        if candidate[axis] <= 0 or planned_topology(spacing, candidate).n_stages < MIN_STAGES or candidate == patch:
            raise NetworkConfigError(
                f"{trainer_cls.__name__}: even patch {patch} at batch {MIN_BATCH} needs an estimated "
                f"{current.total / MiB:.0f} MiB, over the target {target / MiB:.0f} MiB ({source}), and a smaller "
                f"patch leaves too few stages. Give more memory (--gpu-memory) or reduce the backbone's memory "
                f"(--option BACKBONE.checkpoint_style=stages).")
        patch = candidate
    else:  # pragma: no cover - the loop always ends by fitting or by the error above
        raise NetworkConfigError("re-planning did not converge")

    # the estimate is affine in the batch: per-sample bytes from two batch sizes, then confirmed
    two, three = estimate(patch, MIN_BATCH), estimate(patch, MIN_BATCH + 1)
    per_sample = max(three.total - two.total, 1)
    batch = MIN_BATCH + int((target - two.total) // per_sample)
    cap = max(MIN_BATCH, int(round(dataset_voxels * share / float(np.prod(patch, dtype=np.float64)))))
    batch = max(MIN_BATCH, min(batch, cap))
    if estimate(patch, batch).total > target:  # the affine guess overshot: the largest batch that fits, by bisection
        fits, over = MIN_BATCH, batch
        while over - fits > 1:
            middle = (fits + over) // 2
            fits, over = (middle, over) if estimate(patch, middle).total <= target else (fits, middle)
        batch = fits
    final = estimate(patch, batch)
    derived = derive_plans(plans, configuration, plans_name, patch_size=patch if patch != original_patch else None,
                           batch_size=batch)
    return MemoryPlan(derived, patch, batch, final, target, source, original_patch, original_batch)


def memory_warning(trainer_cls, plans: dict, dataset_json: dict, configuration: str, free_bytes: int, *,
                   dataset: str, plans_name: str) -> Optional[str]:
    """The message a trainer prints before its first step when its estimate exceeds the device's free memory
    (None when it fits): the estimate, the free memory and the ``nnunet-lk plans`` command that fits."""
    estimate = estimate_plans(trainer_cls, plans, dataset_json, configuration, amp=True)
    if estimate.total <= free_bytes:
        return None
    config = validate_configuration(plans, configuration)
    backbone = getattr(trainer_cls, "backbone", None) or trainer_cls.__name__
    gb = max(int(free_bytes / 2 ** 30), 1)
    return (f"nnunet-lk: {trainer_cls.__name__} needs an estimated {estimate.total / 2 ** 30:.1f} GiB for one training "
            f"step at patch {config['patch_size']}, batch {config['batch_size']} (AMP), but this GPU has "
            f"{free_bytes / 2 ** 30:.1f} GiB free: training will most likely stop with CUDA out of memory. Plans that "
            f"fit (same preprocessed data): `nnunet-lk plans -d {dataset} -c {configuration} -p {plans_name} "
            f"--backbone {backbone} --gpu-memory {gb}`, then train with `-p {plans_name}_{backbone}_{gb}GB`.")
