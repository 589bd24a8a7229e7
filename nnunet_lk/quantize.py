"""INT8 for the ONNX engines: ONNX Runtime's static post-training quantisation of a fold's exported model, calibrated
on the fold's own training cases and accepted only where nnU-Net's foreground Dice on the fold's validation cases
drops by at most ``max_drop`` against the fp32 model.

- Calibration: patches of the plans' patch size cut from the preprocessed training cases of the fold
  (``splits_final.json``), half of them centred on a foreground voxel (activations of the structures that matter
  reach the calibrated ranges), the rest anywhere; zero-padded where a case is smaller, as nnU-Net's sliding
  window pads.
- What is quantised (``ops``): ``all`` operators ONNX Runtime can quantise (convolutions, and the elementwise
  operators, pooling, resizing and concatenations between them), or only the ``conv``\ olutions. On Hippocampus
  ``conv`` made stock nnU-Net's INT8 model 17 % faster in OpenVINO (no quantise/dequantise pairs around its
  float normalisations), and DLKUNet-M's 40 % slower (its elementwise gates then run between float and int8):
  time the fold's model.int8.onnx with ``benchmarks/engines.py`` to choose.
- Quantisation: QDQ format, int8 weights per output channel, uint8 activations, min/max calibration (ONNX
  Runtime's defaults for x86 with VNNI). On an x86 CPU without VNNI (AVX2 or AVX-512 alone) ONNX Runtime's
  uint8 x int8 kernels add pairs of products in 16 bits, which saturate: there the weights are quantised to 7 bits
  (``reduce_range``; ``auto``, the default, chooses it from the CPU). A trained LM-Net fold lost 0.082 Dice on
  an AVX2 CPU with 8-bit weights and 0.0024 with 7-bit ones. The report records the choice; ``predict --int8`` warns when a model made with 8-bit
  weights runs on a CPU without VNNI. Normalisation and softmax stay in float, and so do the first convolution
  (it sees the intensities) and the last (the logits): on a trained LM-Net fold that halved the Dice lost
  (0.0058 to 0.0031; percentile calibration lost more, 0.0090).
- Validation: nnU-Net's predictor on the fold's validation cases (raw images of ``nnUNet_raw``), once on the fp32
  model and once on the INT8 one, scored by nnU-Net's own ``compute_metrics`` against the reference labels.

Files, beside the fold's fp32 ``model.onnx``: ``model.int8.onnx`` and ``model.int8.json`` (what was calibrated,
both Dice scores, the verdict). ``nnunet-lk predict --int8`` runs only an accepted model, and only for the
checkpoint it was made from."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .checkpoints import checkpoint_stamp, same_checkpoint
from .errors import UsageError
from .extras import require_extra
from .model_folder import fold_folder

DEFAULT_MAX_DROP = 0.005
DEFAULT_CALIBRATION_PATCHES = 64
SIDECAR_FORMAT = "nnunet-lk int8 1"
# what `ops` quantises: None = every operator type ONNX Runtime's QDQ quantiser supports
QUANTIZED_OPS = {"all": None, "conv": ["Conv"]}
REDUCE_RANGE_CHOICES = ("auto", "on", "off")
X86_MACHINES = {"x86_64", "amd64", "i386", "i686", "x86"}


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this x86 CPU has VNNI (``avx512_vnni`` or ``avx_vnni``): True/False from Linux's cpuinfo flags,
    None where they cannot be read or the CPU is not x86 (other CPUs' int8 kernels do not saturate this way)."""
    import platform
    if platform.machine().lower() not in X86_MACHINES:
        return None
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags))


def resolve_reduce_range(choice: str, vnni: Optional[bool]) -> bool:
    """``--reduce-range``: ``on``/``off`` as given; ``auto`` = 7-bit weights unless the CPU is known to have VNNI
    or is not x86 (an x86 CPU whose flags cannot be read is taken to lack it: 7 bits lose little, saturation
    loses much)."""
    if choice not in REDUCE_RANGE_CHOICES:
        raise UsageError(f"--reduce-range {choice!r}: choose one of {', '.join(REDUCE_RANGE_CHOICES)}")
    if choice != "auto":
        return choice == "on"
    import platform
    return vnni is False or (vnni is None and platform.machine().lower() in X86_MACHINES)


def int8_path(results_folder: str, fold) -> str:
    return os.path.join(fold_folder(results_folder, fold), "model.int8.onnx")


def report_path(onnx_path: str) -> str:
    return onnx_path[:-len(".onnx")] + ".json"


