"""SLURM through submitit: the sbatch options (named as submitit names them), one job array per call, the
sbatch script submitit writes (for --dry-run), and each job's state: pending or running while ``squeue`` lists
it, else finished, with the outcome submitit pickled (or, for a job killed before it could write one, the final
state ``sacct`` reports through submitit's watcher)."""
from __future__ import annotations

import getpass
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import SlurmError  # noqa: F401  (public here too)
from .jobs import TrainFold, TrainJob
from .state import JobRecord

# CLI flag (without --slurm-) -> (submitit SlurmExecutor parameter, submitit AutoExecutor name, sbatch option)
OPTIONS = {
    "partition": ("partition", "slurm_partition", "--partition"),
    "time": ("time", "timeout_min", "--time (minutes)"),
    "cpus-per-task": ("cpus_per_task", "cpus_per_task", "--cpus-per-task"),
    "gpus-per-node": ("gpus_per_node", "gpus_per_node", "--gpus-per-node"),
    "mem-gb": ("mem", "mem_gb", "--mem (GB)"),
    "account": ("account", "slurm_account", "--account"),
    "qos": ("qos", "slurm_qos", "--qos"),
    "constraint": ("constraint", "slurm_constraint", "--constraint"),
    "array-parallelism": ("array_parallelism", "slurm_array_parallelism", "--array=...%N"),
    "setup": ("setup", "slurm_setup", "lines run before the job's command"),
    "extra": ("additional_parameters", "slurm_additional_parameters", "any other #SBATCH --KEY=VALUE"),
}
DEFAULT_TIME_MIN = 24 * 60
JOB_NAME = "nnunet-lk"
# sbatch options (submitit's spelling) that have a flag of their own -> that flag
DEDICATED = {"partition": "partition", "time": "time", "cpus_per_task": "cpus-per-task",
             "gpus_per_node": "gpus-per-node", "mem": "mem-gb", "account": "account", "qos": "qos",
             "constraint": "constraint", "array": "array-parallelism"}
FINAL_OK = "COMPLETED"
# sacct states of a job that has not ended (it may have just left squeue)
NOT_ENDED = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING")
EXTRA_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def parse_extra(items: Sequence[str]) -> Dict[str, object]:
    """``--slurm-extra KEY=VALUE`` (``KEY`` alone: a flag) as submitit's additional_parameters."""
    extra: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not EXTRA_KEY.match(key):
            raise SlurmError(f"--slurm-extra {item!r}: expected KEY=VALUE or KEY with an sbatch option name as KEY, "
                             f"e.g. --slurm-extra mail-type=END")
        if key.replace("-", "_") in DEDICATED:
            raise SlurmError(f"--slurm-extra {item!r}: use --slurm-{DEDICATED[key.replace('-', '_')]} for that")
        extra[key.replace("-", "_")] = value if sep else True
    return extra


def parameters(*, partition: Optional[str] = None, time_min: Optional[int] = None, cpus_per_task: Optional[int] = None,
               gpus_per_node: Optional[int] = None, mem_gb: Optional[int] = None, account: Optional[str] = None,
               qos: Optional[str] = None, constraint: Optional[str] = None, array_parallelism: Optional[int] = None,
               setup: Sequence[str] = (), extra: Sequence[str] = ()) -> Dict[str, object]:
    """submitit SlurmExecutor parameters from the --slurm-* options (None: left to the cluster's defaults)."""
    for name, value in (("time", time_min), ("cpus-per-task", cpus_per_task), ("gpus-per-node", gpus_per_node),
                        ("mem-gb", mem_gb), ("array-parallelism", array_parallelism)):
        if value is not None and value < (0 if name == "gpus-per-node" else 1):
            raise SlurmError(f"--slurm-{name} must be a positive number, got {value}")
    params: Dict[str, object] = {"job_name": JOB_NAME, "time": time_min or DEFAULT_TIME_MIN,
                                 "stderr_to_stdout": True}   # one log per job: nnUNetv2_train's and submitit's
    named = {"partition": partition, "cpus_per_task": cpus_per_task, "gpus_per_node": gpus_per_node or None,
             "mem": f"{mem_gb}GB" if mem_gb else None, "account": account, "qos": qos, "constraint": constraint,
             "array_parallelism": array_parallelism, "setup": list(setup) or None,
             "additional_parameters": parse_extra(extra) or None}
    params.update({k: v for k, v in named.items() if v is not None})
    return params


def job_folder(output) -> Path:
    """submitit's folder for the jobs of an output folder (absolute, as submitit makes it)."""
    return (Path(output) / "slurm" / "%j").expanduser().absolute()


def sbatch_script(output, params: Dict[str, object], n_jobs: int) -> str:
    """The sbatch script submitit writes for ``n_jobs`` jobs submitted at once (a job array when more than one):
    the same function and command submitit's SlurmExecutor uses, so the text matches the file it writes."""
    from ..extras import require_extra
    require_extra("slurm", "--executor slurm --dry-run (the sbatch script is submitit's)")
    from submitit.slurm import slurm as submitit_slurm
    folder = job_folder(output)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, map_count=n_jobs if n_jobs > 1 else None,
                                              **params)


