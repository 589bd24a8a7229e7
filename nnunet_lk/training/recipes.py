"""Training recipes: the optimiser and learning-rate schedule a backbone's paper or official code trains
with, as data, and the learning rate as a pure function of the epoch over the run's length (progress, as the loss schedules
use), so a 1000-epoch nnU-Net run and a 5-epoch test follow the same curve.

``nnunet`` is nnU-Net's own recipe (SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly decay):
our plain trainers keep it. ``paper`` recipes are what each backbone's sources train with, as far as
nnU-Net allows: nnU-Net's augmentation, patch, batch, epochs and its gradient clipping at 12 stay.
Facts and their sources: docs/architectures.md §6.1-6.5 (DLKUNet §6.1, LGMSNet §6.2, LGMSNet-3D §6.3,
LM-Net §6.4). MS-LKSeg publishes no code and its paper gives no optimiser or schedule: it has no paper
recipe, and none is invented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..errors import NetworkConfigError


@dataclass(frozen=True)
class Recipe:
    """An optimiser and a learning-rate schedule over progress.

    ``schedule``: ``poly`` lr (1 - t)^0.9; ``step`` lr gamma^floor(t / step_every); ``cosine`` from lr to
    ``min_lr`` over the run. ``warmup``: the first fraction of training ramps linearly up to lr (the
    schedule then runs over the rest)."""
    optimizer: str  # sgd | adam | adamw
    lr: float
    weight_decay: float
    schedule: str
    momentum: float = 0.0
    nesterov: bool = False
    step_every: float = 0.0
    gamma: float = 1.0
    min_lr: float = 0.0
    warmup: float = 0.0
    source: str = ""


NNUNET = Recipe("sgd", 1e-2, 3e-5, "poly", momentum=0.99, nesterov=True,
                source="nnU-Net's nnUNetTrainer.configure_optimizers")

# (backbone family, dim) -> the paper/official-code recipe
PAPER_RECIPES = {
    # Adam, wd 1e-5, lr 1e-3 (paper §4.3); StepLR(20 epochs, 0.9) over 400 epochs in the official code
    # (the paper's "reduce by 90% every 20 epochs" is the code's x0.9): a step every 20/400 of training.
    ("dlkunet", 2): Recipe("adam", 1e-3, 1e-5, "step", step_every=20 / 400, gamma=0.9,
                           source="DLKUNet paper §4.3 (Adam, wd 1e-5, lr 1e-3); official code StepLR(20, 0.9), "
                                  "400 epochs"),
    # SGD momentum 0.9, wd 1e-4, lr 0.02, poly 0.9 (official 2D code, paper lr 0.02)
    ("lgmsnet", 2): Recipe("sgd", 0.02, 1e-4, "poly", momentum=0.9,
                           source="LGMSNet official 2D code: SGD momentum 0.9, wd 1e-4, lr 0.02, poly 0.9"),
    # AdamW lr 1e-3, wd 1e-5, linear warm-up 50 of 5000 epochs, then cosine (official 3D script)
    ("lgmsnet", 3): Recipe("adamw", 1e-3, 1e-5, "cosine", warmup=50 / 5000,
                           source="LGMSNet official 3D script: AdamW lr 1e-3, wd 1e-5, warm-up 50 of 5000 "
                                  "epochs + cosine"),
    # AdamW lr 1e-3, wd 1e-4, cosine annealing to 1e-6 over the run (official code)
    ("lmnet", 2): Recipe("adamw", 1e-3, 1e-4, "cosine", min_lr=1e-6,
                         source="LM-Net official code: AdamW lr 1e-3, wd 1e-4, CosineAnnealing(T_max = all "
                                "epochs, eta_min 1e-6)"),
}
PAPER_RECIPES[("dlkunet", 3)] = PAPER_RECIPES[("dlkunet", 2)]  # the paper trains 2D only; the same recipe
PAPER_RECIPES[("lmnet", 3)] = PAPER_RECIPES[("lmnet", 2)]


def family(backbone: str) -> str:
    """dlkunet_s/m/l share one recipe."""
    return backbone.split("_")[0]


def has_paper_recipe(backbone: str) -> bool:
    return any(f == family(backbone) for f, _ in PAPER_RECIPES)


def paper_recipe(backbone: str, dim: int) -> Recipe:
    key = (family(backbone), dim)
    if key not in PAPER_RECIPES:
        raise NetworkConfigError(f"{backbone} has no paper recipe for {dim}D (its sources give no optimiser or "
                                 f"schedule); train it with the plain trainer, which uses nnU-Net's recipe")
    return PAPER_RECIPES[key]


def learning_rate(recipe: Recipe, epoch: int, num_epochs: int) -> float:
    """The learning rate of 0-based ``epoch`` in a run of ``num_epochs``."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    warmup_epochs = round(recipe.warmup * num_epochs) if recipe.warmup > 0 else 0
    if warmup_epochs and epoch < warmup_epochs:  # linear ramp, never zero, lr reached when it ends
        return recipe.lr * (epoch + 1) / (warmup_epochs + 1)
    t = (epoch - warmup_epochs) / max(1, num_epochs - warmup_epochs)
    if recipe.schedule == "poly":
        return recipe.lr * (1.0 - t) ** 0.9
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** math.floor(t / recipe.step_every + 1e-9)
    if recipe.schedule == "cosine":
        return recipe.min_lr + (recipe.lr - recipe.min_lr) * (1.0 + math.cos(math.pi * t)) / 2.0
    raise ValueError(f"unknown learning-rate schedule {recipe.schedule!r}; choose poly, step or cosine")


def make_optimizer(recipe: Recipe, parameters) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(parameters, recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimiser {recipe.optimizer!r}; choose sgd, adam or adamw")


class RecipeLRScheduler:
    """Sets the learning rate from the epoch, as nnU-Net's PolyLRScheduler does (``step(current_epoch)`` at
    every epoch start), so ``--c`` continues the schedule exactly: no state but the epoch. ``num_epochs`` may
    be a callable (the trainer's current budget)."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe: Recipe, num_epochs: Union[int, Callable[[], int]]):
        self.optimizer, self.recipe = optimizer, recipe
        self._num_epochs = num_epochs if callable(num_epochs) else (lambda: num_epochs)
        self.step(0)

    def step(self, current_epoch: Optional[int] = None) -> None:
        lr = learning_rate(self.recipe, current_epoch or 0, self._num_epochs())
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
