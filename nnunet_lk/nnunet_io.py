"""The nnU-Net lookups every command shares, in one place: trainers by name (ours, the stock ones, then
nnU-Net's own lookup with its search messages kept out of our output), the default trainer of each backbone,
dataset names and a dataset's plans, and the case files of an input folder. Checkpoints: ``checkpoints.py``; a
configuration's managers and channel counts: ``plans.plans_context``."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

from .errors import TrainerNotFoundError, UsageError

STOCK_TRAINER = "nnUNetTrainer"
STOCK_BUDGET_TRAINER = "nnUNetTrainerStockBudget"  # stock nnU-Net on our budget variables (training/stock.py)
STOCK_TRAINERS = (STOCK_TRAINER, STOCK_BUDGET_TRAINER)


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


def default_trainers() -> List[str]:
    """One trainer per registered backbone: the plain one (default sigmoid loss schedule, no suffix)."""
    from .training.trainers import all_trainers
    by_backbone: Dict[str, List[str]] = {}
    for name, cls in all_trainers().items():
        by_backbone.setdefault(cls.backbone, []).append(name)
    chosen = []
    for backbone, names in sorted(by_backbone.items()):
        plain = [n for n in names if "_" not in n] or names
        chosen.append(min(plain, key=len))
    return chosen


def resolve_trainer(name: str):
    """Trainer class by name: ours, our stock-budget trainer, stock nnU-Net's, then nnU-Net's own lookup."""
    from .training.trainers import all_trainers
    ours = all_trainers()
    if name in ours:
        return ours[name]
    if name == STOCK_TRAINER:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    if name == STOCK_BUDGET_TRAINER:
        from .training.stock import nnUNetTrainerStockBudget
        return nnUNetTrainerStockBudget
    return find_trainer_class(name, not_found_hint=f"unknown trainer {name!r}: not an nnunet-lk trainer "
                                                   f"(`nnunet-lk list`) and nnU-Net cannot find it")


def load_plans(dataset: str, plans_name: str = "nnUNetPlans"):
    """(plans, dataset_json, dataset folder name) from $nnUNet_preprocessed/DatasetXXX/."""
    from nnunetv2.paths import nnUNet_preprocessed
    if not nnUNet_preprocessed:
        raise UsageError("nnUNet_preprocessed is not set; export it to nnU-Net's preprocessed folder")
    name = dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    plans_file, dataset_file = folder / f"{plans_name}.json", folder / "dataset.json"
    for f in (plans_file, dataset_file):
        if not f.is_file():
            raise UsageError(f"{f} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first "
                             f"(or name existing plans with -p)")
    return json.loads(plans_file.read_text()), json.loads(dataset_file.read_text()), name


def channel_files(folder: str, file_ending: str) -> Dict[str, List[Tuple[int, str]]]:
    """case id -> [(channel index, path)] in channel order, from nnU-Net's CASE_XXXX<file_ending> file names."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: Dict[str, List[Tuple[int, str]]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            cases.setdefault(match.group(1), []).append((int(match.group(2)), os.path.join(folder, name)))
    return {case: sorted(files) for case, files in sorted(cases.items())}


def cases_in_folder(folder: str, file_ending: str) -> Dict[str, List[str]]:
    """case id -> its channel files, in channel order, as nnU-Net groups them."""
    return {case: [path for _, path in files] for case, files in channel_files(folder, file_ending).items()}
