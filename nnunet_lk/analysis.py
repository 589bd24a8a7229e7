"""Measuring networks: parameters and MACs (torch's own FLOP counter)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .networks import build_backbone
from .networks.unet import count_parameters


def count_macs(network: torch.nn.Module, input_shape) -> int:
    """Multiply-accumulates of one forward pass in eval mode: FlopCounterMode's FLOPs / 2 (it counts
    convolutions, transposed convolutions, matmuls and attention)."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(torch.zeros(input_shape))
    finally:
        network.train(was_training)
    return int(counter.get_total_flops() // 2)


def summarize_network(name: str, *, dim: int, input_channels: int, num_classes: int, patch_size, strides=None,
                      deep_supervision: bool = False, **overrides) -> dict:
    if len(patch_size) != dim:
        raise ValueError(f"--patch needs {dim} values for a {dim}D network, got {list(patch_size)}")
    network = build_backbone(name, dim=dim, input_channels=input_channels, num_classes=num_classes,
                             strides=strides, patch_size=patch_size, deep_supervision=deep_supervision, **overrides)
    return {
        "name": name,
        "dim": dim,
        "input_channels": input_channels,
        "num_classes": num_classes,
        "patch_size": list(patch_size),
        "level_strides": [list(s) for s in network.level_strides],
        "options": overrides,
        "params": count_parameters(network),
        "params_without_ds_heads": count_parameters(network, deep_supervision_heads=False),
        "macs": count_macs(network, (1, input_channels, *patch_size)),
    }


def default_device() -> str:
    """``cuda`` where torch sees a GPU, else ``cpu`` (the default of --device in bench and ablate)."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
