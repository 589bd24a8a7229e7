"""``nnunet-lk ablate``: finished nnU-Net trainings of one dataset and configuration, compared across
trainers (stock nnU-Net included) and folds.

Read from ``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CFG/fold_F/`` (``results``): Dice per case and class
from nnU-Net's own ``validation/summary.json``; HD95 and normalised surface Dice computed with MONAI
(``metrics``); epoch times and training curves from nnU-Net's logs; params, MACs and eval-mode latency per
patch of the network built from the results folder's plans (``collect``). Each trainer is compared with the
baseline (stock nnU-Net) case by case with a paired Wilcoxon signed-rank test (``statistics``); CSV, markdown,
plots and JSON are written by ``report``. ``--run`` first trains the missing (trainer, fold, repeat) jobs
through ``nnUNetv2_train`` (``jobs``), one after the other, several at once on this machine or as SLURM jobs
through submitit (``executors``, ``slurm``, ``state``); ``runner`` checks before and selects models after.
``--merge`` adds what an earlier report holds (``merge``).
"""
from ..nnunet_io import STOCK_BUDGET_TRAINER, STOCK_TRAINER, STOCK_TRAINERS
from .collect import Ablation, collect, network_figures, summarize
from .executors import EXECUTORS, RunOptions, RunOutcome, run_pairs
from .jobs import TrainFold, TrainJob, fold_action, plan_runs, train_command
from .merge import EarlierReport, check_compatible, merge_into, read_report
from .metrics import fold_case_metrics, surface_metrics
from .report import markdown_report, write_csvs, write_outputs, write_plots
from .results import (ALL_FOLDS, FoldRun, checkpoint_curves, default_baseline, discover_trainers, label_names,
                      model_folder, parse_training_logs, read_validation_summary)
from .runner import check_trainers_findable, default_run_trainers, find_best_configuration
from .statistics import case_means, paired_wilcoxon

__all__ = ["ALL_FOLDS", "Ablation", "EXECUTORS", "FoldRun", "RunOptions", "RunOutcome", "STOCK_BUDGET_TRAINER",
           "STOCK_TRAINER", "STOCK_TRAINERS", "TrainFold", "TrainJob", "fold_action", "run_pairs",
           "EarlierReport", "case_means", "check_compatible", "check_trainers_findable", "merge_into", "read_report", "checkpoint_curves", "collect", "default_baseline",
           "default_run_trainers", "discover_trainers", "find_best_configuration", "fold_case_metrics", "label_names",
           "markdown_report", "model_folder", "network_figures", "paired_wilcoxon", "parse_training_logs",
           "plan_runs", "read_validation_summary", "summarize", "surface_metrics", "train_command",
           "write_csvs", "write_outputs", "write_plots"]
