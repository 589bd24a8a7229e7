"""Stock nnU-Net on the same short budget as our trainers (fair ablations).

``nnUNetTrainer`` ignores our budget variables; comparing a backbone trained for 20 epochs with stock
nnU-Net trained for 1000 would compare budgets, not networks. This class is stock nnU-Net (its network,
loss, augmentation, schedule) and only reads the same run-time settings as every nnunet-lk trainer
(``run_settings.RunSettingsMixin``)."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .run_settings import RunSettingsMixin


class nnUNetTrainerStockBudget(RunSettingsMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_run_settings()


__all__ = ["nnUNetTrainerStockBudget"]
