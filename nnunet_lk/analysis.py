"""Measuring networks: parameters and MACs (torch's own FLOP counter)."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import UsageError
from .networks import build_backbone, get_backbone
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


class PaperConfiguration(NamedTuple):
    dim: int
    input_channels: int
    num_classes: int
    patch_size: Tuple[int, ...]


# Each backbone's configuration in its paper and official code (README's Backbones table): where the
# official parameter counts are reproduced (tests/test_dlkunet.py, test_lgmsnet.py, test_lmnet.py, test_mslkseg.py)
# and what `nnunet-lk summary NAME` shows without flags (the first entry; `--dim 3` picks a 3D one). Kept here,
# not in the backbone registrations, because the registry's BackboneSpec has no field for it.
PAPER_CONFIGURATIONS: Dict[str, List[PaperConfiguration]] = {
    "dlkunet_s": [PaperConfiguration(2, 1, 9, (224, 224))],
    "dlkunet_m": [PaperConfiguration(2, 1, 9, (224, 224))],
    "dlkunet_l": [PaperConfiguration(2, 1, 9, (224, 224))],
    "lgmsnet": [PaperConfiguration(2, 3, 1, (256, 256)), PaperConfiguration(3, 1, 14, (96, 96, 96))],
    "lmnet": [PaperConfiguration(2, 3, 2, (256, 256))],
    "mslkseg": [PaperConfiguration(2, 3, 1, (256, 256))],
}


def summary_configuration(name: str, dim: Optional[int] = None, input_channels: Optional[int] = None,
                          num_classes: Optional[int] = None, patch_size=None) -> dict:
    """The arguments of ``summarize_network``: the paper's configuration for ``name`` (in ``dim`` if given),
    with every value given explicitly taken instead."""
    get_backbone(name)  # unknown names: the list of known ones
    papers = [c for c in PAPER_CONFIGURATIONS.get(name, []) if dim is None or c.dim == dim]
    paper = papers[0] if papers else None
    given = {"dim": dim, "input_channels": input_channels, "num_classes": num_classes,
             "patch_size": list(patch_size) if patch_size is not None else None}
    if paper is None:
        missing = [flag for flag, key in (("--dim", "dim"), ("--in-channels", "input_channels"),
                                          ("--classes", "num_classes"), ("--patch", "patch_size"))
                   if given[key] is None]
        if missing:
            known = ", ".join(f"{c.dim}D" for c in PAPER_CONFIGURATIONS.get(name, [])) or "none"
            raise UsageError(f"{name} has no paper configuration{f' in {dim}D' if dim else ''} (known: {known}); "
                             f"give {' '.join(missing)}")
        return given
    defaults = {"dim": paper.dim, "input_channels": paper.input_channels, "num_classes": paper.num_classes,
                "patch_size": list(paper.patch_size)}
    return {key: given[key] if given[key] is not None else defaults[key] for key in defaults}


def summarize_network(name: str, *, dim: int, input_channels: int, num_classes: int, patch_size, strides=None,
                      deep_supervision: bool = False, **overrides) -> dict:
    if len(patch_size) != dim:
        raise UsageError(f"--patch needs {dim} values for a {dim}D network, got {list(patch_size)}")
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
