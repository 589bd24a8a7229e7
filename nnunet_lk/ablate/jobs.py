"""One (trainer, configuration, fold, repeat) training as a job every executor runs the same way: what each
fold needs (:func:`plan_runs`), the nnUNetv2_train command (:func:`train_command`), the job's environment
(budget, seed, and for a repeat its own results folder), and :func:`execute`, which re-checks the fold folder
when the job starts (a requeued or repeated job resumes or skips instead of starting over) and runs
nnUNetv2_train in a process group of its own (:func:`process_group.run_streaming`).

:class:`TrainFold` is the callable a SLURM job (through submitit) runs; :class:`requeue.RequeueableTrainFold`
(the slurm executor's, with submitit) resumes it with ``--c`` after a requeue."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, TextIO, Tuple

from .. import settings
from ..errors import TrainingFailed, UsageError  # noqa: F401  (TrainingFailed: public here too)
from ..nnunet_io import dataset_name
from ..process_group import run_streaming
from .results import FoldJobLabels, FoldRun, model_folder, repeat_root, repeat_seeds

# handed to every job as they are where the job is submitted: nnU-Net's folders, nnU-Net's and our settings
PASSED_PREFIXES = ("nnUNet_", settings.PREFIX)
# what a job's thread budget sets (torch's intra-op pool follows OMP_NUM_THREADS)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", settings.THREADS)


def fold_action(run: FoldRun) -> Optional[str]:
    """None (trained and validated), ``validate``, ``resume`` (a checkpoint to continue from) or ``train``."""
    if run.complete and run.validated:
        return None
    return "validate" if run.complete else "resume" if run.resumable else "train"


def train_command(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                  action: str) -> List[str]:
    cmd = [cli_path("nnUNetv2_train"), str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans,
           "-device", device, "--npz"]
    if action == "resume":
        cmd.append("--c")
    elif action == "validate":
        cmd.append("--val")
    return cmd


def cli_path(name: str) -> str:
    """An nnU-Net command of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


@dataclass
class TrainJob(FoldJobLabels):
    """One nnUNetv2_train run; ``action`` is what the fold needed when it was planned."""
    dataset: str
    configuration: str
    plans: str
    trainer: str
    fold: int
    device: str
    action: str            # train | resume | validate
    path: str              # the fold folder
    env: Dict[str, str] = field(default_factory=dict)   # set on top of the environment the job runs in
    repeat: int = 0        # 0: nnU-Net's own results folder; k > 0: repeat_root(nnUNet_results, k)
    seed: Optional[int] = None

    def command(self, action: Optional[str] = None) -> List[str]:
        return train_command(self.dataset, self.configuration, self.fold, self.trainer, self.plans, self.device,
                             action or self.action)

    def shell_line(self) -> str:
        """The command as a shell line, with the variables the job sets (for --dry-run)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"env {env} {shlex.join(self.command())}" if env else shlex.join(self.command())

    def current_action(self) -> Optional[str]:
        """What the fold needs now (None: trained and validated). A job submitted to resume keeps ``--c`` even
        before the first checkpoint exists (nnUNetv2_train then starts a new training itself)."""
        action = fold_action(FoldRun(self.trainer, self.fold, Path(self.path)))
        return "resume" if action == "train" and self.action == "resume" else action

    def to_dict(self) -> dict:
        return asdict(self)


def passed_env(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """nnU-Net's and nnunet-lk's variables of ``environ`` (default os.environ), which every job gets."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(PASSED_PREFIXES)}


def thread_env(threads: int, environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A thread budget: BLAS/OpenMP/torch threads and, unless already set, nnU-Net's augmentation workers."""
    if threads < 1:
        raise UsageError(f"a job's thread budget must be at least 1, got {threads}")
    environ = os.environ if environ is None else environ
    env = {var: str(threads) for var in THREAD_VARS}
    if "nnUNet_n_proc_DA" not in environ:
        env["nnUNet_n_proc_DA"] = str(threads)
    return env


def plan_runs(dataset: str, configuration: str, plans: str, trainers: Sequence[str], folds: Sequence[int], *,
              device: str, results_root, epochs: Optional[int] = None, iterations: Optional[int] = None,
              val_iterations: Optional[int] = None, repeats: int = 1, seed: Optional[int] = None,
              extra_env: Optional[Dict[str, str]] = None,
              done_elsewhere: Collection[Tuple[str, int, int]] = ()) -> List[TrainJob]:
    """A job for every (trainer, fold, repeat) that is not yet trained and validated, carrying what it needs:
    skip nothing else, validate only, resume, or train; its budget, its seed (``repeat_seeds``) and, for a repeat,
    its own nnU-Net results folder. ``done_elsewhere``: (trainer, fold, repeat) an earlier report holds (--merge)."""
    name = dataset_name(dataset)
    common = {**passed_env(), **settings.budget_env(epochs, iterations, val_iterations), **(extra_env or {}),
              "PYTHONUNBUFFERED": "1"}
    jobs = []
    for repeat, repeat_seed in enumerate(repeat_seeds(repeats, seed)):
        root = repeat_root(results_root, repeat)
        env = {**common, **settings.seed_env(repeat_seed), **({"nnUNet_results": str(root)} if repeat else {})}
        for t in trainers:
            for f in folds:
                if (t, int(f), repeat) in done_elsewhere:
                    continue
                run = FoldRun(t, f, model_folder(root, name, t, plans, configuration) / f"fold_{f}")
                action = fold_action(run)
                if action is not None:
                    jobs.append(TrainJob(dataset=str(dataset), configuration=configuration, plans=plans, trainer=t,
                                         fold=int(f), device=device, action=action, path=str(run.path),
                                         env=dict(env), repeat=repeat, seed=repeat_seed))
    return jobs


def execute(job: TrainJob, out: TextIO, *, env: Optional[Dict[str, str]] = None,
            on_line: Optional[Callable[[str], None]] = None, stop: Optional[threading.Event] = None) -> int:
    """Run ``job`` now: header, nnUNetv2_train's output and a footer (with epoch-second time stamps) go to ``out``;
    returns the exit status (0 without running anything when the fold is already trained and validated)."""
    action = job.current_action()
    if action is None:
        out.write(f"nnunet-lk: {job.key} is already trained and validated; nothing to run\n")
        out.flush()
        return 0
    cmd = job.command(action)
    full_env = {**os.environ, **job.env, **(env or {})}
    out.write(f"nnunet-lk: start {time.time():.3f} {action} {job.key}: {shlex.join(cmd)}\n")
    out.flush()

    def line(text: str) -> None:
        out.write(text)
        out.flush()
        if on_line is not None:
            on_line(text)
    returncode = run_streaming(cmd, env=full_env, on_line=line, stop=stop)
    out.write(f"nnunet-lk: exit {returncode} at {time.time():.3f} {action} {job.key}\n")
    out.flush()
    return returncode


class TrainFold:
    """The callable a submitit job runs: :func:`execute` with output to the job's stdout log; raises
    :class:`TrainingFailed` on a non-zero exit, so that submitit (and SLURM) record the job as failed."""

    def __init__(self, job: TrainJob):
        self.job = job

    def __call__(self) -> int:
        returncode = execute(self.job, sys.stdout)
        if returncode != 0:
            reason = (f" (killed by {signal.Signals(-returncode).name})"
                      if -returncode in set(signal.valid_signals()) else "")
            raise TrainingFailed(f"nnUNetv2_train exited {returncode}{reason}: {self.job.label}; its output is "
                                 f"in this job's log")
        return returncode
