"""Scheduled Dice/CE weighting for nnU-Net's compound loss."""
from .schedules import LossWeights, SCHEDULES, get_schedule, progress
from .scheduled import StrictDeepSupervisionWrapper, apply_loss_weights, compound_loss

__all__ = ["LossWeights", "SCHEDULES", "get_schedule", "progress", "StrictDeepSupervisionWrapper",
           "apply_loss_weights", "compound_loss"]
