"""``nnunet-lk ablate``: argparse glue for the :mod:`nnunet_lk.ablate` package."""
from __future__ import annotations

import sys

from ..errors import UsageError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_ablate(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from .. import ablate as ab
    for var, value in (("nnUNet_results", nnUNet_results), ("nnUNet_preprocessed", nnUNet_preprocessed)):
        if not value:
            raise UsageError(f"{var} is not set; export nnU-Net's folders first")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    options = run_options(args)
    folds = list(args.folds)
    failed = []
    trainers = args.trainers
    earlier = ab.read_report(args.merge) if args.merge else None
    if earlier is not None:  # before --run: a report of another protocol must not decide what is trained
        from ..nnunet_io import dataset_name
        ab.check_compatible(earlier, dataset_name(args.dataset), args.configuration, args.plans, args.nsd_tolerance)
    if args.run:
        trainers = trainers or ab.default_run_trainers()
        elsewhere = earlier.keys(trainers, folds, args.repeats) if earlier is not None else set()
        if args.epochs is None and args.iterations is None:
            _log("warning: --run without --epochs/--iterations trains nnU-Net's full budget (1000 x 250)")
        outcome = ab.run_pairs(args.dataset, args.configuration, args.plans, trainers, folds, device=_device(args),
                               epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
                               results_root=nnUNet_results, output=args.output, options=options,
                               repeats=args.repeats, seed=_seed(args), log=_log, out=print,
                               done_elsewhere=elsewhere)
        if outcome.dry_run:
            return 0
        if outcome.waiting:
            _log(f"--no-wait: {len(outcome.waiting)} slurm job(s) queued or running ({', '.join(outcome.waiting)}); "
                 f"run the same command again to report on them, and to write the report once all have finished")
            return 0
        failed = outcome.failed
    abl = ab.collect(nnUNet_results, nnUNet_preprocessed, args.dataset, args.configuration, args.plans,
                     trainers=trainers, folds=folds, baseline=args.baseline, nsd_tolerance=args.nsd_tolerance,
                     latency_repeats=args.latency_repeats, repeats=args.repeats, earlier=earlier, log=_log)
    if not args.no_find_best and sorted(folds) == list(ab.ALL_FOLDS):
        ours = [t for t in abl.trainers if t not in ab.STOCK_TRAINERS or t == abl.baseline]
        abl.find_best = ab.find_best_configuration(args.dataset, args.configuration, args.plans, ours,
                                                   nnUNet_results, log=_log)
    for r in failed:
        how = r.get("state") or f"exit {r['returncode']}"
        abl.notes.append(f"--run: {r['label']} failed ({how}); see {r.get('log')}")
    paths = ab.write_outputs(abl, args.output, plots=not args.no_plots)
    print(paths["markdown"].read_text())
    for p in paths.values():
        _log(f"wrote {p}")
    return 1 if failed or not abl.rows else 0


def _seed(args):
    """--seed, else NNUNET_LK_SEED; unseeded with one repeat, else from 0 (``results.repeat_seeds``)."""
    from .. import settings
    if args.seed is not None and not 0 <= args.seed < 2 ** 32 - args.repeats:
        raise UsageError(f"--seed {args.seed}: give an integer from 0 to 2**32 - 1 - --repeats")
    return args.seed if args.seed is not None else settings.seed()


def _device(args) -> str:
    """--device, else: with --executor slurm cuda iff GPUs are asked for (the submitting machine's own GPUs say
    nothing about the nodes'), otherwise cuda where torch sees a GPU."""
    from ..analysis import default_device
    if args.device:
        return args.device
    if args.executor == "slurm":
        return "cuda" if args.slurm_gpus_per_node else "cpu"
    return default_device()


def run_options(args):
    """RunOptions from the flags; flags that do nothing with the chosen executor are errors naming the fix."""
    from ..ablate import executors, slurm
    slurm_flags = [f"--slurm-{flag}" for flag in slurm.OPTIONS if getattr(args, "slurm_" + flag.replace("-", "_"))
                   not in (None, [])]
    given = dict(executor=args.executor != "sequential", **{"dry-run": args.dry_run, "no-wait": args.no_wait,
                 "requeue": args.requeue, "jobs": args.jobs is not None,
                 "threads-per-job": args.threads_per_job is not None})
    if not args.run and (any(given.values()) or slurm_flags):
        named = [f"--{k}" for k, v in given.items() if v] + slurm_flags
        raise UsageError(f"{' '.join(named)} only apply to --run (training the missing folds); add --run")
    not_slurm = [f for f, on in (("--no-wait", args.no_wait), ("--requeue", args.requeue)) if on] + slurm_flags
    if args.executor != "slurm" and not_slurm:
        raise UsageError(f"{' '.join(not_slurm)} only apply to --executor slurm")
    if args.executor != "local" and (args.jobs is not None or args.threads_per_job is not None):
        raise UsageError("--jobs/--threads-per-job only apply to --executor local")
    if args.poll_seconds <= 0:
        raise UsageError(f"--poll-seconds must be positive, got {args.poll_seconds}")
    params = {}
    if args.executor == "slurm":
        gpus = args.slurm_gpus_per_node
        if gpus is None and args.device == "cuda" and not args.slurm_extra:
            gpus = 1   # --device cuda: one GPU per job unless asked otherwise
        params = slurm.parameters(partition=args.slurm_partition, time_min=args.slurm_time,
                                  cpus_per_task=args.slurm_cpus_per_task, gpus_per_node=gpus,
                                  mem_gb=args.slurm_mem_gb, account=args.slurm_account, qos=args.slurm_qos,
                                  constraint=args.slurm_constraint, array_parallelism=args.slurm_array_parallelism,
                                  setup=args.slurm_setup or (), extra=args.slurm_extra or ())
    return executors.RunOptions(executor=args.executor, jobs=args.jobs, threads_per_job=args.threads_per_job,
                                wait=not args.no_wait, dry_run=args.dry_run, requeue=args.requeue,
                                poll_seconds=args.poll_seconds, slurm=params)


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
    p.add_argument("--merge", metavar="REPORT_DIR",
                   help="add the (trainer, fold, repeat) results an earlier report (an -o folder: ablate_results.json "
                        "and ablate_cases.csv) holds and nnUNet_results does not, e.g. trained on another machine; "
                        "--run then trains only what neither holds. It may be the -o folder itself")
    p.add_argument("--no-find-best", action="store_true", help="do not run nnUNetv2_find_best_configuration")
    p.add_argument("--run", action="store_true", help="train/resume/validate missing (trainer, fold) pairs first "
                                                      "with nnUNetv2_train (see --executor)")
    p.add_argument("--epochs", type=int, help="--run budget: NNUNET_LK_EPOCHS")
    p.add_argument("--iterations", type=int, help="--run budget: NNUNET_LK_ITERATIONS (per epoch)")
    p.add_argument("--val-iterations", type=int, help="--run budget: NNUNET_LK_VAL_ITERATIONS")
    p.add_argument("--repeats", type=int, default=1,
                   help="trainings per (trainer, fold), each with its own seed (default 1); repeat k > 0 trains in "
                        "$nnUNet_results/nnunet_lk_repeats/repeat_k; the report adds mean ± sd over repeats and a "
                        "bootstrap over cases and repeats")
    p.add_argument("--seed", type=int, help="--run: repeat k trains with seed SEED + k (NNUNET_LK_SEED: torch, numpy, "
                                            "the augmentation workers); default: NNUNET_LK_SEED, else unseeded with "
                                            "one repeat and 0 with several")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="--run device (default: cuda if available; with --executor slurm: cuda iff "
                        "--slurm-gpus-per-node is given)")
    _register_executors(p)
    p.set_defaults(func=cmd_ablate)


