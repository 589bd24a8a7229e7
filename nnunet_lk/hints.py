"""Clear messages under the stock nnU-Net CLIs' own tracebacks.

Users run ``nnUNetv2_train`` / ``nnUNetv2_predict`` directly, so our code cannot wrap them. The ``.pth``
start-up hook (``env.py``) installs an excepthook instead: nnU-Net's traceback is printed as usual, then a
short diagnosis that names the problem and the fix. The diagnosis reads the failing frames' locals (which
folder, fold and checkpoint nnU-Net was loading, which input files it was given) and the files themselves;
it never writes anything."""
from __future__ import annotations

import os
import re
import sys
from types import TracebackType

PREFIX = "nnunet-lk:"
_NOT_FOUND = "Could not find requested nnunet trainer"


def trainer_not_found_hint(message: str) -> str | None:
    """What to tell a user whose -tr NAME nnU-Net could not find: close nnunet-lk names, and the fix."""
    if not message.startswith(_NOT_FOUND):
        return None
    import difflib
    match = re.search(rf"{_NOT_FOUND} (\S+)", message)
    requested = match.group(1) if match else ""
    from .training.trainers import all_trainers
    names = sorted(all_trainers())
    close = difflib.get_close_matches(requested, names, n=3, cutoff=0.6)
    lines = [f"{PREFIX} nnU-Net found no trainer named {requested!r}."]
    if close:
        lines.append(f"  Did you mean {', '.join(close)}?")
    lines.append("  `nnunet-lk list` shows every nnunet-lk trainer; `nnunet-lk doctor` checks that nnU-Net finds them")
    lines.append("  (if it does not: `nnunet-lk env --install` once, or `eval \"$(nnunet-lk env)\"` in this shell).")
    return "\n".join(lines)


def _frames(tb: TracebackType | None) -> dict:
    """function name -> locals of the innermost frame with that name, along the traceback."""
    found = {}
    while tb is not None:
        found[tb.tb_frame.f_code.co_name] = tb.tb_frame.f_locals
        tb = tb.tb_next
    return found


def checkpoint_hint(frames: dict) -> str | None:
    """nnUNetPredictor.initialize_from_trained_model_folder failed while loading a fold's checkpoint."""
    loading = frames.get("initialize_from_trained_model_folder")
    if not loading or "f" not in loading or "model_training_output_dir" not in loading:
        return None
    folder, fold = loading["model_training_output_dir"], loading["f"]
    name = loading.get("checkpoint_name", "checkpoint_final.pth")
    path = os.path.join(folder, f"fold_{fold}", name)
    fold_dir = os.path.dirname(path)
    if not os.path.isfile(path):
        present = sorted(p for p in os.listdir(fold_dir) if p.endswith(".pth")) if os.path.isdir(fold_dir) else []
        return (f"{PREFIX} {path} does not exist. Checkpoints in that fold: {present or 'none'}. Fix: finish the "
                f"training (nnUNetv2_train ... --c), pick another with -chk, or leave out folds that have none (-f).")
    from .errors import CheckpointError
    from .checkpoints import read_checkpoint
    try:
        read_checkpoint(path)
    except CheckpointError as e:
        return f"{PREFIX} cannot use fold {fold}'s checkpoint: {e}\n  Nothing was written."
    return None


def checkpoint_trainer_hint(trainer_name: str, checkpoint: str) -> str:
    """The trainer class a checkpoint names (its 'trainer_name', which nnU-Net builds the network from,
    whatever -tr says) cannot be found. No prefix: callers add theirs."""
    import difflib
    from .training.trainers import all_trainers
    ours = sorted(all_trainers())
    where = (f"{checkpoint} names the trainer {trainer_name!r} (its 'trainer_name' entry), and nnU-Net builds "
             f"the network from that class whatever -tr says.")
    if trainer_name in ours:
        return (f"{where} It is an nnunet-lk trainer, but nnU-Net's lookup does not see nnunet-lk's folder: run "
                f"`nnunet-lk env --install` once (or `eval \"$(nnunet-lk env)\"` in this shell), then `nnunet-lk "
                f"doctor`.")
    close = difflib.get_close_matches(trainer_name, ours, n=3, cutoff=0.6)
    return (f"{where} nnU-Net finds no class of that name (in nnunetv2 or on nnUNet_extTrainer). Fix: install the "
            f"package that defines {trainer_name} and put its folder on nnUNet_extTrainer; or, if the class was "
            f"renamed, set the checkpoint's 'trainer_name' to the class that built it (keep a copy of the file first)"
            + (f"; close nnunet-lk trainers: {', '.join(close)}." if close else "."))


def checkpoint_trainer_lookup_hint(message: str, frames: dict) -> str | None:
    """nnUNetv2_predict could not find the trainer named in the checkpoint it is loading."""
    loading = frames.get("initialize_from_trained_model_folder")
    if not message.startswith(_NOT_FOUND) or not loading or "trainer_name" not in loading:
        return None
    folds = loading.get("use_folds") or [loading.get("f")]
    fold = folds[0] if isinstance(folds, (list, tuple)) else folds
    path = os.path.join(loading["model_training_output_dir"], f"fold_{fold}",
                        loading.get("checkpoint_name", "checkpoint_final.pth"))
    return f"{PREFIX} {checkpoint_trainer_hint(loading['trainer_name'], path)}"


