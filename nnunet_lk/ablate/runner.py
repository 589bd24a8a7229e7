"""What ``--run`` checks before it trains (nnU-Net can find every trainer; stock nnUNetTrainer ignores a short
budget), what it shows of nnUNetv2_train's output, and nnU-Net's model selection afterwards
(nnUNetv2_find_best_configuration). The jobs themselves: :mod:`.jobs`; where they run: :mod:`.executors`."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

from ..nnunet_io import STOCK_BUDGET_TRAINER, STOCK_TRAINER, dataset_name, default_trainers
from ..process_group import run_streaming
from .jobs import cli_path
from .results import ALL_FOLDS, FoldRun, model_folder


# progress worth showing while nnUNetv2_train runs: nnU-Net's per-epoch lines and anything that looks like an error
PROGRESS_LINE = re.compile(r"Epoch \d+|Epoch time|Pseudo dice|Error|Traceback|mean Validation Dice")


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
    cmd = [cli_path("nnUNetv2_find_best_configuration"), str(dataset), "-c", configuration, "-tr", *full, "-p", plans]
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
