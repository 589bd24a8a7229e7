"""Where nnU-Net keeps a trainer's results and what its files say: fold folders, validation summaries,
training logs (a resumed fold has several; later ones win per epoch) and the checkpoint's ``logging`` dict."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..checkpoints import RESUME_ORDER
from ..nnunet_io import STOCK_BUDGET_TRAINER, STOCK_TRAINER


ALL_FOLDS = (0, 1, 2, 3, 4)


EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")


EPOCH_TIME = re.compile(r"Epoch time: ([0-9.eE+-]+) s")


TRAIN_LOSS = re.compile(r"train_loss (-?[0-9.eE+-]+|nan)")


VAL_LOSS = re.compile(r"val_loss (-?[0-9.eE+-]+|nan)")


PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*)\]")


# repeat k > 0 of a training lives in an nnU-Net results folder of its own under nnUNet_results (nnU-Net names a
# training's folder by trainer, plans and configuration only); repeat 0 is nnU-Net's usual folder
REPEATS_FOLDER = "nnunet_lk_repeats"


def repeat_root(results_root, repeat: int) -> Path:
    """The nnU-Net results folder (what nnUNet_results points to) of repeat ``repeat``."""
    if repeat < 0:
        raise ValueError(f"repeat must be >= 0, got {repeat}")
    return Path(results_root) if repeat == 0 else Path(results_root) / REPEATS_FOLDER / f"repeat_{repeat}"


def repeat_seeds(repeats: int, seed: Optional[int]) -> List[Optional[int]]:
    """The seed of each repeat: ``seed + k``; with one repeat and no seed, unseeded (nnU-Net's behaviour); with
    several and no seed, from 0."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if seed is None and repeats == 1:
        return [None]
    return [(seed or 0) + k for k in range(repeats)]


class FoldJobLabels:
    """``key`` and ``label`` of a job record naming (trainer, configuration, fold, repeat) and an action."""

    @property
    def key(self) -> str:
        repeat = getattr(self, "repeat", 0)
        return f"{self.trainer}__{self.configuration}__fold{self.fold}" + (f"__repeat{repeat}" if repeat else "")

    @property
    def label(self) -> str:
        repeat = getattr(self, "repeat", 0)
        return f"{self.action} {self.trainer} {self.configuration} fold {self.fold}" + (
            f" repeat {repeat}" if repeat else "")

    @property
    def log_name(self) -> str:
        repeat = getattr(self, "repeat", 0)
        return f"run_{self.trainer}_fold{self.fold}" + (f"_repeat{repeat}" if repeat else "") + ".log"


@dataclass
class FoldRun:
    trainer: str
    fold: int
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / "checkpoint_final.pth").is_file()

    @property
    def validated(self) -> bool:
        return (self.path / "validation" / "summary.json").is_file()

    @property
    def resumable(self) -> bool:
        return any((self.path / f).is_file() for f in RESUME_ORDER[1:])  # a final one means complete


def recorded_seed(fold_path: Path) -> Optional[int]:
    """The seed a fold trained with, from nnU-Net's debug.json (it records the trainer's attributes; our run
    settings set ``nnunet_lk_seed``); None when unseeded or not recorded."""
    try:
        value = json.loads((Path(fold_path) / "debug.json").read_text()).get("nnunet_lk_seed")
        return int(value)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def model_folder(results_root, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    return Path(results_root) / dataset / f"{trainer}__{plans}__{configuration}"


def discover_trainers(results_root, dataset: str, plans: str, configuration: str) -> List[str]:
    folder = Path(results_root) / dataset
    suffix = f"__{plans}__{configuration}"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(suffix)] for p in folder.iterdir() if p.is_dir() and p.name.endswith(suffix))


def default_baseline(trainers: Sequence[str]) -> Optional[str]:
    for name in (STOCK_TRAINER, STOCK_BUDGET_TRAINER):
        if name in trainers:
            return name
    return None


def label_names(dataset_json: dict) -> Dict[str, str]:
    """summary.json class key ("1", "(1, 2)") -> name from dataset.json's labels."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            key = str(tuple(int(v) for v in value)) if len(value) > 1 else str(int(value[0]))
        else:
            key = str(int(value))
        names[key] = name
    return names


def read_validation_summary(fold: FoldRun, file_ending: str) -> Dict[str, Dict[str, float]]:
    """case -> {class key: Dice} from nnU-Net's fold_F/validation/summary.json."""
    summary = json.loads((fold.path / "validation" / "summary.json").read_text())
    per_case = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["prediction_file"])
        case = case[:-len(file_ending)] if case.endswith(file_ending) else case
        per_case[case] = {str(k): _float(v.get("Dice")) for k, v in entry["metrics"].items()}
    return per_case


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_training_logs(fold_path: Path) -> Dict[int, dict]:
    """epoch -> {epoch_time, train_loss, val_loss, pseudo_dice} from nnU-Net's logs (later logs win)."""
    epochs: Dict[int, dict] = {}
    for log in sorted(Path(fold_path).glob("training_log_*.txt")):
        current = None
        for line in log.read_text(errors="replace").splitlines():
            m = EPOCH_LINE.search(line)
            if m:
                current = int(m.group(1))
                epochs[current] = {}
                continue
            if current is None:
                continue
            for name, pattern in (("epoch_time", EPOCH_TIME), ("train_loss", TRAIN_LOSS), ("val_loss", VAL_LOSS)):
                m = pattern.search(line)
                if m:
                    epochs[current][name] = _float(m.group(1))
            m = PSEUDO_DICE.search(line)
            if m:
                values = [_float(v.strip().replace("np.float32(", "").replace("np.float64(", "").rstrip(")"))
                          for v in m.group(1).split(",") if v.strip()]
                epochs[current]["pseudo_dice"] = float(np.nanmean(values)) if values else math.nan
    return {e: v for e, v in epochs.items() if v}


def checkpoint_curves(fold_path: Path) -> Dict[int, dict]:
    """The same from the checkpoint's 'logging' dict, for folds whose logs are gone."""
    for name in RESUME_ORDER:
        f = Path(fold_path) / name
        if f.is_file():
            import torch
            try:
                logging = torch.load(f, map_location="cpu", weights_only=False).get("logging", {})
            except Exception:
                continue
            n = len(logging.get("train_losses", []))
            out = {}
            for e in range(n):
                entry = {"train_loss": _float(logging["train_losses"][e])}
                for key, src in (("val_loss", "val_losses"), ("pseudo_dice", "mean_fg_dice")):
                    if e < len(logging.get(src, [])):
                        entry[key] = _float(logging[src][e])
                starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
                if e < len(starts) and e < len(ends):
                    entry["epoch_time"] = float(ends[e] - starts[e])
                out[e] = entry
            return out
    return {}
