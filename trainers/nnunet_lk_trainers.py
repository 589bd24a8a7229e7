"""Scanned by nnU-Net's trainer lookup (nnUNet_extTrainer points at this folder).

Only re-exports: the classes live in the installed package, so they survive nnU-Net's cleanup of
scanned modules and can be pickled."""
from nnunet_lk.training import trainers as _trainers
from nnunet_lk.training.trainers import *  # noqa: F401,F403
from nnunet_lk.training.trainers import __all__  # noqa: F401
from nnunet_lk.training.stock import nnUNetTrainerStockBudget  # noqa: F401  (stock net, same short budget)


def __getattr__(name: str):
    """The trainers of a backbone registered after this module was imported (nnU-Net's lookup asks by name)."""
    return getattr(_trainers, name)
