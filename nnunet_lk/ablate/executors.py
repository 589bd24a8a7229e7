"""Where ``nnunet-lk ablate --run`` trains the missing (trainer, configuration, fold, repeat) jobs:

- ``sequential`` (default): one after the other, in this process's environment.
- ``local``: N at once on this machine, one per GPU (``CUDA_VISIBLE_DEVICES``) or N CPU jobs with a thread
  budget each (OMP/MKL/torch threads and nnU-Net's ``nnUNet_n_proc_DA``), each in its own process group.
- ``slurm``: one job per pair through submitit, as a job array with a concurrency limit; the submitted job ids
  are kept in the output folder (:mod:`.state`), so a later call neither submits them again nor forgets to
  report those that failed; ``--no-wait`` returns at once.

Every executor runs the :class:`jobs.TrainJob` list :func:`jobs.plan_runs` plans, through :func:`jobs.execute`
(sequential and local here, slurm in the job through :class:`jobs.TrainFold`), and reports one kind of record.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

from ..errors import UsageError
from ..process_group import Stopped, sigterm_exits
from . import slurm, state
from .jobs import TrainJob, execute, fold_action, plan_runs, thread_env
from .results import FoldRun
from .runner import PROGRESS_LINE, check_trainers_findable, warn_full_schedule

EXECUTORS = ("sequential", "local", "slurm")
DONE_MESSAGE = "--run: every (trainer, fold, repeat) is already trained and validated"
SEQUENTIAL_SLOT: Dict[str, str] = {}   # one training at a time, in this process's environment


@dataclass
class RunOptions:
    executor: str = "sequential"
    jobs: Optional[int] = None               # local: parallel trainings (default: one per visible GPU, else 1)
    threads_per_job: Optional[int] = None    # local: default cores // jobs
    wait: bool = True                        # slurm: False returns once submitted (--no-wait)
    dry_run: bool = False
    requeue: bool = False                    # slurm: requeue at the time limit and resume with --c
    poll_seconds: float = 30.0               # slurm: how often the queue is checked while waiting
    slurm: Dict[str, object] = field(default_factory=dict)   # submitit SlurmExecutor parameters


@dataclass
class RunOutcome:
    records: List[dict] = field(default_factory=list)   # finished jobs this call saw (returncode 0: success)
    waiting: List[str] = field(default_factory=list)    # slurm job ids still pending or running (--no-wait)
    dry_run: bool = False

    @property
    def failed(self) -> List[dict]:
        """Failed jobs whose fold still needs work (not one that a later job, e.g. resubmitted, finished)."""
        return [r for r in self.records if r["returncode"] != 0
                and fold_action(FoldRun(r["trainer"], r["fold"], Path(r["path"]))) is not None]


def run_pairs(dataset: str, configuration: str, plans: str, trainers: Sequence[str], folds: Sequence[int], *,
              device: str, epochs: Optional[int], iterations: Optional[int], val_iterations: Optional[int],
              results_root, output, options: RunOptions, repeats: int = 1, seed: Optional[int] = None, log=print,
              out=print, done_elsewhere: Collection[Tuple[str, int, int]] = ()) -> RunOutcome:
    """Train, resume or validate the missing (trainer, fold, repeat) jobs with ``options.executor``; progress goes
    to ``log``, job ids and --dry-run's listing to ``out``. ``done_elsewhere``: jobs an earlier report holds."""
    if options.executor not in EXECUTORS:
        raise UsageError(f"--executor {options.executor!r}: choose one of {', '.join(EXECUTORS)}")
    cpus = options.slurm.get("cpus_per_task") if options.executor == "slurm" else None
    extra = thread_env(int(cpus)) if cpus else {}

    def planner() -> List[TrainJob]:
        return plan_runs(dataset, configuration, plans, trainers, folds, device=device, results_root=results_root,
                         epochs=epochs, iterations=iterations, val_iterations=val_iterations, repeats=repeats,
                         seed=seed, extra_env=extra, done_elsewhere=done_elsewhere)
    if options.dry_run:
        print_dry_run(planner(), options, output, device, out, scope=(str(dataset), plans, configuration))
        return RunOutcome(dry_run=True)
    if options.executor in ("sequential", "local"):
        with state.locked(output):
            jobs = planner()
            if not jobs:
                log(DONE_MESSAGE)
                return RunOutcome()
            _check(jobs, epochs, iterations, log)
            slots = ([SEQUENTIAL_SLOT] if options.executor == "sequential"
                     else local_slots(device, options.jobs, options.threads_per_job))
            return RunOutcome(run_local(jobs, slots, output, log, name=options.executor))
    return run_slurm(planner, (str(dataset), plans, configuration), output, options,
                     check=lambda jobs: _check(jobs, epochs, iterations, log), log=log, out=out)


