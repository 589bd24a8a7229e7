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
        _install_trainer_hint()
    except Exception:  # never break interpreter start-up
        pass


_NOT_FOUND = "Could not find requested nnunet trainer"


def trainer_not_found_hint(message: str) -> str:
    """What to tell a user whose -tr NAME nnU-Net could not find: close nnunet-lk names, and the fix."""
    import difflib
    import re
    match = re.search(rf"{_NOT_FOUND} (\S+)", message)
    requested = match.group(1) if match else ""
    from .training.trainers import all_trainers
    names = sorted(all_trainers())
    close = difflib.get_close_matches(requested, names, n=3, cutoff=0.6)
    lines = [f"nnunet-lk: nnU-Net found no trainer named {requested!r}."]
    if close:
        lines.append(f"  Did you mean {', '.join(close)}?")
    lines.append("  `nnunet-lk list` shows every nnunet-lk trainer; `nnunet-lk doctor` checks that nnU-Net finds them")
    lines.append("  (if it does not: `nnunet-lk env --install` once, or `eval \"$(nnunet-lk env)\"` in this shell).")
    return "\n".join(lines)


def _install_trainer_hint() -> None:
    """Add our hint under nnU-Net's own "trainer not found" traceback (stock CLIs included)."""
    import sys
    previous = sys.excepthook
    if getattr(previous, "nnunet_lk_hint", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if isinstance(exc, RuntimeError) and str(exc).startswith(_NOT_FOUND):
            try:
                print(trainer_not_found_hint(str(exc)), file=sys.stderr)
            except Exception:
                pass

    hook.nnunet_lk_hint = True
    sys.excepthook = hook


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
