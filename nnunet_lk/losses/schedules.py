"""Dice/CE weight schedules: pure functions of training progress t = epoch / num_epochs, so the
shape is the same for a 1000-epoch nnU-Net run and a 5-epoch test (DLKUNet paper eqs. 10-13,
docs/architectures.md §1.8). Each returns ``LossWeights(dice, ce)``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict


@dataclass(frozen=True)
class LossWeights:
    dice: float
    ce: float


def progress(epoch: int, num_epochs: int) -> float:
    """Training progress of 0-based ``epoch`` in a run of ``num_epochs``."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    return epoch / num_epochs


# The official code uses k = 0.1 per epoch at 400 epochs; over progress that is 0.1 * 400 = 40.
PAPER_STEEPNESS = 0.1 * 400


def sigmoid_weights(t: float, *, dice_end: float = 0.3, ce_start: float = 0.7, midpoint: float = 0.5,
                    steepness: float = PAPER_STEEPNESS) -> LossWeights:
    """The paper's "dynamic" loss: s = sigmoid(k (t - x0)); α (Dice) = A + (1-A)(1-s) goes 1 → A,
    β (CE) = 1 + (B-1)(1-s) goes B → 1 (A = ``dice_end``, B = ``ce_start``)."""
    s = 1.0 / (1.0 + math.exp(-steepness * (t - midpoint)))
    return LossWeights(dice=dice_end + (1.0 - dice_end) * (1.0 - s), ce=1.0 + (ce_start - 1.0) * (1.0 - s))


def phase_weights(t: float, *, switch: float = 0.5, first: tuple = (0.6, 0.4),
                  second: tuple = (0.7, 0.3)) -> LossWeights:
    """The paper's phase-based loss (eq. 11): (Dice, CE) = ``first`` before ``switch``, ``second`` after."""
    dice, ce = first if t < switch else second
    return LossWeights(dice=dice, ce=ce)


def constant_weights(t: float, *, dice: float = 1.0, ce: float = 1.0) -> LossWeights:
    """nnU-Net's own 1:1 Dice+CE, for ablations."""
    return LossWeights(dice=dice, ce=ce)


SCHEDULES: Dict[str, Callable[..., LossWeights]] = {
    "sigmoid": sigmoid_weights,
    "phase": phase_weights,
    "constant": constant_weights,
}


def get_schedule(name: str, **params) -> Callable[[float], LossWeights]:
    """A schedule by name with its parameters bound: ``get_schedule('sigmoid', steepness=10)(0.3)``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown loss schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return partial(SCHEDULES[name], **params)