def submit(jobs: Sequence[TrainJob], output, params: Dict[str, object], *, requeue: bool,
           max_num_timeout: int = 3) -> List[JobRecord]:
    """One sbatch call (a job array with a concurrency limit) running :class:`TrainFold` per job."""
    from ..extras import require_extra
    require_extra("slurm", "--executor slurm")
    import submitit
    try:
        executor = submitit.SlurmExecutor(folder=job_folder(output), max_num_timeout=max_num_timeout)
    except RuntimeError as e:
        raise SlurmError(f"--executor slurm: {e} (submit from a machine with SLURM's sbatch and srun on PATH; "
                         f"--dry-run prints the jobs and the sbatch script without them)") from None
    executor.update_parameters(**params)
    from .requeue import RequeueableTrainFold  # submitit: imported once the extra is known to be there
    calls = [RequeueableTrainFold(j) if requeue else TrainFold(j) for j in jobs]
    try:
        submitted = executor.submit_array(calls)
    except Exception as e:  # sbatch refused: submitit raises its stderr
        raise SlurmError(f"sbatch refused the jobs: {str(e).strip()[-1500:]}\nCheck the --slurm-* options "
                         f"(--slurm-partition, --slurm-time, --slurm-mem-gb, ...); --dry-run prints the script"
                         ) from None
    now = time.time()
    return [JobRecord(executor="slurm", job_id=str(s.job_id), dataset=j.dataset, plans=j.plans,
                      configuration=j.configuration, trainer=j.trainer, fold=j.fold, action=j.action, path=j.path,
                      folder=str(job_folder(output)), stdout=str(s.paths.stdout), stderr=str(s.paths.stderr),
                      submitted=now, repeat=j.repeat)
            for j, s in zip(jobs, submitted)]


@dataclass
class Status:
    phase: str        # active | done | failed
    state: str        # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED by 0, TIMEOUT, ...
    detail: str = ""


def classify(queue_state: Optional[str], outcome: Optional[tuple], sacct_state: Optional[str]) -> Status:
    """A job's status from squeue (None: not listed), submitit's result pickle (None: none written) and sacct."""
    if outcome is not None:
        if outcome[0] == "success":
            return Status("done", FINAL_OK)
        last = [line for line in str(outcome[1]).strip().splitlines() if line.strip()]
        return Status("failed", sacct_state if sacct_state not in (None, "UNKNOWN", FINAL_OK) else "FAILED",
                      last[-1].strip() if last else "")
    if queue_state is not None:
        return Status("active", queue_state)
    if sacct_state in (None, "UNKNOWN"):
        return Status("failed", "GONE", "no longer in squeue, unknown to sacct, and no result written")
    if sacct_state.split()[0] in NOT_ENDED:
        return Status("active", sacct_state)   # just left squeue; sacct has not caught up yet
    return Status("failed", sacct_state, "the job ended without a result (killed, out of memory or time?)")


def queue_states() -> Dict[str, str]:
    """``squeue``'s state of every job (array tasks one by one) of this user: {job id: state}."""
    cmd = ["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format", "%i|%T"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"cannot ask SLURM for the submitted jobs ({e}); run this where squeue works") from None
    if r.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed: {r.stderr.strip()}; run this where squeue works")
    return dict(line.strip().split("|", 1) for line in r.stdout.splitlines() if "|" in line)


def statuses(records: Sequence[JobRecord]) -> Dict[str, Status]:
    """The status of each recorded job (one squeue call, sacct only for jobs that left the queue without a result)."""
    if not records:
        return {}
    from submitit.core.utils import pickle_load
    from submitit.slurm.slurm import SlurmJob
    queue = queue_states()
    out = {}
    for r in records:
        job = SlurmJob(folder=r.folder, job_id=r.job_id)
        pickle = job.paths.result_pickle
        outcome = _outcome(pickle, pickle_load)
        sacct = None
        left_without_result = outcome is None and r.job_id not in queue
        if left_without_result or (outcome is not None and outcome[0] != "success"):
            sacct = job.watcher.get_state(r.job_id, mode="force")
            if sacct == FINAL_OK and outcome is None:   # the result may lag on a network filesystem
                time.sleep(5)
                outcome = _outcome(pickle, pickle_load)
        out[r.job_id] = classify(queue.get(r.job_id), outcome, sacct)
    return out


def _outcome(pickle: Path, pickle_load) -> Optional[tuple]:
    try:
        pickle.parent.chmod(pickle.parent.stat().st_mode)   # refreshes NFS attribute caches, as submitit does
    except OSError:
        pass
    if not pickle.exists():
        return None
    try:
        return tuple(pickle_load(pickle))
    except EOFError:  # being written
        return None
