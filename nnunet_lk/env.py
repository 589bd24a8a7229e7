"""Making nnU-Net find our trainers: the nnUNet_extTrainer folder, and a ``.pth`` hook that adds it
to the environment at interpreter start-up so that no shell set-up line is needed."""
from __future__ import annotations

import importlib.util
import os
import site
import sysconfig

ENV_VAR = "nnUNet_extTrainer"
PTH_NAME = "nnunet_lk_ext_trainer.pth"


def trainer_folder() -> str:
    """The installed folder holding the module nnU-Net's lookup scans (the repo's ``trainers/``)."""
    spec = importlib.util.find_spec("nnunet_lk_ext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package nnunet_lk_ext is not installed; reinstall nnunet-lk (pip install .)")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def with_trainer_folder(value: str | None) -> str:
    """``value`` (an os.pathsep list, possibly empty) with our folder appended once."""
    folder = trainer_folder()
    entries = [p for p in (value or "").split(os.pathsep) if p]
    if folder not in entries:
        entries.append(folder)
    return os.pathsep.join(entries)


def ensure_environment() -> None:
    """Called at start-up by the .pth hook (and by our own commands)."""
    try:
        os.environ[ENV_VAR] = with_trainer_folder(os.environ.get(ENV_VAR))
        from .hints import install_excepthook
        install_excepthook()
    except Exception:  # never break interpreter start-up
        pass


def shell_lines() -> str:
    return f"export {ENV_VAR}=\"{with_trainer_folder(os.environ.get(ENV_VAR))}\""


def site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def pth_path() -> str:
    return os.path.join(site_packages(), PTH_NAME)


def install_pth() -> str:
    """Write the start-up hook into this environment's site-packages; returns its path."""
    path = pth_path()
    with open(path, "w") as f:
        f.write("import nnunet_lk.env as _e; _e.ensure_environment()\n")
    return path


def pth_installed() -> bool:
    return os.path.isfile(pth_path()) or any(
        os.path.isfile(os.path.join(d, PTH_NAME)) for d in site.getsitepackages())
