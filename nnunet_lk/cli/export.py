"""``nnunet-lk export`` (a trained fold as ONNX, checked with onnxruntime), ``nnunet-lk predict`` (nnU-Net's
predictor on a chosen engine: torch, compile, onnxruntime, openvino; ``nnunet_lk/engines.py``) and ``nnunet-lk
predict-onnx`` (the onnxruntime engine with a given ONNX file), ``nnunet-lk quantize`` (INT8 for the ONNX engines,
validated against fp32; ``nnunet_lk/quantize.py``). Same output files as ``nnUNetv2_predict``."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import CheckpointError


def _fold(value: str):
    return value if value == "all" else int(value)


class DeprecatedFlag(argparse.Action):
    """An old spelling kept for one release: it still works and says which flag replaces it."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"nnunet-lk: warning: {option_string} is deprecated and will be removed in the next release; use "
              f"{self.replacement} (nnU-Net's spelling)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_checkpoint_flag(p) -> None:
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file in the fold folder (default: checkpoint_final.pth), as nnUNetv2_predict -chk")
    p.add_argument("-c", "--checkpoint", dest="checkpoint", action=DeprecatedFlag, replacement="-chk",
                   help=argparse.SUPPRESS)


def cmd_export(args) -> int:
    from ..export import ExportError, export_model_folder
    try:
        export_model_folder(args.results_folder, args.fold, args.output, checkpoint_name=args.checkpoint,
                            tolerance=args.tolerance, opset=args.opset)
    except (ExportError, CheckpointError) as e:
        print(f"nnunet-lk export: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_quantize(args) -> int:
    from ..errors import ExportError, UsageError
    from ..quantize import quantize_model_folder
    from .. import settings
    settings.mark_prediction_process()
    threads = args.threads or settings.cpu_threads(settings.usable_cores())
    try:
        report = quantize_model_folder(args.results_folder, args.fold, checkpoint_name=args.checkpoint,
                                       n_patches=args.calibration_patches, max_drop=args.max_drop,
                                       use_mirroring=not args.disable_tta, threads=threads, ops=args.ops,
                                       reduce_range=args.reduce_range, log=lambda m: print(m, file=sys.stderr))
    except (ExportError, CheckpointError, UsageError) as e:
        print(f"nnunet-lk quantize: error: {e}", file=sys.stderr)
        return 1
    return 0 if report["accepted"] else 1


def cmd_predict_onnx(args) -> int:
    args.engine = "onnxruntime"
    return cmd_predict(args, command="nnunet-lk predict-onnx")


def cmd_predict(args, command: str = "nnunet-lk predict") -> int:
    from ..engines import engine_predictor
    from ..errors import UsageError
    from ..export import ExportError
    from ..interrupt import install as end_on_interrupt
    from ..nonfinite_inputs import NonFiniteInputError, refuse_non_finite_inputs
    from .. import settings
    settings.mark_prediction_process()
    threads = args.threads or settings.cpu_threads(settings.usable_cores())
    try:
        onnx_path = args.onnx
        if getattr(args, "int8", False):
            from ..engines import ONNX_ENGINES
            from ..quantize import accepted_int8_model
            if args.engine not in ONNX_ENGINES or args.onnx:
                raise UsageError("--int8 runs the fold's accepted INT8 model (nnunet-lk quantize) on --engine "
                                 "onnxruntime or openvino, without --onnx")
            onnx_path = accepted_int8_model(args.model_folder, args.fold, args.checkpoint,
                                            log=lambda m: print(m, file=sys.stderr))
        predictor = engine_predictor(args.model_folder, args.fold, args.engine, onnx_path=onnx_path,
                                     checkpoint_name=args.checkpoint, use_mirroring=not args.disable_tta,
                                     tile_step_size=args.step_size, threads=threads, verbose=args.verbose,
                                     log=lambda m: print(m, file=sys.stderr))
        inputs, damaged = _undamaged_inputs(args.input, predictor.dataset_json["file_ending"])
        refuse_non_finite_inputs(args.input, predictor, skip=damaged)
    except (ExportError, CheckpointError, NonFiniteInputError, UsageError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)  # nnU-Net's sequential path expects it
    end_on_interrupt(args.output, command)
    if inputs:
        _predict(predictor, inputs, args)
    if damaged:
        listed = "; ".join(f"{case}: " + ", ".join(f"{name} is {problem}" for name, problem in files.items())
                           for case, files in damaged.items())
        print(f"{command}: error: {len(damaged)} input case(s) in {args.input} are damaged and were "
              f"not predicted ({listed}). Replace their files (`gzip -t FILE` checks a .gz) and run again with "
              f"--continue_prediction; the other {len(inputs)} case(s) are "
              f"in {args.output}.", file=sys.stderr)
        return 1
    return 0


def _undamaged_inputs(folder: str, file_ending: str):
    """(what to predict, damaged cases): the folder itself when every case is intact, else the intact cases'
    file lists (nnU-Net names their outputs as it would from the folder)."""
    from ..file_integrity import damaged_cases
    from ..nnunet_io import cases_in_folder
    if not os.path.isdir(folder):
        return folder, {}  # nnU-Net's predictor reports a missing input folder itself
    damaged = damaged_cases(folder, file_ending)
    if not damaged:
        return folder, {}
    return [files for case, files in cases_in_folder(folder, file_ending).items() if case not in damaged], damaged


def _predict(predictor, inputs, args) -> None:
    if args.npp == 0 or args.nps == 0:
        predictor.predict_from_files_sequential(inputs, args.output, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction)
    else:
        predictor.predict_from_files(inputs, args.output, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained fold to ONNX (dynamic batch and spatial axes), checked with onnxruntime",
        description="Build the fold's network as nnUNetv2_predict does (deep supervision off, strict load, eval: "
                    "re-parameterised), export it to ONNX and compare with onnxruntime on the plans' patch size. "
                    "Writes MODEL.onnx and MODEL.json (patch size, spacing, channels, labels, normalisation); for "
                    "a network with a faster static form (LM-Net in 3D) also MODEL.patch.onnx, the network at the "
                    "one input shape nnU-Net's sliding window feeds, which the ONNX engines run for it.")
    p.add_argument("results_folder", help="nnU-Net model folder: nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG")
    p.add_argument("-f", "--fold", type=_fold, required=True, help="fold number or 'all'")
    add_checkpoint_flag(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write (the sidecar goes beside it)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |PyTorch - onnxruntime| logit difference (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "predict", help="nnUNetv2_predict on a CPU engine: torch, compile (torch.compile), onnxruntime or openvino",
        description="nnU-Net's own predictor (preprocessing, sliding window, mirroring, resampling, export) with "
                    "the network's forward on the chosen engine, for any nnU-Net model folder (nnunet-lk backbones "
                    "and stock nnU-Net). The ONNX engines export the fold once (fold_F/model.onnx, checked against "
                    "PyTorch; again when the checkpoint changed or an older nnunet-lk exported it) unless --onnx "
                    "names a file. Inputs are checked as for predict-onnx.")
    p.add_argument("--engine", choices=("torch", "compile", "onnxruntime", "openvino"), default="torch",
                   help="torch: eager (as nnUNetv2_predict -device cpu); compile: torch.compile (inductor); "
                        "onnxruntime (pip extra export); openvino (pip extra openvino). Default torch")
    p.add_argument("--onnx", help="ONNX engines: the .onnx file `nnunet-lk export` wrote (default: "
                                  "fold_F/model.onnx, exported on first use)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX engines: the fold's INT8 model (fold_F/model.int8.onnx), only if `nnunet-lk quantize` "
                        "accepted it for the checkpoint there now")
    _prediction_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser(
        "quantize", help="INT8 for the ONNX engines: calibrated on the fold's training cases, accepted only where "
                         "the validation Dice stays within --max-drop of fp32",
        description="ONNX Runtime static quantisation (QDQ: int8 weights per channel, uint8 activations) of the "
                    "fold's exported model (fold_F/model.onnx, exported first if missing or outdated), calibrated "
                    "on patches of the fold's preprocessed training cases (nnUNet_preprocessed, splits_final.json). "
                    "nnU-Net's "
                    "predictor then runs fp32 and INT8 on the fold's validation cases (nnUNet_raw) and nnU-Net's "
                    "metrics score both. Writes fold_F/model.int8.onnx and model.int8.json; exit status 0 when "
                    "accepted (foreground Dice drop <= --max-drop), 1 otherwise (predict --int8 then refuses it).")
    p.add_argument("results_folder", help="nnU-Net model folder: nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG")
    p.add_argument("-f", "--fold", type=_fold, required=True, help="fold number (its validation cases are the check)")
    add_checkpoint_flag(p)
    p.add_argument("--calibration-patches", type=int, default=64,
                   help="patches of the plans' patch size cut from the training cases (default 64)")
    p.add_argument("--max-drop", type=float, default=0.005,
                   help="largest accepted foreground Dice drop against fp32 (default 0.005)")
    p.add_argument("--ops", choices=["all", "conv"], default="all",
                   help="what to quantise: every operator ONNX Runtime can (default), or only convolutions (fewer "
                        "quantise/dequantise pairs: faster for stock nnU-Net in OpenVINO, slower for DLKUNet)")
    p.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                   help="7-bit weights, against the saturation of int8 kernels on x86 CPUs without VNNI; auto "
                        "(default): on unless this CPU has VNNI")
    p.add_argument("--disable_tta", action="store_true", help="validate without mirroring (faster)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime's threads (default: NNUNET_LK_THREADS, else the cores idle now)")
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser(
        "predict-onnx", help="nnUNetv2_predict with the network replaced by an exported ONNX model",
        description="nnU-Net's own predictor (preprocessing, sliding window, mirroring, resampling, export) "
                    "with onnxruntime computing the logits (`nnunet-lk predict --engine onnxruntime --onnx FILE`). "
                    "Input cases with NaN/Inf voxels are refused before "
                    "anything is predicted; truncated or corrupt files are named and left out, the other cases "
                    "predicted, and the exit status is 1. One Ctrl-C ends it, keeping every complete output.")
    p.add_argument("--onnx", required=True, help="the .onnx file written by `nnunet-lk export`")
    _prediction_arguments(p)
    p.set_defaults(func=cmd_predict_onnx)


def _prediction_arguments(p) -> None:
    """What predict and predict-onnx take, spelled as nnUNetv2_predict spells it."""
    p.add_argument("-i", "--input", required=True, help="folder of images named as for nnUNetv2_predict")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-m", "--model-folder", required=True, help="the nnU-Net model folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("-f", "--fold", type=_fold, required=True, help="the fold to predict with (one)")
    add_checkpoint_flag(p)
    p.add_argument("-step_size", dest="step_size", type=float, default=0.5,
                   help="sliding-window step (nnU-Net's default 0.5), as nnUNetv2_predict -step_size")
    p.add_argument("--step_size", dest="step_size", type=float, action=DeprecatedFlag, replacement="-step_size",
                   help=argparse.SUPPRESS)
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (as nnUNetv2_predict --disable_tta)")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    p.add_argument("-npp", type=int, default=1, help="preprocessing processes (0: no multiprocessing)")
    p.add_argument("-nps", type=int, default=1, help="export processes (0: no multiprocessing)")
    p.add_argument("--threads", type=int, default=None,
                   help="the engine's threads (default: NNUNET_LK_THREADS, else the cores idle now)")
    p.add_argument("--verbose", action="store_true")
