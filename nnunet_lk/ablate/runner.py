"""``--run``: train, resume or validate the missing (trainer, fold) pairs through the stock nnUNetv2_train, each
in its own process group, then nnU-Net's model selection (nnUNetv2_find_best_configuration)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ..nnunet_io import STOCK_BUDGET_TRAINER, STOCK_TRAINER, dataset_name, default_trainers
from .. import settings
from ..process_group import run_streaming
from .results import ALL_FOLDS, FoldRun, model_folder


# progress worth showing while nnUNetv2_train runs: nnU-Net's per-epoch lines and anything that looks like an error
PROGRESS_LINE = re.compile(r"Epoch \d+|Epoch time|Pseudo dice|Error|Traceback|mean Validation Dice")


def plan_runs(results_root, dataset: str, configuration: str, plans: str, trainers: Sequence[str],
              folds: Sequence[int]) -> List[dict]:
    """What ``--run`` must do per (trainer, fold): skip (validated), validate only, resume, or train."""
    name = dataset_name(dataset)
    todo = []
    for t in trainers:
        for f in folds:
            run = FoldRun(t, f, model_folder(results_root, name, t, plans, configuration) / f"fold_{f}")
            action = fold_action(run)
            if action is not None:
                todo.append({"trainer": t, "fold": f, "action": action, "path": run.path})
    return todo


def fold_action(run: FoldRun) -> Optional[str]:
    """None (trained and validated), ``validate``, ``resume`` (a checkpoint to continue from) or ``train``."""
    if run.complete and run.validated:
        return None
    return "validate" if run.complete else "resume" if run.resumable else "train"


def budget_env(epochs: Optional[int], iterations: Optional[int], val_iterations: Optional[int]) -> dict:
    """The training budget as the environment variables our trainers (and nnUNetTrainerStockBudget) read."""
    return settings.budget_env(epochs, iterations, val_iterations)


def train_command(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                  action: str) -> List[str]:
    cmd = [_cli("nnUNetv2_train"), str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans,
           "-device", device, "--npz"]
    if action == "resume":
        cmd.append("--c")
    elif action == "validate":
        cmd.append("--val")
    return cmd


def _cli(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def check_trainers_findable(trainers: Sequence[str]) -> None:
    """nnUNetv2_train looks trainers up itself: fail before hours of training if it cannot find one."""
    from ..nnunet_io import find_trainer_class
    for t in trainers:
        hint = (" It lives in nnunet_lk/training/stock.py and must be re-exported by trainers/ "
                "(nnunet_lk_ext) for nnU-Net to find it." if t == STOCK_BUDGET_TRAINER else "")
        find_trainer_class(t, not_found_hint=f"nnUNetv2_train cannot find trainer {t!r} (nnUNet_extTrainer="
                                             f"{os.environ.get('nnUNet_extTrainer', '')!r}); run `nnunet-lk doctor`."
                                             f"{hint}")


def warn_full_schedule(trainers: Sequence[str], epochs: Optional[int], iterations: Optional[int], log=print) -> None:
    if STOCK_TRAINER in set(trainers) and (epochs or iterations):
        log(f"warning: {STOCK_TRAINER} ignores --epochs/--iterations and trains nnU-Net's full schedule; for the "
            f"same budget use {STOCK_BUDGET_TRAINER}")


def run_missing(dataset: str, configuration: str, plans: str, trainers: Sequence[str], folds: Sequence[int], *,
                epochs: Optional[int], iterations: Optional[int], val_iterations: Optional[int], device: str,
                results_root, log=print, log_dir: Optional[Path] = None) -> List[dict]:
    """Train/resume/validate the missing (trainer, fold) pairs one after the other with nnUNetv2_train.
    A failed pair is reported and the next one runs; returns one record per pair."""
    todo = plan_runs(results_root, dataset, configuration, plans, trainers, folds)
    if not todo:
        log("--run: every (trainer, fold) pair is already trained and validated")
        return []
    check_trainers_findable(sorted({t["trainer"] for t in todo}))
    warn_full_schedule([t["trainer"] for t in todo], epochs, iterations, log)
    env = {**os.environ, **budget_env(epochs, iterations, val_iterations)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    done = []
    for i, item in enumerate(todo, 1):
        cmd = train_command(dataset, configuration, item["fold"], item["trainer"], plans, device, item["action"])
        log(f"[{i}/{len(todo)}] {item['action']} {item['trainer']} fold {item['fold']}: {' '.join(cmd)}")
        start = time.time()
        log_path = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log_path = Path(log_dir) / f"run_{item['trainer']}_fold{item['fold']}.log"
        with open(log_path, "a") if log_path else contextlib.nullcontext() as log_file:
            def on_line(line, log_file=log_file):
                if log_file:
                    log_file.write(line)
                if PROGRESS_LINE.search(line):
                    log(f"    {line.rstrip()}")
            # its own process group: Ctrl-C or a failure here never leaves nnU-Net's workers running
            rc = run_streaming(cmd, env=env, on_line=on_line)
        item = {**item, "returncode": rc, "seconds": round(time.time() - start, 1), "path": str(item["path"]),
                "log": str(log_path) if log_path else None}
        log(f"    -> exit {rc} after {item['seconds']:.0f} s")
        done.append(item)
    return done


def find_best_configuration(dataset: str, configuration: str, plans: str, trainers: Sequence[str], results_root,
                            log=print) -> Optional[dict]:
    """nnUNetv2_find_best_configuration over the trainers with all five folds validated."""
    name = dataset_name(dataset)
    full = [t for t in trainers if all(FoldRun(t, f, model_folder(results_root, name, t, plans, configuration)
                                               / f"fold_{f}").validated for f in ALL_FOLDS)]
    if not full:
        return None
    npz = all(any((model_folder(results_root, name, t, plans, configuration) / f"fold_{f}" / "validation").glob("*.npz"))
              for t in full for f in ALL_FOLDS)
    cmd = [_cli("nnUNetv2_find_best_configuration"), str(dataset), "-c", configuration, "-tr", *full, "-p", plans]
    if not npz:
        cmd.append("--disable_ensembling")  # ensembling needs the softmax .npz files (train with --npz)
    log(f"running {' '.join(cmd)}")
    output = []
    returncode = run_streaming(cmd, on_line=output.append)
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), "trainers": full,
            "returncode": returncode, "output": "".join(output)[-8000:]}


def default_run_trainers() -> List[str]:
    """What ``--run`` trains without --trainers: stock nnU-Net on the same budget, then one trainer per backbone."""
    return [STOCK_BUDGET_TRAINER] + default_trainers()
