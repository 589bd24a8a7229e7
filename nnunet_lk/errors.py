"""Every error type of nnunet-lk, in one place (no imports, so blocks can raise them without cycles).

Each is a ``NnunetLkError``: a problem with the user's input, files or set-up whose message names the
problem and the fix. ``nnunet-lk`` prints these as one short line; anything else is a bug and keeps its
traceback. Each also derives from the built-in type callers have always caught (ValueError, RuntimeError)."""


class NnunetLkError(Exception):
    """Base of the errors whose message tells the user what to change."""


class UsageError(NnunetLkError, ValueError):
    """A command-line value, environment variable or folder that cannot be used as given."""


class NetworkConfigError(UsageError):
    """A plans configuration or option that a backbone cannot build; the message names the fix."""


class CheckpointError(NnunetLkError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class TrainerNotFoundError(UsageError):
    """nnU-Net's trainer lookup cannot find a trainer class by the name given (or recorded in a checkpoint)."""


class ExportError(NnunetLkError, RuntimeError):
    """An export that cannot be done or does not reproduce PyTorch; the message says why and what to do."""


class NonFiniteInputError(UsageError):
    """Input cases contain NaN/Inf voxels; the message names them and the fix."""


class TrainingFailed(NnunetLkError, RuntimeError):
    """nnUNetv2_train exited with a non-zero status (a job of ``ablate --run``); its log says why."""


class SlurmError(UsageError):
    """A --slurm-* option, an sbatch refusal or a SLURM that cannot be reached; the message names the fix."""


class StateFileError(UsageError):
    """The ablate job list cannot be read, or another call holds its lock; the message names the fix."""


class MissingExtraError(NnunetLkError, ImportError):
    """An optional dependency of one command is not installed; the message names the pip extra."""
