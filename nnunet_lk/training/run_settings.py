"""What every nnunet-lk trainer (and stock nnU-Net on our budget, ``stock.py``) takes from the environment
(``nnunet_lk.settings``): a short budget, torch's threads, a seed, and how the validation that ends
``nnUNetv2_train`` runs. One mixin, placed before ``nnUNetTrainer`` in the bases."""
from __future__ import annotations

import contextlib
import importlib
import os
import random
from typing import List, Optional

import numpy as np
import torch

from .. import settings

# nnU-Net's worker count for the final validation's export pool and metrics pool (nnUNet_def_n_proc, 8 unless
# set). Each worker is a spawned Python that imports torch and nnU-Net: on a 2-core machine, 8 + 8 of them
# cost more than the validation itself (measured: a 2 x 5 LGMSNet training, 12 validation cases, 62 s with
# 8, 28 s with 2, 26 s with 1).
WORKERS_ENV = "nnUNet_def_n_proc"
nnunet_trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")


def apply_thread_budget() -> None:
    """nnUNetv2_train and nnUNetv2_predict set torch's threads before they build the trainer or the network, so
    this runs after them (trainer construction; ``build_network_architecture``, which the predictor calls) and
    wins."""
    torch.set_num_threads(settings.cpu_threads(torch.get_num_threads()))


def validation_workers(default: int) -> int:
    """nnU-Net's worker count for the final validation: nnUNet_def_n_proc when the user set it, else its
    default capped at the usable cores."""
    return default if os.environ.get(WORKERS_ENV) else min(default, settings.usable_cores())


@contextlib.contextmanager
def _nnunet_workers(count: int):
    """nnU-Net's trainer reads its module global ``default_num_processes`` when validating; set it for the
    duration and restore it."""
    previous = nnunet_trainer_module.default_num_processes
    nnunet_trainer_module.default_num_processes = count
    try:
        yield
    finally:
        nnunet_trainer_module.default_num_processes = previous


def worker_seeds(seed: int, stream: int, count: int) -> List[int]:
    """Distinct seeds for ``count`` augmentation workers of loader ``stream`` (0 training, 1 validation)."""
    return [int(s) for s in np.random.SeedSequence([seed, stream]).generate_state(count)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded_augmenters(seed: int):
    """nnU-Net's ``get_dataloaders`` starts its multi-process augmenters with ``seeds=None`` (each worker then
    seeds itself from the OS); for the duration, the augmenters it builds get seeds derived from ``seed``: the
    training loader first, then the validation loader, as nnU-Net builds them."""
    original = nnunet_trainer_module.NonDetMultiThreadedAugmenter
    built = []

    def seeded(*args, num_processes, seeds=None, **kwargs):
        seeds = worker_seeds(seed, len(built), num_processes)
        built.append(seeds)
        return original(*args, num_processes=num_processes, seeds=seeds, **kwargs)
    nnunet_trainer_module.NonDetMultiThreadedAugmenter = seeded
    try:
        yield built
    finally:
        nnunet_trainer_module.NonDetMultiThreadedAugmenter = original


class RunSettingsMixin:
    nnunet_lk_seed: Optional[int] = None   # nnU-Net's debug.json records it with the trainer's other attributes

    def apply_run_settings(self) -> None:
        """Called at the end of ``__init__``: the budget variables that are set, the thread budget, the seed
        (before ``initialize`` builds the network, so its initial weights follow it too)."""
        self._budget_from_env = set()
        for attribute, value in settings.budget().items():
            setattr(self, attribute, value)
            self._budget_from_env.add(attribute)
        apply_thread_budget()
        self.nnunet_lk_seed = settings.seed()
        if self.nnunet_lk_seed is not None:
            seed_everything(self.nnunet_lk_seed)
            self.print_to_log_file(f"{settings.SEED}={self.nnunet_lk_seed}: torch, numpy, Python and the "
                                   f"data-augmentation workers are seeded")

    def get_dataloaders(self):
        if self.nnunet_lk_seed is None:
            return super().get_dataloaders()
        with _seeded_augmenters(self.nnunet_lk_seed):
            return super().get_dataloaders()

    def perform_actual_validation(self, save_probabilities: bool = False):
        workers = validation_workers(nnunet_trainer_module.default_num_processes)
        if workers != nnunet_trainer_module.default_num_processes:
            self.print_to_log_file(f"Final validation with {workers} worker processes (the usable cores; "
                                   f"{WORKERS_ENV} is unset, nnU-Net's default is "
                                   f"{nnunet_trainer_module.default_num_processes})")
        axes = self.inference_allowed_mirroring_axes
        if not settings.validation_mirroring():
            self.inference_allowed_mirroring_axes = None
            self.print_to_log_file(f"{settings.VAL_MIRRORING}=0: this validation runs without test-time mirroring")
        try:
            with _nnunet_workers(workers):
                return super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes
