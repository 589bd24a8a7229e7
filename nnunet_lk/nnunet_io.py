"""The nnU-Net I/O every command shares, in one place: trainer lookup by name (nnU-Net's own, with its search
messages kept out of our output), dataset name resolution, a configuration's managers and channel counts, and
reading a checkpoint with clear errors."""
from __future__ import annotations

import contextlib
import io
import os

import torch

from .errors import CheckpointError, TrainerNotFoundError, UsageError


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


def find_trainer_class(name: str, *, not_found_hint: str = ""):
    """The trainer class nnU-Net's ``nnUNetv2_train`` / ``nnUNetv2_predict`` would use for ``name`` (its own
    ``recursive_find_trainer_class_by_name``, with our trainer folder on its path).
    ``TrainerNotFoundError`` (with ``not_found_hint``, or a generic fix) when nnU-Net cannot find it."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from . import env as lk_env
    lk_env.ensure_environment()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its search messages are not our output
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise TrainerNotFoundError(
            not_found_hint or f"nnU-Net cannot find a trainer named {name!r} (nnUNet_extTrainer="
                              f"{os.environ.get('nnUNet_extTrainer', '')!r}): check the name (`nnunet-lk list`) and "
                              f"run `nnunet-lk doctor`.") from None


def dataset_name(dataset: str) -> str:
    """``4`` / ``Dataset004_Hippocampus`` -> ``Dataset004_Hippocampus``, as nnU-Net resolves it."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise UsageError(f"dataset {dataset!r}: {e}") from None


# nnUNetv2_train --c loads the first of these that exists (nnunetv2.run.run_training.maybe_load_checkpoint).
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def checkpoint_alternatives(filename: str) -> str:
    """What to use instead of the unusable ``filename``, naming only checkpoints that exist beside it."""
    folder, name = os.path.split(os.path.abspath(filename))
    others = sorted(p for p in os.listdir(folder) if p.endswith(".pth") and p != name) if os.path.isdir(folder) else []
    if not others:
        return (f"{folder} holds no other checkpoint: move {name} aside and train this fold again (nnUNetv2_train "
                f"without --c).")
    resume = next((p for p in RESUME_ORDER if p in others), None)
    train = (f"To train on, move {name} aside: `nnUNetv2_train ... --c` then continues from {resume}." if resume
             else "`nnUNetv2_train ... --c` finds none of them to resume from: retrain the fold.")
    return (f"Other checkpoints in {folder}: {', '.join(others)}. To predict, choose one with -chk (e.g. -chk "
            f"{resume or others[0]}). {train}")


def read_checkpoint(filename: str) -> dict:
    """Load an nnU-Net checkpoint, turning truncated or foreign files into a clear error."""
    try:
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zip archives
        raise CheckpointError(
            f"{filename} cannot be read ({type(e).__name__}: {e}). It is truncated or not a torch file. "
            f"{checkpoint_alternatives(filename)}") from e
    missing = [k for k in ("network_weights", "init_args", "trainer_name", "current_epoch")
               if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{filename} is not an nnU-Net checkpoint (missing {missing}); give the "
                              f"checkpoint_final.pth of an nnU-Net training. {checkpoint_alternatives(filename)}")
    return checkpoint
