"""A trained fold read as ``nnUNetv2_predict`` reads it: the checkpoint (``read_checkpoint``: clear errors for
truncated or foreign files), the trainer class it names (nnU-Net's own lookup), and the network built
statically with deep supervision off, loaded strictly and put in inference form (``.eval()``: re-parameterised
blocks fused). Used by the ONNX export and ``predict-onnx``."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch.nn as nn

from .errors import CheckpointError, ExportError, TrainerNotFoundError
from .checkpoints import read_checkpoint


@dataclass
class LoadedFold:
    network: nn.Module
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    configuration: str
    trainer_name: str
    checkpoint_path: str
    num_input_channels: int
    num_output_channels: int
    inference_allowed_mirroring_axes: Optional[Tuple[int, ...]]


def checkpoint_trainer_class(trainer_name: str, checkpoint_path: str):
    """The class nnU-Net builds the fold's network with: the one the checkpoint names (nnU-Net's own lookup)."""
    from .hints import checkpoint_trainer_hint
    from .nnunet_io import find_trainer_class as lookup
    try:
        cls = lookup(trainer_name, not_found_hint=checkpoint_trainer_hint(trainer_name, checkpoint_path))
    except TrainerNotFoundError as e:
        raise ExportError(str(e)) from None
    except AssertionError:  # found, but not an nnUNetTrainer
        raise ExportError(f"{checkpoint_path} names the trainer {trainer_name!r}, not an nnUNetTrainer") from None
    return cls


@contextlib.contextmanager
def nnunet_compile(enabled: bool) -> Iterator[None]:
    """nnU-Net's predictor compiles its network when ``nnUNet_compile`` is true: set it for the duration (while
    the predictor is initialised) and restore what was there."""
    previous = os.environ.get("nnUNet_compile")
    os.environ["nnUNet_compile"] = "t" if enabled else "f"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_compile", None)
        else:
            os.environ["nnUNet_compile"] = previous


def fold_folder(results_folder: str, fold) -> str:
    return os.path.join(results_folder, f"fold_{fold}")


def load_fold(results_folder: str, fold, checkpoint_name: str = "checkpoint_final.pth") -> LoadedFold:
    """The fold's network in inference form, built and loaded as ``nnUNetv2_predict`` builds it."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(results_folder, name)):
            raise ExportError(f"{results_folder} has no {name}: give an nnU-Net model folder "
                              f"(nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION)")
    path = os.path.join(fold_folder(results_folder, fold), checkpoint_name)
    if not os.path.isfile(path):
        available = sorted(d for d in os.listdir(results_folder) if d.startswith("fold_"))
        present = sorted(p for p in os.listdir(os.path.dirname(path)) if p.endswith(".pth")) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise ExportError(f"{path} does not exist (folds here: {', '.join(available) or 'none'}; checkpoints in "
                          f"fold_{fold}: {', '.join(present) or 'none'}); choose --fold and -chk accordingly")
    checkpoint = read_checkpoint(path)
    with open(os.path.join(results_folder, "plans.json")) as f:
        plans_manager = PlansManager(json.load(f))
    with open(os.path.join(results_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    configuration = checkpoint["init_args"]["configuration"]
    configuration_manager = plans_manager.get_configuration(configuration)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    trainer_class = checkpoint_trainer_class(checkpoint["trainer_name"], path)
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                       enable_deep_supervision=False)
    try:
        network.load_state_dict(checkpoint["network_weights"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the network {checkpoint['trainer_name']} builds from "
                              f"{results_folder}/plans.json ({str(e).splitlines()[0]}). Was the checkpoint copied "
                              f"from another model folder?") from None
    network.eval()  # inference form: ReparamDepthwise fuses here
    mirror = checkpoint.get("inference_allowed_mirroring_axes")
    return LoadedFold(network, plans_manager, configuration_manager, dataset_json, configuration,
                      checkpoint["trainer_name"], path, n_in, n_out, tuple(mirror) if mirror is not None else None)
