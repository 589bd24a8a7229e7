"""Reading nnU-Net plans for our builders, and deriving plans variants without re-preprocessing.

A derived plans file is a copy of an existing one under a new ``plans_name`` with one configuration
changed (patch, batch, backbone options). It keeps the configuration's ``data_identifier``, so it
reuses the preprocessed arrays; nnU-Net trains it with ``-p NAME``. Backbone options live in the
configuration under ``"nnunet_lk": {"<backbone>": {option: value}}`` and are read by the builders.
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple


from .blocks.recompute import lean_on
from .networks.registry import check_options
from .errors import NetworkConfigError, UsageError
from .patch_sizes import check_patch


def plans_context(plans: dict, dataset_json: dict, configuration: str):
    """(plans manager, configuration manager, input channels, output channels) as nnU-Net derives them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise UsageError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{', '.join(plans.get('configurations', {}))}")
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    return pm, cm, n_in, n_out


OPTIONS_KEY = "nnunet_lk"


def _resolved_configuration(plans: dict, configuration: str) -> dict:
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configurations, dict):
        raise NetworkConfigError("these plans have no 'configurations': not an nnU-Net v2 plans file. Run "
                                 "nnUNetv2_plan_and_preprocess (nnunetv2 2.8) to create one.")
    if configuration not in configurations:
        raise NetworkConfigError(f"configuration {configuration!r} is not in the plans; available: "
                                 f"{', '.join(configurations)}")
    resolved, seen = {}, set()
    name = configuration
    chain = []
    while name is not None:  # nnU-Net's inherits_from: parents first, children override
        if name in seen or name not in configurations:
            raise NetworkConfigError(f"configuration {configuration!r} inherits from missing or cyclic {name!r}")
        seen.add(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
    for entry in reversed(chain):
        resolved.update(entry)
    return resolved


def validate_configuration(plans: dict, configuration: str) -> dict:
    """The resolved configuration, or a clear error if nnU-Net 2.4+ would not have written it."""
    config = _resolved_configuration(plans, configuration)
    if "patch_size" not in config:
        raise NetworkConfigError(f"configuration {configuration!r} has no 'patch_size'; the plans are incomplete. "
                                 f"Re-run nnUNetv2_plan_and_preprocess.")
    arch = config.get("architecture")
    has_new = isinstance(arch, dict) and "strides" in arch.get("arch_kwargs", {})
    has_legacy = "pool_op_kernel_sizes" in config and "UNet_class_name" in config
    if not (has_new or has_legacy):
        raise NetworkConfigError(
            f"configuration {configuration!r} has neither architecture.arch_kwargs.strides (nnU-Net >= 2.4) nor "
            f"pool_op_kernel_sizes: these plans come from an unsupported nnU-Net version. Re-run "
            f"nnUNetv2_plan_and_preprocess with nnunetv2 2.8 to write plans this plugin can read.")
    return config


def configuration_strides(configuration_manager) -> Tuple[List[List[int]], Optional[List[List[int]]]]:
    """The plans' per-stage strides and conv kernel sizes (nnU-Net's pool_op_kernel_sizes IS strides)."""
    arch = configuration_manager.network_arch_init_kwargs
    strides = arch.get("strides")
    if strides is None:
        raise NetworkConfigError("the plans' architecture has no 'strides'; re-run nnUNetv2_plan_and_preprocess "
                                 "with nnunetv2 2.8")
    return [list(s) for s in strides], [list(k) for k in arch["kernel_sizes"]] if "kernel_sizes" in arch else None


def backbone_options(configuration_manager, backbone: str) -> dict:
    return dict(configuration_manager.configuration.get(OPTIONS_KEY, {}).get(backbone, {}))


def list_presets() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("nnunet_lk.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> dict:
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return json.load(f)
    path = resources.files("nnunet_lk.presets") / f"{name_or_path}.json"
    if not path.is_file():
        raise NetworkConfigError(f"unknown plans preset {name_or_path!r}; known presets: {', '.join(list_presets())} "
                                 f"(or give a path to a JSON file)")
    return json.loads(path.read_text())


def replan_topology(config: dict, patch_size: List[int]) -> dict:
    """The configuration's ``architecture`` re-planned for ``patch_size`` the way nnU-Net's experiment
    planner plans it (its own ``get_pool_and_conv_props``: pool while the bottleneck stays >= 4 voxels an
    axis, respecting the spacing's anisotropy). Keeping a 640² plan's 8 stages on a 128² patch would leave
    1×1 bottlenecks and, for backbones that pad to their stride, 4× the work. Patches that are not positive,
    not planned as they are, or too small to train are refused with the nearest ones that work
    (``nnunet_lk.patch_sizes``)."""
    topology = check_patch(config["spacing"], patch_size, planned_patch=config.get("patch_size"))
    strides, kernels = topology.strides, topology.kernel_sizes
    arch = copy.deepcopy(config["architecture"])
    kwargs = arch["arch_kwargs"]
    n = len(strides)

    def resized(values, length):  # nnU-Net's per-stage lists, truncated or extended with their last value
        values = list(values)
        return (values + values[-1:] * length)[:length]

    kwargs.update(n_stages=n, strides=strides, kernel_sizes=kernels,
                  features_per_stage=resized(kwargs["features_per_stage"], n),
                  n_conv_per_stage=resized(kwargs["n_conv_per_stage"], n),
                  n_conv_per_stage_decoder=resized(kwargs["n_conv_per_stage_decoder"], n - 1))
    return arch


def derive_plans(plans: dict, configuration: str, plans_name: str, *, patch_size: Optional[Sequence[int]] = None,
                 batch_size: Optional[int] = None, backbone_opts: Optional[Dict[str, dict]] = None,
                 preset: Optional[dict] = None) -> dict:
    """A copy of ``plans`` named ``plans_name`` whose ``configuration`` has the given changes.
    Explicit arguments win over the preset's values."""
    config = validate_configuration(plans, configuration)
    preset = preset or {}
    patch_size = list(patch_size) if patch_size is not None else preset.get("patch_size")
    batch_size = batch_size if batch_size is not None else preset.get("batch_size")
    options = copy.deepcopy(preset.get(OPTIONS_KEY, {}))
    for backbone, opts in (backbone_opts or {}).items():
        options.setdefault(backbone, {}).update(opts)

    derived = copy.deepcopy(plans)
    derived["plans_name"] = plans_name
    target = derived["configurations"][configuration]
    if patch_size is not None:
        current = config["patch_size"]
        if len(patch_size) != len(current):
            raise NetworkConfigError(f"--patch needs {len(current)} values for {configuration!r} (now {current}), "
                                     f"got {list(patch_size)}")
        target["patch_size"] = [int(p) for p in patch_size]
        if "architecture" not in config:
            raise NetworkConfigError(f"configuration {configuration!r} has no 'architecture' (plans older than "
                                     f"nnU-Net 2.4): its topology cannot be re-planned for a new patch size")
        target["architecture"] = replan_topology(config, target["patch_size"])
    if batch_size is not None:
        if int(batch_size) < 1:
            raise NetworkConfigError(f"batch size must be >= 1, got {batch_size}")
        target["batch_size"] = int(batch_size)
    for backbone, opts in options.items():
        check_options(backbone, opts)  # unknown backbones and options raise with the valid ones
    if options:
        merged = copy.deepcopy(config.get(OPTIONS_KEY, {}))
        for backbone, opts in options.items():
            merged.setdefault(backbone, {}).update(opts)
        target[OPTIONS_KEY] = merged
    return derived


# what of a configuration's ``architecture.arch_kwargs`` our backbones read: the strides and (for the anisotropy
# rule) the kernel sizes; the rest describes nnU-Net's own network, which the backbone replaces
ARCH_KWARGS_USED = ("strides", "kernel_sizes")


def network_class(config: dict) -> str:
    """The short class name of the network a configuration's plans describe (``ResidualEncoderUNet``)."""
    name = str(config.get("architecture", {}).get("network_class_name", ""))
    return name.rsplit(".", 1)[-1] or "nnU-Net's network"


def plans_use(configuration_manager, backbone: str, network, device_type: str) -> str:
    """One log line: which plans fields a backbone trains with, which it ignores, and its memory options in effect."""
    config = configuration_manager.configuration
    ignored = sorted(k for k in config.get("architecture", {}).get("arch_kwargs", {}) if k not in ARCH_KWARGS_USED)
    lean = getattr(network, "memory_lean", False)
    return (f"nnunet-lk: {backbone} replaces these plans' {network_class(config)}. It uses their patch_size "
            f"{list(configuration_manager.patch_size)}, batch_size {configuration_manager.batch_size}, "
            f"{', '.join(ARCH_KWARGS_USED)} (architecture.arch_kwargs), normalisation and resampling; it ignores "
            f"the other arch_kwargs ({', '.join(ignored) or 'none'}). Memory: memory_lean={lean!r}: lean forms "
            f"{'on' if lean_on(lean, device_type) else 'off'} ({device_type}); checkpoint_style="
            f"{getattr(network, 'checkpoint_style', 'off')!r}.")
