"""Making nnU-Net find our trainers: the nnUNet_extTrainer folder, and the ``.pth`` hook that runs
``nnunet_lk.startup`` at interpreter start-up so that no shell set-up line is needed. This module only sets
variables; what else start-up does lives in ``startup.py``."""
from __future__ import annotations

import importlib.util
import os
import site
import sysconfig

ENV_VAR = "nnUNet_extTrainer"
PTH_NAME = "nnunet_lk_ext_trainer.pth"
# The .pth line Python runs at every start-up. Guarded: once the package is uninstalled (pip leaves this file
# behind, it is not in the package's RECORD) it does nothing instead of printing an import error each time.
HOOK_LINE = ("import importlib.util as _u; _u.find_spec('nnunet_lk') is not None and "
             "__import__('nnunet_lk.startup').startup.start()\n")


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
    """Put our trainer folder on nnUNet_extTrainer (what older start-up hooks call; doctor reports them)."""
    try:
        os.environ[ENV_VAR] = with_trainer_folder(os.environ.get(ENV_VAR))
    except Exception:  # never break interpreter start-up
        pass


def shell_lines() -> str:
    return f"export {ENV_VAR}=\"{with_trainer_folder(os.environ.get(ENV_VAR))}\""


def site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def pth_path() -> str:
    return os.path.join(site_packages(), PTH_NAME)


def install_pth() -> str:
    """Write the start-up hook into this environment's site-packages (replacing an older one); returns its path."""
    path = pth_path()
    with open(path, "w") as f:
        f.write(HOOK_LINE)
    return path


def _site_dirs():
    return list(dict.fromkeys([site_packages(), *site.getsitepackages()]))


def hook_files():
    """Every .pth file of this environment that runs our hook: ours by name, and any other naming nnunet_lk.env."""
    found = []
    for folder in _site_dirs():
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".pth") and os.path.isfile(path):
                with open(path, errors="replace") as f:
                    text = f.read()
                if name == PTH_NAME or "nnunet_lk.env" in text:
                    found.append((path, text))
    return found


def hook_problems():
    """What is wrong with the installed hook, each with its fix (empty: none or exactly one current hook)."""
    files = hook_files()
    problems = []
    if len(files) > 1:
        problems.append((f"{len(files)} start-up hooks: {', '.join(p for p, _ in files)}",
                         "run `nnunet-lk env --uninstall`, then `nnunet-lk env --install` once"))
    for path, text in files:
        if text != HOOK_LINE:
            problems.append((f"stale start-up hook {path} (an older form, e.g. unguarded)",
                             "run `nnunet-lk env --install` to rewrite it"))
    return problems


def uninstall_pth():
    """Remove every start-up hook of ours from this environment; returns the removed paths."""
    removed = []
    for path, _ in hook_files():
        os.remove(path)
        removed.append(path)
    return removed


def pth_installed() -> bool:
    return bool(hook_files())
