"""Optional dependencies that only one command needs, installed as pip extras (setup.cfg):
``export`` (onnx, onnxruntime, onnxscript: `nnunet-lk export` / `predict-onnx` / `predict --engine onnxruntime`),
``openvino`` (`predict --engine openvino`), ``metrics`` (monai: HD95 and NSD in `nnunet-lk ablate`), ``slurm``
(submitit: `ablate --run --executor slurm`). ``test`` installs them all."""
from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

EXTRAS = {
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "metrics": ("monai",),
    "openvino": ("openvino",),
    "slurm": ("submitit",),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that cannot import it, or a broken __spec__
        return False


def require_extra(extra: str, purpose: str) -> None:
    """Raise ``MissingExtraError`` naming the pip extra if a module of ``extra`` is not installed."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, which is not installed: "
                                f"pip install 'nnunet-lk[{extra}]' (or the packages themselves)")
