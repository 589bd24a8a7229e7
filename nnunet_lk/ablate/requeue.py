"""The SLURM job callable that submitit requeues at its time limit (``--requeue``): SLURM signals the job,
submitit calls ``checkpoint()`` and requeues it, and it resumes with ``--c``. Its own module because it
subclasses submitit's ``Checkpointable``, and submitit is the ``slurm`` extra: only the slurm executor imports
it."""
from __future__ import annotations

from dataclasses import replace

from submitit.helpers import Checkpointable, DelayedSubmission

from .jobs import TrainFold


class RequeueableTrainFold(TrainFold, Checkpointable):
    """:class:`TrainFold` that submitit requeues when SLURM signals the time limit; it resumes with ``--c``."""

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(RequeueableTrainFold(replace(self.job, action="resume")))