# ---- calibration data ------------------------------------------------------------------------------------------
def _environment_folder(variable: str, purpose: str) -> str:
    folder = os.environ.get(variable)
    if not folder or not os.path.isdir(folder):
        raise UsageError(f"{purpose} reads {variable}, which is {'unset' if not folder else 'not a folder: ' + folder}"
                         f": set it to the folder nnU-Net used for this dataset")
    return folder


def fold_split(dataset_name: str, fold: int) -> Dict[str, List[str]]:
    """The fold's training and validation case identifiers from nnU-Net's ``splits_final.json``."""
    folder = _environment_folder("nnUNet_preprocessed", "quantisation (calibration on the fold's training cases)")
    path = os.path.join(folder, dataset_name, "splits_final.json")
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist: the fold's cases come from nnU-Net's splits (written by "
                         f"nnUNetv2_train); run the training first, or set nnUNet_preprocessed to where it ran")
    with open(path) as f:
        splits = json.load(f)
    if not 0 <= fold < len(splits):
        raise UsageError(f"{path} has {len(splits)} folds; fold {fold} is not one of them")
    return {"train": list(splits[fold]["train"]), "val": list(splits[fold]["val"])}


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[:, start:start + size]`` per spatial axis, zero where the window leaves the array."""
    out = np.zeros((array.shape[0], *size), dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, n, dim in zip(start, size, array.shape[1:]):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def calibration_patches(data_folder: str, identifiers: Sequence[str], patch_size: Sequence[int], n_patches: int,
                        seed: int = 0) -> List[np.ndarray]:
    """``n_patches`` arrays (1, C, *patch_size) from nnU-Net's preprocessed cases, cycling over ``identifiers``;
    every other one centred on a random foreground voxel. A 2D patch is cut from one slice (nnU-Net's 2d
    configuration shares the 3D preprocessed arrays)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(data_folder)(data_folder, list(identifiers))
    rng = np.random.default_rng(seed)
    patches, ndim = [], len(patch_size)
    for i in range(n_patches):
        data, seg, _, _ = dataset.load_case(identifiers[i % len(identifiers)])
        data, seg = np.asarray(data, dtype=np.float32), np.asarray(seg)
        foreground = np.argwhere(seg[0] > 0)
        if i % 2 == 0 and len(foreground):
            centre = foreground[rng.integers(len(foreground))]
        else:
            centre = np.array([rng.integers(s) for s in seg.shape[1:]])
        if ndim == 2:  # one slice of the (C, Z, Y, X) array
            data, centre = data[:, int(centre[0])], centre[1:]
        start = [int(c) - p // 2 for c, p in zip(centre, patch_size)]
        start = [min(max(s, min(0, d - p)), max(d - p, 0)) for s, d, p in zip(start, data.shape[1:], patch_size)]
        patches.append(_crop(data, start, patch_size)[None])
    return patches


# ---- quantisation ----------------------------------------------------------------------------------------------
def quantize_onnx(fp32_path: str, output: str, patches: Sequence[np.ndarray], ops: str = "all",
                  reduce_range: bool = False) -> None:
    """ONNX Runtime static quantisation (QDQ, per-channel int8 weights, uint8 activations, min/max ranges) of the
    operator types ``ops`` names (:data:`QUANTIZED_OPS`), the first and the last convolution left in float;
    ``reduce_range``: 7-bit weights (for x86 CPUs without VNNI)."""
    if ops not in QUANTIZED_OPS:
        raise UsageError(f"--ops {ops!r}: choose one of {', '.join(QUANTIZED_OPS)}")
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from .export import INPUT_NAME

    class Patches(CalibrationDataReader):
        def __init__(self):
            self._next = iter(patches)

        def get_next(self):
            patch = next(self._next, None)
            return None if patch is None else {INPUT_NAME: patch}

    convs = [node.name for node in onnx.load(fp32_path, load_external_data=False).graph.node if node.op_type == "Conv"]
    float_convs = sorted({convs[0], convs[-1]}) if convs else []
    tmp = output + ".partial"  # ONNX Runtime writes its augmented calibration model to a temporary folder itself
    quantize_static(fp32_path, tmp, Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_convs,
                    op_types_to_quantize=QUANTIZED_OPS[ops], reduce_range=reduce_range)
    os.replace(tmp, output)


# ---- validation ------------------------------------------------------------------------------------------------
def validation_dice(results_folder: str, fold: int, onnx_path: str, cases: Sequence[str], raw_files: dict,
                    output_folder: str, use_mirroring: bool, threads: Optional[int]) -> dict:
    """nnU-Net's predictor on ``cases`` with the network on ``onnx_path`` (ONNX Runtime), scored by nnU-Net's
    ``compute_metrics``: foreground Dice (mean over classes of the mean over cases, as nnU-Net's summary) and
    each case's foreground Dice."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from .engines import onnx_predictor
    predictor = onnx_predictor(results_folder, onnx_path, fold, use_mirroring=use_mirroring, threads=threads)
    ending = predictor.dataset_json["file_ending"]
    os.makedirs(output_folder, exist_ok=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's per-case prints
        predictor.predict_from_files_sequential([raw_files[c]["images"] for c in cases], output_folder,
                                                save_probabilities=False, overwrite=True)
    seconds = time.perf_counter() - start
    labels = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    regions = labels.foreground_regions if labels.has_regions else labels.foreground_labels
    reader = predictor.plans_manager.image_reader_writer_class()
    per_case = {}
    for case in cases:
        result = compute_metrics(raw_files[case]["label"], os.path.join(output_folder, case + ending), reader,
                                 regions, labels.ignore_label)
        per_case[case] = {str(r): float(result["metrics"][r]["Dice"]) for r in regions}
    per_region = [np.nanmean([per_case[c][str(r)] for c in cases]) for r in regions]
    return {"foreground_dice": float(np.mean(per_region)),
            "case_foreground_dice": {c: float(np.nanmean(list(d.values()))) for c, d in per_case.items()},
            "seconds_per_case": seconds / max(len(cases), 1)}


# ---- the command -----------------------------------------------------------------------------------------------
def quantize_model_folder(results_folder: str, fold, *, checkpoint_name: str = "checkpoint_final.pth",
                          n_patches: int = DEFAULT_CALIBRATION_PATCHES, max_drop: float = DEFAULT_MAX_DROP,
                          use_mirroring: bool = True, threads: Optional[int] = None, seed: int = 0,
                          ops: str = "all", reduce_range: str = "auto", log=print) -> dict:
    """``nnunet-lk quantize``: export the fold if needed, quantise it, validate both models, write the report.
    Returns the report; ``report["accepted"]`` says whether ``predict --int8`` may use the model."""
    require_extra("export", "nnunet-lk quantize")
    if fold == "all":
        raise UsageError("fold 'all' has no validation cases to check INT8 against fp32 on: quantise a numbered fold")
    if n_patches < 1:
        raise UsageError(f"--calibration-patches {n_patches}: give at least 1")
    if ops not in QUANTIZED_OPS:
        raise UsageError(f"--ops {ops!r}: choose one of {', '.join(QUANTIZED_OPS)}")
    vnni = cpu_has_vnni()
    seven_bit = resolve_reduce_range(reduce_range, vnni)
    fold = int(fold)
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from .export import fold_export
    from .model_folder import load_fold

    loaded = load_fold(results_folder, fold, checkpoint_name)
    dataset = loaded.plans_manager.dataset_name
    split = fold_split(dataset, fold)
    if not split["val"]:
        raise UsageError(f"fold {fold} of {dataset} has no validation cases in splits_final.json")
    data_folder = os.path.join(os.environ["nnUNet_preprocessed"], dataset, loaded.configuration_manager.data_identifier)
    if not os.path.isdir(data_folder):
        raise UsageError(f"{data_folder} does not exist: calibration reads the preprocessed training cases "
                         f"(nnUNetv2_plan_and_preprocess / nnUNetv2_preprocess for plans "
                         f"{loaded.plans_manager.plans_name}, configuration {loaded.configuration})")
    raw_folder = os.path.join(_environment_folder("nnUNet_raw", "INT8 validation (the fold's validation cases)"),
                              dataset)
    raw_files = get_filenames_of_train_images_and_targets(raw_folder, loaded.dataset_json)
    missing = [c for c in split["val"] if c not in raw_files]
    if missing:
        raise UsageError(f"{raw_folder} lacks the validation case(s) {', '.join(missing[:5])}: point nnUNet_raw at "
                         f"the dataset the fold was trained on")

    fp32 = fold_export(results_folder, fold, checkpoint_name, "the fp32 model INT8 is made from and compared with",
                       log=log)
    patch_size = [int(p) for p in loaded.configuration_manager.patch_size]
    patches = calibration_patches(data_folder, split["train"], patch_size, n_patches, seed)
    int8 = int8_path(results_folder, fold)
    log(f"calibrating on {n_patches} patches {patch_size} of {len(split['train'])} training cases; "
        f"{7 if seven_bit else 8}-bit weights (--reduce-range {reduce_range}, CPU VNNI: "
        f"{'unknown' if vnni is None else 'yes' if vnni else 'no'})")
    quantize_onnx(fp32, int8, patches, ops, reduce_range=seven_bit)

    log(f"validating fp32 and INT8 on the {len(split['val'])} validation cases of fold {fold}")
    with tempfile.TemporaryDirectory() as scratch:
        scores = {name: validation_dice(results_folder, fold, path, split["val"], raw_files,
                                        os.path.join(scratch, name), use_mirroring, threads)
                  for name, path in (("fp32", fp32), ("int8", int8))}
    drop = scores["fp32"]["foreground_dice"] - scores["int8"]["foreground_dice"]
    accepted = bool(drop <= max_drop)
    report = {
        "format": SIDECAR_FORMAT, "model": os.path.abspath(int8), "fp32_model": os.path.abspath(fp32),
        "checkpoint": checkpoint_stamp(loaded.checkpoint_path), "fold": fold,
        "quantisation": {"runtime": "onnxruntime", "format": "QDQ", "weights": "int8 per channel",
                         "activations": "uint8", "calibration": "min/max", "ops": ops,
                         "reduce_range": seven_bit, "reduce_range_choice": reduce_range, "cpu_vnni": vnni,
                         "float": ("normalisation, softmax, the first and the last convolution"
                                   + ("" if ops == "all" else ", every operator but convolutions"))},
        "calibration": {"patches": n_patches, "patch_size": patch_size, "cases": len(split["train"]), "seed": seed,
                        "source": data_folder},
        "validation": {"cases": list(split["val"]), "mirroring": use_mirroring,
                       "fp32_foreground_dice": scores["fp32"]["foreground_dice"],
                       "int8_foreground_dice": scores["int8"]["foreground_dice"],
                       "case_foreground_dice": {k: v["case_foreground_dice"] for k, v in scores.items()},
                       "seconds_per_case_sequential": {k: v["seconds_per_case"] for k, v in scores.items()}},
        "dice_drop": drop, "max_drop": max_drop, "accepted": accepted,
    }
    with open(report_path(int8), "w") as f:
        json.dump(report, f, indent=2)
    log(f"foreground Dice on {len(split['val'])} validation cases: fp32 {scores['fp32']['foreground_dice']:.4f}, "
        f"INT8 {scores['int8']['foreground_dice']:.4f} (drop {drop:+.4f}, limit {max_drop}): "
        + ("accepted; `nnunet-lk predict --int8` uses it" if accepted else "NOT accepted; predict --int8 refuses it"))
    return report


def saturation_warning(report: dict, vnni: Optional[bool]) -> Optional[str]:
    """What to say when a model with 8-bit weights (accepted on a CPU with VNNI) is to run on a CPU without it,
    where ONNX Runtime's int8 kernels may saturate and the accepted Dice need not hold."""
    if report.get("quantisation", {}).get("reduce_range", False) or vnni is not False:
        return None
    return ("this INT8 model has 8-bit weights and this CPU lacks VNNI: its int8 kernels may saturate, and the "
            "Dice it was accepted with need not hold here. Run `nnunet-lk quantize` on this machine (it then "
            "quantises to 7 bits) or predict in fp32")


def accepted_int8_model(results_folder: str, fold, checkpoint_name: str = "checkpoint_final.pth",
                        log=None) -> str:
    """The fold's INT8 model for ``predict --int8``: it must exist, have been accepted, and come from the
    checkpoint that is there now. ``log`` hears :func:`saturation_warning`."""
    if fold == "all":
        raise UsageError("--int8 needs a numbered fold (INT8 models are validated on a fold's validation cases)")
    path = int8_path(results_folder, fold)
    report = report_path(path)
    make = f"nnunet-lk quantize {results_folder} -f {fold}"
    if not (os.path.isfile(path) and os.path.isfile(report)):
        raise UsageError(f"{path} (with its report) does not exist: make it with `{make}` first")
    with open(report) as f:
        info = json.load(f)
    if not info.get("accepted"):
        raise UsageError(f"{path} was not accepted: its foreground Dice dropped by {info['dice_drop']:.4f} against "
                         f"fp32 on the fold's validation cases (limit {info['max_drop']}). Predict in fp32 (no --int8)")
    checkpoint = os.path.join(fold_folder(results_folder, fold), checkpoint_name)
    if not os.path.isfile(checkpoint) or not same_checkpoint(checkpoint_stamp(checkpoint), info["checkpoint"]):
        raise UsageError(f"{path} was made from another {checkpoint_name} than the one in fold_{fold} now: "
                         f"run `{make}` again (it exports the fold again first)")
    warning = saturation_warning(info, cpu_has_vnni())
    if warning and log is not None:
        log(f"warning: {warning}")
    return path
