"""The jobs ``nnunet-lk ablate --run --executor slurm`` submitted, kept in the output folder
(``ablate_jobs.json``) so that a later call neither submits a pending or running job again nor forgets to report
one that failed. Reads and writes happen under an exclusive lock (``.ablate_jobs.lock``), so two calls on the
same output folder never submit the same fold twice."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, List

from ..errors import StateFileError  # noqa: F401  (public here too)
from .results import FoldJobLabels

STATE_NAME = "ablate_jobs.json"
LOCK_NAME = ".ablate_jobs.lock"
VERSION = 1


@dataclass
class JobRecord(FoldJobLabels):
    """One submitted (trainer, configuration, fold, repeat) job."""
    executor: str
    job_id: str
    dataset: str
    plans: str
    configuration: str
    trainer: str
    fold: int
    action: str
    path: str            # the fold folder
    folder: str          # submitit's job folder (with %j); its logs and result pickle live there
    stdout: str
    stderr: str
    submitted: float
    repeat: int = 0

    def belongs_to(self, dataset: str, plans: str, configuration: str) -> bool:
        return (self.dataset, self.plans, self.configuration) == (dataset, plans, configuration)


def state_path(output) -> Path:
    return Path(output) / STATE_NAME


def load(output) -> List[JobRecord]:
    """The recorded jobs ([] when there is no state file yet)."""
    path = state_path(output)
    if not path.is_file():
        return []
    names = {f.name for f in fields(JobRecord)}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise KeyError(f"version {data.get('version')!r}, expected {VERSION}")
        return [JobRecord(**{k: v for k, v in job.items() if k in names}) for job in data["jobs"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StateFileError(
            f"{path} is not a job list this version of nnunet-lk wrote ({e}). Check with squeue that none of the "
            f"jobs it lists still runs, then delete it; the next call plans from the results folders.") from None


def save(output, records: List[JobRecord]) -> None:
    """Write the state file atomically (a reader never sees half a file)."""
    path = state_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": VERSION, "updated": time.time(),
                               "jobs": [asdict(r) for r in records]}, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(output, timeout: float = 600.0) -> Iterator[None]:
    """Hold the output folder's job lock: one call at a time checks the queue and submits."""
    Path(output).mkdir(parents=True, exist_ok=True)
    with open(Path(output) / LOCK_NAME, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateFileError(f"another `nnunet-lk ablate --run` has held {handle.name} for {timeout:.0f} "
                                         f"s; wait for it to finish submitting, or use another -o folder") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
