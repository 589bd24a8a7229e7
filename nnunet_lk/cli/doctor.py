"""``nnunet-lk doctor``: is the plugin installed so that the stock nnU-Net CLIs find every trainer? The exit
status reflects the installation only; nnU-Net's data folders, unset right after installing, are warnings."""
from __future__ import annotations

import os

from .. import env as lk_env

SUPPORTED = ((2, 8), (2, 9))  # nnunetv2 >= 2.8 (first with nnUNet_extTrainer), < 2.9


def run_doctor(verbose: bool = False) -> int:
    problems = []

    def check(ok: bool, what: str, fix: str = ""):
        print(f"[{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            problems.append(fix)
            print(f"       fix: {fix}")

    try:
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
        parts = tuple(int(p) for p in nnunet_version.split(".")[:2])
        check(SUPPORTED[0] <= parts < SUPPORTED[1], f"nnunetv2 {nnunet_version}",
              "pip install 'nnunetv2>=2.8.1,<2.9'")
    except Exception as e:  # not installed
        check(False, f"nnunetv2 importable ({e})", "pip install 'nnunetv2>=2.8.1,<2.9'")
        return 1

    folder = lk_env.trainer_folder()
    entries = [p for p in os.environ.get(lk_env.ENV_VAR, "").split(os.pathsep) if p]
    check(folder in entries, f"{lk_env.ENV_VAR} contains {folder}",
          "run `nnunet-lk env --install` once (or `eval \"$(nnunet-lk env)\"` in each shell)")
    check(lk_env.pth_installed(), "start-up hook installed (no shell set-up needed)",
          "run `nnunet-lk env --install` once in this environment")
    for problem, fix in lk_env.hook_problems():
        check(False, problem, fix)
    warnings = data_folder_warnings()
    print(thread_line())

    from ..nnunet_io import find_trainer_class
    from ..training.trainers import all_trainers
    for name, cls in sorted(all_trainers().items()):
        found = None
        try:
            found = find_trainer_class(name)
            ok = found is not None and found.__name__ == name and found.backbone == cls.backbone
            check(ok, f"nnU-Net finds {name}", "`nnunet-lk env --install`, then `nnunet-lk doctor` again")
        except Exception as e:  # any failure of the lookup is what doctor reports
            check(False, f"nnU-Net finds {name} ({type(e).__name__}: {str(e)[:200]})",
                  "run `nnunet-lk env --install`, then `nnunet-lk doctor` again")
        if verbose:
            print(f"       {name} -> {found.__module__ if found is not None else 'not found'}")
    notes = f" ({len(warnings)} warning(s): data folders, needed before planning, training and predicting)" \
        if warnings else ""
    print(("the installation is good" if not problems else f"{len(problems)} installation problem(s) found") + notes)
    return 0 if not problems else 1


def data_folder_warnings() -> list:
    """nnU-Net's three data folders: unset is normal right after installing, so a warning, not a failure."""
    warnings = []
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(var)
        if value and os.path.isdir(value):
            print(f"[ok] {var}={value}")
            continue
        problem = f"{var} is not set" if not value else f"{var}={value} is not a folder (yet)"
        warnings.append(problem)
        print(f"[warn] {problem}")
        print(f"       set it before using nnU-Net: export {var}=/path/to/{var}"
              + (f" (or create it: mkdir -p {value})" if value else ""))
    return warnings


def thread_line() -> str:
    """What torch's thread count will be for nnunet-lk trainers under the stock commands on a CPU."""
    import multiprocessing
    from .. import settings
    cores = multiprocessing.cpu_count()  # what nnUNetv2_predict/-train -device cpu set
    if settings.threads() is not None:
        return (f"[info] torch threads of nnunet-lk trainers with -device cpu: {settings.threads()} in training "
                f"and prediction ({settings.THREADS}={settings.threads()})")
    return (f"[info] torch threads of nnunet-lk trainers with -device cpu: {settings.cpu_threads(cores, False)} in "
            f"training (the usable cores; nnU-Net sets {cores}), {settings.cpu_threads(cores, True)} in prediction now (the cores idle at its "
            f"start, of {settings.usable_cores()} usable); set {settings.THREADS}=N to fix both")