def channel_hint(frames: dict) -> str | None:
    """The input cases of nnUNetv2_predict do not have the channels the model was trained with."""
    for function in ("predict_from_files", "predict_from_files_sequential"):
        local = frames.get(function)
        if local and "self" in local:
            break
    else:
        return None
    predictor, given = local["self"], local.get("list_of_lists_or_source_folder")
    dataset_json = getattr(predictor, "dataset_json", None)
    if not isinstance(dataset_json, dict) or "channel_names" not in dataset_json:
        return None
    expected = sorted(int(c) for c in dataset_json["channel_names"])
    ending = dataset_json.get("file_ending", "")
    if isinstance(given, str) and os.path.isdir(given):
        from .nnunet_io import channel_files
        per_case = {case: [channel for channel, _ in files] for case, files in channel_files(given, ending).items()}
    elif isinstance(given, list):
        suffix = len("_0000" + ending)  # case id = first file name without _XXXX<ending>
        per_case = {os.path.basename(files[0])[:-suffix]: list(range(len(files))) for files in given if files}
    else:
        return None
    wrong = {case: ch for case, ch in per_case.items() if ch != expected}
    if not wrong:
        return None
    examples = ", ".join(f"{case} has {ch}" for case, ch in sorted(wrong.items())[:3])
    names = ", ".join(f"{int(c):04d}={n}" for c, n in sorted(dataset_json["channel_names"].items(),
                                                                key=lambda kv: int(kv[0])))
    return (f"{PREFIX} the input cases do not have the channels this model was trained with: it expects channels "
            f"{expected} ({names}), one file CASE_XXXX{ending} per channel, but {len(wrong)} of {len(per_case)} "
            f"cases differ ({examples}).\n  Fix: give every case exactly those channel files, in the training "
            f"order; a model for other channels needs its own dataset and training. Predictions already written "
            f"are kept.")


def _program() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the command"


def missing_model_folder_hint(frames: dict) -> str | None:
    """nnUNetv2_predict was pointed at a TRAINER__PLANS__CONFIGURATION folder that does not exist: name the
    trained ones beside it and the flag that selects them (most often -p, after training on derived plans)."""
    local = frames.get("initialize_from_trained_model_folder") or frames.get("auto_detect_available_folds")
    folder = (local or {}).get("model_training_output_dir")
    if not isinstance(folder, str) or os.path.isdir(folder):
        return None
    dataset_dir, name = os.path.split(os.path.normpath(folder))
    parts = name.split("__")
    if len(parts) != 3:
        return None
    trainer, plans, configuration = parts
    present = sorted(d for d in os.listdir(dataset_dir) if d.count("__") == 2
                     and os.path.isdir(os.path.join(dataset_dir, d))) if os.path.isdir(dataset_dir) else []
    split = [d.split("__") for d in present]
    other_plans = [p for t, p, c in split if t == trainer and c == configuration]
    other_configurations = [c for t, p, c in split if t == trainer and p == plans]
    if other_plans:
        fix = (f"add -p {other_plans[0]} (the plans {trainer} was trained with"
               + (f"; also trained: {', '.join(other_plans[1:])}" if other_plans[1:] else "") + ")")
    elif other_configurations:
        fix = f"{trainer} was trained for configuration {', '.join(other_configurations)}: use -c with it"
    elif present:
        fix = "name one of the trained models above with -tr, -p and -c, or train this one first (nnUNetv2_train)"
    else:
        fix = "train it first: nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER (-p PLANS)"
    return (f"{PREFIX} there is no trained model {name} (trainer {trainer}, plans {plans}, configuration "
            f"{configuration}) in {dataset_dir}.\n  Trained models there: {', '.join(present) or 'none'}.\n"
            f"  Fix: {fix}. Nothing was written.")


_NO_CUDA = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled", "No CUDA GPUs are available",
            "CUDA driver initialization failed")


def no_gpu_hint(exc: BaseException) -> str | None:
    """A stock command ran on its default device, CUDA, on a machine without a usable GPU."""
    torch = sys.modules.get("torch")
    if not any(m in str(exc) for m in _NO_CUDA) or torch is None or torch.cuda.is_available():
        return None
    program = _program()
    cpu_tips = (" On a CPU, nnUNetv2_predict is also much faster with --disable_tta -step_size 1 where that "
                "accuracy is not needed, and -npp 0 -nps 0 on a machine with few cores (README, Robustness)."
                if "predict" in program else "")
    return (f"{PREFIX} no CUDA GPU can be used here (torch.cuda.is_available() is False), and {program} runs "
            f"on CUDA unless told otherwise. Fix: add -device cpu.{cpu_tips}")


def hints(exc: BaseException, tb: TracebackType | None) -> list:
    frames = _frames(tb)
    found = []
    not_found = isinstance(exc, RuntimeError) and str(exc).startswith(_NOT_FOUND)
    from_checkpoint = not_found and "initialize_from_trained_model_folder" in frames
    for make in (lambda: trainer_not_found_hint(str(exc)) if not_found and not from_checkpoint else None,
                 lambda: checkpoint_trainer_lookup_hint(str(exc), frames) if from_checkpoint else None,
                 lambda: missing_model_folder_hint(frames), lambda: no_gpu_hint(exc),
                 lambda: checkpoint_hint(frames), lambda: channel_hint(frames)):
        try:
            message = make()
        except Exception:  # a diagnosis must never hide nnU-Net's own error
            message = None
        if message:
            found.append(message)
    return found


def install_excepthook() -> None:
    """Print our diagnosis under nnU-Net's own traceback (stock CLIs included); idempotent."""
    previous = sys.excepthook
    if getattr(previous, "nnunet_lk_hint", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        for message in hints(exc, tb):
            print(message, file=sys.stderr)

    hook.nnunet_lk_hint = True
    sys.excepthook = hook
