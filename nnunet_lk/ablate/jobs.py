"""One (trainer, configuration, fold) training as a job any executor can run: what to run comes from
:func:`runner.plan_runs` and :func:`runner.train_command` (the single source), the job re-checks its fold folder
when it starts (a requeued or repeated job resumes or skips instead of starting over), and runs nnUNetv2_train
in a process group of its own (:func:`process_group.run_streaming`).

:class:`TrainFold` is the callable a SLURM job (through submitit) or a local worker thread runs;
:class:`requeue.RequeueableTrainFold` (the slurm executor's, with submitit) resumes it with ``--c`` after a
requeue."""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO

from .. import settings
from ..errors import TrainingFailed, UsageError  # noqa: F401  (TrainingFailed: public here too)
from ..process_group import run_streaming
from .results import FoldJobLabels, FoldRun
from .runner import budget_env, fold_action, plan_runs, train_command

# handed to every job as they are where the job is submitted: nnU-Net's folders, nnU-Net's and our settings
PASSED_PREFIXES = ("nnUNet_", settings.PREFIX)
# what a job's thread budget sets (torch's intra-op pool follows OMP_NUM_THREADS)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", settings.THREADS)


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


def plan_jobs(dataset: str, configuration: str, plans: str, trainers: Sequence[str], folds: Sequence[int], *,
              device: str, results_root, epochs: Optional[int] = None, iterations: Optional[int] = None,
              val_iterations: Optional[int] = None, extra_env: Optional[Dict[str, str]] = None) -> List[TrainJob]:
    """The missing (trainer, fold) pairs (:func:`plan_runs`) as jobs carrying their budget and environment."""
    env = {**passed_env(), **budget_env(epochs, iterations, val_iterations), **(extra_env or {}),
           "PYTHONUNBUFFERED": "1"}
    return [TrainJob(dataset=str(dataset), configuration=configuration, plans=plans, trainer=t["trainer"],
                     fold=int(t["fold"]), device=device, action=t["action"], path=str(t["path"]), env=dict(env))
            for t in plan_runs(results_root, dataset, configuration, plans, trainers, folds)]


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
