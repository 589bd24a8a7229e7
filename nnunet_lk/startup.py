"""What every Python of this environment runs at start-up (the ``.pth`` hook, ``env.HOOK_LINE``) and what
``nnunet-lk`` runs first: nnU-Net's trainer folder on ``nnUNet_extTrainer``, then our diagnosis under the
stock CLIs' tracebacks, then the checks that only help before a stock command starts (the input files of
``nnUNetv2_predict``, which nnU-Net reads without noticing damage; a Ctrl-C that ends it at once,
``interrupt.py``).

It must stay cheap and silent for every other Python (nnU-Net's worker processes included): the checks
run only when the program is one of the stock prediction commands, and nothing here may raise."""
from __future__ import annotations

import os
import sys

PREDICT_COMMANDS = ("nnUNetv2_predict", "nnUNetv2_predict_from_modelfolder")
_started = False


def start(argv=None) -> None:
    """Idempotent: a second call (a .pth file seen twice, our CLI after the hook) does nothing more."""
    global _started
    if _started:
        return
    _started = True
    try:
        from . import env
        env.ensure_environment()
        from .hints import install_excepthook
        install_excepthook()
        argv = sys.argv if argv is None else argv
        if argv and os.path.basename(str(argv[0])) in PREDICT_COMMANDS:
            from .settings import mark_prediction_process
            mark_prediction_process()
            warn_about_damaged_inputs(argv[1:])
            from .interrupt import install
            install(flag_value(argv[1:], "-o"), os.path.basename(str(argv[0])))
    except Exception:  # never break interpreter start-up
        pass


def flag_value(args, flag: str) -> str | None:
    """The value of ``flag`` (``-i``, ``-o``) in a stock command line, as argparse reads it."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def warn_about_damaged_inputs(args) -> None:
    """Before nnUNetv2_predict starts: name input files that are truncated (nnU-Net would segment what is
    left of them and exit 0). The structural check only: header and the gzip trailer, no decompression."""
    folder = flag_value(args, "-i")
    if not folder or not os.path.isdir(folder):
        return
    from .file_integrity import damaged_files, damage_report
    found = damaged_files(folder, full=False)
    if found:
        print(f"nnunet-lk: warning: {damage_report(found, folder)} nnUNetv2_predict does not notice this: it "
              f"segments what is left of each file and exits 0. Replace these files (`gzip -t FILE` checks a "
              f".gz), or move their cases out of -i; `nnunet-lk predict-onnx` refuses them by itself.",
              file=sys.stderr)
