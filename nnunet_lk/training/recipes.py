"""Training recipes: the optimiser and learning-rate schedule a backbone's paper or official code trains
with, as data, and the learning rate as a pure function of the epoch over the run's length (progress, as the loss schedules
use), so a 1000-epoch nnU-Net run and a 5-epoch test follow the same curve.

``nnunet`` is nnU-Net's own recipe (SGD, lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5, poly decay).
``paper`` recipes are what each backbone's sources train with, as far as nnU-Net allows: nnU-Net's augmentation,
patch, batch, epochs and its gradient clipping at 12 stay. Each backbone's registration gives its paper recipes
(``networks/<backbone>.py``; facts and sources in docs/architectures.md §6.1-6.5). MS-LKSeg publishes no code and
its paper gives no optimiser or schedule: it has no paper recipe, and none is invented.

The plain trainer ``nnUNetTrainer<Backbone>`` trains with the backbone's paper recipe where one is published for
the configuration's dimension, else with nnU-Net's (:func:`default_recipe`): on Hippocampus 2d the paper recipe
was ahead of nnU-Net's for every backbone measured with repeated trainings, and where the evidence does not
separate them the paper's choice stands (README, "Repeated trainings"). ``_nnUNetRecipe`` / ``_PaperRecipe``
name either explicitly.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..errors import NetworkConfigError
from ..networks import Recipe, get_backbone


NNUNET = Recipe("sgd", 1e-2, 3e-5, "poly", momentum=0.99, nesterov=True,
                source="nnU-Net's nnUNetTrainer.configure_optimizers")


RECIPE_NAMES = ("paper", "nnunet")


def default_recipe(backbone: str, dim: int) -> str:
    """What the plain trainer trains ``backbone`` with in ``dim``-D: its paper recipe where one is published, else
    nnU-Net's."""
    return "paper" if dim in get_backbone(backbone).paper_recipes else "nnunet"


def resolve_recipe(backbone: str, dim: int, requested: Optional[str]) -> str:
    """``requested`` ("paper", "nnunet"; None: :func:`default_recipe`), checked: a paper recipe must exist."""
    if requested is None:
        return default_recipe(backbone, dim)
    if requested not in RECIPE_NAMES:
        raise NetworkConfigError(f"recipe {requested!r}: choose one of {', '.join(RECIPE_NAMES)}")
    if requested == "paper":
        paper_recipe(backbone, dim)  # fails now if there is none
    return requested


def saved_recipe(budget: dict) -> str:
    """The recipe a checkpoint was trained with (its ``nnunet_lk`` record). Checkpoints written before the plain
    trainers defaulted to the paper recipe stored None (or nothing) for nnU-Net's."""
    return budget.get("recipe") or "nnunet"


def has_paper_recipe(backbone: str) -> bool:
    return bool(get_backbone(backbone).paper_recipes)


def paper_recipe(backbone: str, dim: int) -> Recipe:
    """The recipe the backbone's paper or official code trains with in ``dim``-D (its registration gives it)."""
    recipes = get_backbone(backbone).paper_recipes
    if dim not in recipes:
        raise NetworkConfigError(f"{backbone} has no paper recipe for {dim}D (its sources give no optimiser or "
                                 f"schedule); train it with the plain trainer, which uses nnU-Net's recipe")
    return recipes[dim]


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
