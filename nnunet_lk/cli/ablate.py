"""``nnunet-lk ablate``: argparse glue for :mod:`nnunet_lk.ablate`."""
from __future__ import annotations

import sys


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_ablate(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from .. import ablate as ab
    from ..analysis import default_device
    for var, value in (("nnUNet_results", nnUNet_results), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not value:
            raise ValueError(f"{var} is not set; export nnU-Net's folders first")
    folds = list(args.folds)
    failed = []
    trainers = args.trainers
    if args.run:
        trainers = trainers or ab.default_run_trainers()
        device = args.device or default_device()
        if args.epochs is None and args.iterations is None:
            _log("warning: --run without --epochs/--iterations trains nnU-Net's full budget (1000 x 250)")
        records = ab.run_missing(args.dataset, args.configuration, args.plans, trainers, folds, epochs=args.epochs,
                                 iterations=args.iterations, val_iterations=args.val_iterations, device=device,
                                 results_root=nnUNet_results, log=_log, log_dir=args.output)
        failed = [r for r in records if r["returncode"] != 0]
    abl = ab.collect(nnUNet_results, nnUNet_preprocessed, args.dataset, args.configuration, args.plans,
                     trainers=trainers, folds=folds, baseline=args.baseline, nsd_tolerance=args.nsd_tolerance,
                     latency_repeats=args.latency_repeats, log=_log)
    if not args.no_find_best and sorted(folds) == list(ab.ALL_FOLDS):
        ours = [t for t in abl.trainers if t not in ab.STOCK_TRAINERS or t == abl.baseline]
        abl.find_best = ab.find_best_configuration(args.dataset, args.configuration, args.plans, ours,
                                                   nnUNet_results, log=_log)
    for r in failed:
        abl.notes.append(f"--run: {r['action']} {r['trainer']} fold {r['fold']} failed (exit {r['returncode']}); "
                         f"see {args.output}/run_{r['trainer']}_fold{r['fold']}.log")
    paths = ab.write_outputs(abl, args.output, plots=not args.no_plots)
    print(paths["markdown"].read_text())
    for p in paths.values():
        _log(f"wrote {p}")
    return 1 if failed or not abl.rows else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="compare finished nnU-Net trainings (Dice, HD95, NSD, Wilcoxon vs stock, params, time); "
                       "--run trains the missing folds first",
        description="Collect $nnUNet_results/DatasetXXX/TRAINER__PLANS__CFG/fold_F across trainers and folds and "
                    "report per class and mean metrics, paired Wilcoxon tests against stock nnU-Net, CSV, markdown "
                    "and plots.")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--trainers", nargs="+", help="default: every trainer with results for these plans/configuration "
                                                 "(with --run: nnUNetTrainerStockBudget + one trainer per backbone)")
    p.add_argument("--baseline", help="trainer the others are tested against (default nnUNetTrainer, else "
                                      "nnUNetTrainerStockBudget)")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("-o", "--output", default="ablation", help="output folder (default ./ablation)")
    p.add_argument("--nsd-tolerance", type=float, default=1.0,
                   help="normalised surface Dice tolerance in physical units, e.g. mm (default 1.0)")
    p.add_argument("--latency-repeats", type=int, default=5, help="timed forward passes per network (0 = skip)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-find-best", action="store_true", help="do not run nnUNetv2_find_best_configuration")
    p.add_argument("--run", action="store_true", help="train/resume/validate missing (trainer, fold) pairs first "
                                                      "with nnUNetv2_train, one after the other")
    p.add_argument("--epochs", type=int, help="--run budget: NNUNET_LK_EPOCHS")
    p.add_argument("--iterations", type=int, help="--run budget: NNUNET_LK_ITERATIONS (per epoch)")
    p.add_argument("--val-iterations", type=int, help="--run budget: NNUNET_LK_VAL_ITERATIONS")
    p.add_argument("--device", choices=("cpu", "cuda"), help="--run device (default: cuda if available)")
    p.set_defaults(func=cmd_ablate)
