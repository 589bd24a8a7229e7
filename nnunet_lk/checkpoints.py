"""nnU-Net checkpoints read with clear errors: a truncated or foreign file names itself and the checkpoints
beside it that can be used instead, in the order ``nnUNetv2_train --c`` resumes from."""
from __future__ import annotations

import os

from .errors import CheckpointError

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
    import torch
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


def checkpoint_stamp(path: str) -> dict:
    """What identifies a checkpoint file's contents cheaply: size and modification time (and where it was)."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def same_checkpoint(a: dict, b: dict) -> bool:
    """Two stamps name the same checkpoint file contents (wherever the model folder has moved)."""
    return {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
