"""Stock nnU-Net on the same short budget as our trainers (issue 6, fair ablations).

``nnUNetTrainer`` ignores NNUNET_LK_EPOCHS / NNUNET_LK_ITERATIONS; comparing a backbone trained for 20
epochs with stock nnU-Net trained for 1000 would compare budgets, not networks. This class is stock
nnU-Net (its network, loss, augmentation, schedule) and only reads the same budget variables as
every nnunet-lk trainer (``nnunet_lk.training.base.BUDGET_ENV``)."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .base import BUDGET_ENV, _env_int, apply_thread_budget, validate_with_budget_mirroring


class nnUNetTrainerStockBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, env in BUDGET_ENV.items():
            value = _env_int(env)
            if value is not None:
                setattr(self, attribute, value)
        apply_thread_budget()

    def perform_actual_validation(self, save_probabilities: bool = False):
        return validate_with_budget_mirroring(self, super().perform_actual_validation, save_probabilities)


__all__ = ["nnUNetTrainerStockBudget"]