def _register_executors(p) -> None:
    from ..ablate.slurm import DEFAULT_TIME_MIN
    g = p.add_argument_group("where --run trains")
    g.add_argument("--executor", choices=("sequential", "local", "slurm"), default="sequential",
                   help="sequential (default): one training after the other here; local: --jobs at once on this "
                        "machine; slurm: one SLURM job per (trainer, configuration, fold) through submitit")
    g.add_argument("--dry-run", action="store_true",
                   help="print the jobs, their commands and (slurm) the sbatch script; run and submit nothing")
    g.add_argument("--jobs", type=int, help="local: trainings at once (default: one per visible GPU with "
                                            "--device cuda, else 1); each gets CUDA_VISIBLE_DEVICES=<its GPU>")
    g.add_argument("--threads-per-job", type=int,
                   help="local: OMP/MKL/torch threads and nnUNet_n_proc_DA per training (default: cores // --jobs)")
    g.add_argument("--no-wait", action="store_true",
                   help="slurm: submit, print the job ids and return; run the command again to report")
    g.add_argument("--requeue", action="store_true",
                   help="slurm: a job reaching its time limit is checkpointed and requeued by submitit and "
                        "resumes with --c (up to 3 times)")
    g.add_argument("--poll-seconds", type=float, default=30.0,
                   help="slurm: how often the queue is checked while waiting (default 30)")
    s = p.add_argument_group("SLURM options (--executor slurm; submitit's SlurmExecutor parameter in brackets)")
    s.add_argument("--slurm-partition", help="sbatch --partition [partition]")
    s.add_argument("--slurm-time", type=int, metavar="MINUTES",
                   help=f"time limit per job [time; AutoExecutor: timeout_min] (default {DEFAULT_TIME_MIN})")
    s.add_argument("--slurm-cpus-per-task", type=int,
                   help="[cpus_per_task]; also each job's thread budget and nnUNet_n_proc_DA")
    s.add_argument("--slurm-gpus-per-node", type=int, help="[gpus_per_node] (default 1 with --device cuda)")
    s.add_argument("--slurm-mem-gb", type=int, help="sbatch --mem in GB [mem; AutoExecutor: mem_gb]")
    s.add_argument("--slurm-account", help="[account]")
    s.add_argument("--slurm-qos", help="[qos]")
    s.add_argument("--slurm-constraint", help="[constraint]")
    s.add_argument("--slurm-array-parallelism", type=int,
                   help="jobs of the array running at once, sbatch --array=0-N%%P [array_parallelism] (default 256)")
    s.add_argument("--slurm-setup", action="append", metavar="LINE",
                   help="a shell line run before each job, e.g. 'module load cuda' (repeatable) [setup]")
    s.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                   help="any other #SBATCH --KEY=VALUE, or --KEY alone (repeatable) [additional_parameters]")