def _check(jobs: Sequence[TrainJob], epochs, iterations, log) -> None:
    check_trainers_findable(sorted({j.trainer for j in jobs}))
    warn_full_schedule([j.trainer for j in jobs], epochs, iterations, log)


# ---- local ---------------------------------------------------------------------------------------------------
def visible_gpus(environ: Optional[Dict[str, str]] = None) -> List[str]:
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(device: str, jobs: Optional[int] = None, threads_per_job: Optional[int] = None,
                environ: Optional[Dict[str, str]] = None, cores: Optional[int] = None) -> List[Dict[str, str]]:
    """The environment of each of the N parallel trainings: one GPU each (cuda), and cores // N threads each."""
    environ = os.environ if environ is None else environ
    cores = cores or len(os.sched_getaffinity(0))
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if device == "cuda":
        gpus = visible_gpus(environ)
        if not gpus:
            raise UsageError("--executor local --device cuda: no GPU is visible (CUDA_VISIBLE_DEVICES / torch); "
                             "use --device cpu --jobs N for CPU trainings")
        n = jobs or len(gpus)
        if n > len(gpus):
            raise UsageError(f"--jobs {n}: only {len(gpus)} GPU(s) visible ({','.join(gpus)}); --executor local "
                             f"runs one training per GPU, so use --jobs {len(gpus)} or fewer")
        threads = threads_per_job or max(1, cores // n)
        return [{"CUDA_VISIBLE_DEVICES": g, **thread_env(threads, environ)} for g in gpus[:n]]
    n = jobs or 1
    return [thread_env(threads_per_job or max(1, cores // n), environ) for _ in range(n)]


def run_local(jobs: Sequence[TrainJob], slots: Sequence[Dict[str, str]], log_dir, log=print,
              name: str = "local") -> List[dict]:
    """Run ``jobs`` len(slots) at a time, each with a free slot's environment; Ctrl-C or SIGTERM stops them all."""
    free: "queue.Queue[int]" = queue.Queue()
    for i in range(len(slots)):
        free.put(i)
    stop = threading.Event()
    Path(log_dir).mkdir(parents=True, exist_ok=True)

    def work(job: TrainJob) -> Optional[dict]:
        slot = free.get()
        try:
            return None if stop.is_set() else _run_in_slot(job, slot, slots[slot], Path(log_dir), stop, log, name)
        finally:
            free.put(slot)
    log(f"[{name}] {len(jobs)} job(s), {len(slots)} at a time: "
        + "; ".join(f"slot {i}: {_describe(s)}" for i, s in enumerate(slots)))
    records = []
    with ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="nnunet-lk-job") as pool:
        futures = [pool.submit(work, j) for j in jobs]
        try:
            with sigterm_exits():
                for future in as_completed(futures):
                    if future.result() is not None:
                        records.append(future.result())
        except BaseException:
            stop.set()   # every running nnUNetv2_train's process group is killed, queued jobs never start
            for f in futures:
                f.cancel()
            raise
    return records


def _describe(slot: Dict[str, str]) -> str:
    if "OMP_NUM_THREADS" not in slot:
        return "this environment"
    gpu = f"CUDA_VISIBLE_DEVICES={slot['CUDA_VISIBLE_DEVICES']}, " if "CUDA_VISIBLE_DEVICES" in slot else ""
    return f"{gpu}{slot['OMP_NUM_THREADS']} threads"


def _run_in_slot(job: TrainJob, slot: int, env: Dict[str, str], log_dir: Path, stop: threading.Event,
                 log, name: str = "local") -> dict:
    log_path = log_dir / job.log_name
    log(f"[{name}] start {job.label} (slot {slot}: {_describe(env)}); log {log_path}")
    start = time.time()
    tag = f"{job.trainer} fold {job.fold}" + (f" repeat {job.repeat}" if job.repeat else "")

    def on_line(line: str) -> None:
        if PROGRESS_LINE.search(line):
            log(f"    [{tag}] {line.rstrip()}")
    try:
        with open(log_path, "a") as handle:
            returncode = execute(job, handle, env=env, on_line=on_line, stop=stop)
    except Stopped:
        raise
    except Exception as e:  # could not start it: reported like a failed training, the others go on
        log(f"[{name}] {job.label} could not run: {e}")
        returncode = 1
    seconds = round(time.time() - start, 1)
    log(f"[{name}] {'done' if returncode == 0 else 'FAILED'} {job.label}: exit {returncode} after {seconds:.0f} s"
        + ("" if returncode == 0 else f"; log {log_path}"))
    return run_record(job, returncode, log=str(log_path), seconds=seconds)


def run_record(job, returncode: int, **extra) -> dict:
    """What every executor reports of a finished job (``job``: a TrainJob or a slurm JobRecord)."""
    return {"trainer": job.trainer, "fold": job.fold, "repeat": getattr(job, "repeat", 0), "action": job.action,
            "returncode": returncode, "path": job.path, "label": job.label, **extra}


# ---- slurm ---------------------------------------------------------------------------------------------------
def run_slurm(planner: Callable[[], List[TrainJob]], scope, output, options: RunOptions, *,
              check: Callable[[List[TrainJob]], None], log=print, out=print) -> RunOutcome:
    """Report the jobs earlier calls submitted, submit the missing pairs none of them covers, then (unless
    --no-wait) wait for all of them, showing progress."""
    with state.locked(output):
        records = state.load(output)
        ours = [r for r in records if r.belongs_to(*scope)]
        current = slurm.statuses(ours)
        finished = _report(ours, current, log)
        active = [r for r in ours if current[r.job_id].phase == "active"]
        busy = {r.key for r in active}
        jobs = [j for j in planner() if j.key not in busy]
        for r in finished:
            if r["returncode"] == 0 and any(j.key == r["key"] for j in jobs):
                log(f"warning: slurm job {r['job_id']} succeeded but {r['path']} is still not trained and validated: "
                    f"do the compute nodes see the same nnUNet_results ({os.environ.get('nnUNet_results')})?")
        if jobs:
            check(jobs)
        new = slurm.submit(jobs, output, options.slurm, requeue=options.requeue) if jobs else []
        state.save(output, [r for r in records if not r.belongs_to(*scope)] + active + new)
    for r in active:
        out(f"slurm job {r.job_id} ({r.label}) is still {current[r.job_id].state}: not submitted again")
    for r in new:
        out(f"submitted slurm job {r.job_id}: {r.label}; log {r.stdout}")
    if not active and not new:
        log(DONE_MESSAGE)
    waiting = active + new
    if not options.wait or not waiting:
        return RunOutcome(finished, [r.job_id for r in waiting])
    return RunOutcome(finished + wait_for(waiting, output, options.poll_seconds, log))


def _report(records: Sequence[state.JobRecord], current: Dict[str, slurm.Status], log) -> List[dict]:
    """Log the jobs that have finished (failures with their log) and return them as run records."""
    finished = []
    for r in records:
        status = current[r.job_id]
        if status.phase == "active":
            continue
        ok = status.phase == "done"
        detail = f" ({status.detail})" if status.detail else ""
        log(f"slurm job {r.job_id} ({r.label}) " + ("finished" if ok else f"FAILED: {status.state}{detail}; "
                                                                          f"log {r.stdout}"))
        finished.append(run_record(r, 0 if ok else 1, state=status.state, job_id=r.job_id, log=r.stdout,
                                   key=r.key))
    return finished


def wait_for(records: Sequence[state.JobRecord], output, poll_seconds: float, log=print) -> List[dict]:
    """Poll until every job has left the queue; logs each state change and a count; returns the finished jobs."""
    remaining, finished, seen = list(records), [], {}
    try:
        while remaining:
            current = slurm.statuses(remaining)
            changed = [r for r in remaining if seen.get(r.job_id) != current[r.job_id].state]
            for r in changed:
                if current[r.job_id].phase == "active":
                    log(f"slurm job {r.job_id} ({r.label}): {seen.get(r.job_id, 'submitted')} -> "
                        f"{current[r.job_id].state}")
                seen[r.job_id] = current[r.job_id].state
            done = [r for r in remaining if current[r.job_id].phase != "active"]
            if done:
                finished += _report(done, current, log)
                _forget(output, {r.job_id for r in done})
                remaining = [r for r in remaining if r not in done]
            if changed:
                _summary(remaining, current, finished, log)
            if remaining:
                time.sleep(poll_seconds)
    except KeyboardInterrupt:
        log("stopped waiting; the jobs keep running: run the same command again to see how they did")
        raise SystemExit(130) from None
    return finished


def _summary(remaining, current, finished, log) -> None:
    running = sum(current[r.job_id].state.startswith("RUNNING") for r in remaining)
    failed = sum(r["returncode"] != 0 for r in finished)
    log(f"slurm: {running} running, {len(remaining) - running} pending, {len(finished) - failed} finished, "
        f"{failed} failed")


def _forget(output, job_ids) -> None:
    with state.locked(output):
        state.save(output, [r for r in state.load(output) if r.job_id not in job_ids])


# ---- --dry-run -----------------------------------------------------------------------------------------------
def print_dry_run(jobs: List[TrainJob], options: RunOptions, output, device: str, out=print, scope=None) -> None:
    """The jobs and their commands; for slurm also the sbatch script submitit would write. Runs nothing."""
    if options.executor == "slurm" and scope is not None and state.state_path(output).is_file():
        records = [r for r in state.load(output) if r.belongs_to(*scope)]
        current = slurm.statuses(records)
        busy = {r.key: r for r in records if current[r.job_id].phase == "active"}
        for key, r in busy.items():
            out(f"slurm job {r.job_id} ({r.label}) is still {current[r.job_id].state}: it would not be submitted")
        jobs = [j for j in jobs if j.key not in busy]
    out(f"--dry-run: {len(jobs)} (trainer, configuration, fold, repeat) job(s) for --executor {options.executor}; "
        f"nothing is run or submitted")
    for j in jobs:
        out(f"  {j.label}  ->  {j.path}")
    if not jobs:
        return
    out("commands (each job re-checks its fold folder when it starts: --c once a checkpoint exists):")
    for j in jobs:
        out(f"  {j.shell_line()}")
    if options.executor == "local":
        slots = local_slots(device, options.jobs, options.threads_per_job)
        out(f"{len(slots)} at a time: " + "; ".join(f"slot {i}: {_describe(s)}" for i, s in enumerate(slots)))
    elif options.executor == "slurm":
        folder = slurm.job_folder(output)
        out(f"sbatch script submitit writes ({folder.parent}/<job id>/...) for the {len(jobs)} job(s), "
            f"{'a job array' if len(jobs) > 1 else 'one job'}; each runs {'Requeueable' if options.requeue else ''}"
            f"TrainFold(<job>) through python -m submitit.core._submit:")
        out(slurm.sbatch_script(output, options.slurm, len(jobs)))
