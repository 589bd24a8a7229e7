"""ONNX export of a trained nnU-Net fold, and nnU-Net's own predictor running the ONNX model.

Export (``nnunet-lk export``): the fold is loaded as ``nnUNetv2_predict`` loads it (``model_folder.load_fold``:
checkpoint read with clear errors, trainer class by nnU-Net's own lookup, network built statically with deep
supervision off and loaded strictly).
``.eval()`` puts it in inference form (``ReparamDepthwise`` branches fused into one conv); on large patches
GroupNorm and InstanceNorm are exported as ``AxiswiseGroupNorm`` (same function, accurate in onnxruntime).

How the graph gets dynamic spatial axes: every network needs spatial sizes that are multiples of its
total stride (``LKUNet`` pads to ``size_multiple`` inside ``forward``; stock nnU-Net relies on the
plans' patch). Tracing that Python shape logic with symbolic sizes specialises it (``round``, ``if
any(pad)``), so the traced core is the network on sizes ``multiple * k`` (torch.export derived
dimensions: every shape test inside is then provable for all ``k``), and the end padding and the crop
back are added around it as ONNX ``Pad``/``Slice`` nodes. The resulting model takes any batch and any
spatial size, like the PyTorch network.

Check: onnxruntime against PyTorch on random inputs of the plans' patch size and on an odd size that
needs padding; the largest absolute logit difference is printed and must stay under a tolerance.

The patch model: a network with a static export form (``has_static_form``: LM-Net's 3D attention, whose sliced
form only exports in useful time at constant sizes) is also exported at the one input shape nnU-Net's sliding window
feeds (batch 1, the plans' patch), checked the same way and named in the sidecar; the ONNX engines run it for that
shape and the general model for any other.

Prediction with the exported model (``nnunet-lk predict-onnx``, ``predict --engine``): ``engines``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .blocks.ops import with_axiswise_norms
from .errors import ExportError
from .extras import require_extra
from .checkpoints import checkpoint_stamp, same_checkpoint
from .model_folder import LoadedFold, fold_folder, load_fold

DEFAULT_TOLERANCE = 1e-4
# Raised whenever the exported graph of some network changes: a fold export cached by the engines and quantize
# (fold_F/model.onnx) of an older revision is made again. 2: LM-Net's sliced attention and its 3D patch model.
EXPORT_REVISION = 2
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


# ---- the traced core -------------------------------------------------------------------------------------
def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def size_multiple(network: nn.Module, strides: Optional[Sequence[Sequence[int]]] = None,
                  dim: Optional[int] = None) -> Tuple[int, ...]:
    """Spatial sizes the network runs on without padding: an ``LKUNet``'s own ``size_multiple`` and total
    stride; otherwise (stock nnU-Net) the product of the plans' strides."""
    from .networks.unet import LKUNet
    if isinstance(network, LKUNet):
        return tuple(_lcm(int(a), int(b)) for a, b in zip(network.size_multiple, network.total_stride))
    if strides is None:
        if dim is None:
            raise ValueError("give the plans' strides (or dim) for a network that is not an LKUNet")
        return (1,) * dim
    return tuple(int(v) for v in np.prod(np.array(strides), axis=0))


class AlignedCore(nn.Module):
    """The network on inputs whose spatial sizes are already multiples of ``size_multiple`` (what the
    exported graph traces). For an ``LKUNet`` this is its forward without the pad and crop, which are
    no-ops on such sizes but specialise symbolic shapes; any other network runs as it is."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        from .networks.unet import LKUNet
        net = self.network
        if not isinstance(net, LKUNet):
            out = net(x)
            return out[0] if isinstance(out, (list, tuple)) else out
        return net.forward_aligned(x)[0]  # the full-resolution logits (first with deep supervision too)


def _example_size(multiple: Sequence[int], patch_size: Optional[Sequence[int]]) -> List[int]:
    """A traced example size: the patch rounded up to the multiple, at least 2 multiples per axis (a size
    of one multiple would let the tracer treat k == 1 as a constant)."""
    patch = patch_size or [2 * m for m in multiple]
    return [max(2, -(-int(p) // m)) * m for p, m in zip(patch, multiple)]


def export_core(network: nn.Module, path: str, num_input_channels: int, multiple: Sequence[int],
                patch_size: Optional[Sequence[int]] = None, opset: Optional[int] = None,
                dynamic_batch: bool = True) -> None:
    """torch.onnx (dynamo) export of ``AlignedCore``: spatial axes ``multiple[i] * k_i``, batch dynamic
    or fixed to 1 (nnU-Net's sliding window predicts one patch at a time)."""
    core = AlignedCore(network).eval()
    example = torch.randn(2 if dynamic_batch else 1, num_input_channels, *_example_size(multiple, patch_size))
    shapes = {0: torch.export.Dim("batch", min=1, max=1024)} if dynamic_batch else {}
    for axis, m in enumerate(multiple):
        k = torch.export.Dim(f"k{axis}", min=1, max=4096)
        shapes[axis + 2] = k * m if m > 1 else k
    kwargs = {"opset_version": opset} if opset else {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(core, (example,), path, dynamo=True, input_names=["aligned"],
                              output_names=["aligned_logits"], dynamic_shapes=(shapes,), external_data=False,
                              verbose=False, **kwargs)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {type(network).__name__} "
                              f"({getattr(network, 'backbone', '')}) with {'dynamic' if dynamic_batch else 'batch 1'} "
                              f"batch and dynamic spatial sizes "
                              f"{['%d*k' % m for m in multiple]}: {type(e).__name__}: {str(e)[:2000]}") from e


# ---- padding and crop as ONNX nodes ----------------------------------------------------------------------
def wrap_pad_and_crop(core_path: str, path: str, multiple: Sequence[int]) -> None:
    """Prepend zero padding at the end of each spatial axis up to ``multiple`` and append the crop back,
    turning the aligned core into a model that takes any spatial size (as the PyTorch network does)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(core_path)
    graph = model.graph
    dim = len(multiple)
    (core_in,), (core_out,) = graph.input, graph.output
    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values)))
    nodes = [
        const("lk_multiple", multiple), const("lk_zeros", [0] * (dim + 2)), const("lk_zero2", [0, 0]),
        const("lk_start2", [2]), const("lk_end_big", [2 + dim]), const("lk_axes", list(range(2, 2 + dim))),
        const("lk_starts0", [0] * dim),
        helper.make_node("Shape", [INPUT_NAME], ["lk_shape"]),
        helper.make_node("Slice", ["lk_shape", "lk_start2", "lk_end_big"], ["lk_spatial"]),
        # pad = (multiple - size % multiple) % multiple, at the end of each axis
        helper.make_node("Mod", ["lk_spatial", "lk_multiple"], ["lk_rem"]),
        helper.make_node("Sub", ["lk_multiple", "lk_rem"], ["lk_gap"]),
        helper.make_node("Mod", ["lk_gap", "lk_multiple"], ["lk_pad"]),
        helper.make_node("Concat", ["lk_zeros", "lk_zero2", "lk_pad"], ["lk_pads"], axis=0),
        helper.make_node("Pad", [INPUT_NAME, "lk_pads"], [core_in.name], mode="constant"),
    ]
    tail = [helper.make_node("Slice", [core_out.name, "lk_starts0", "lk_spatial", "lk_axes"], [OUTPUT_NAME])]
    elem = core_in.type.tensor_type.elem_type
    batch = core_in.type.tensor_type.shape.dim[0].dim_value or "batch"
    channels_in = core_in.type.tensor_type.shape.dim[1].dim_value
    channels_out = core_out.type.tensor_type.shape.dim[1].dim_value
    spatial = [f"spatial_{i}" for i in range(dim)]
    new_in = helper.make_tensor_value_info(INPUT_NAME, elem, [batch, channels_in or "channels", *spatial])
    new_out = helper.make_tensor_value_info(OUTPUT_NAME, elem, [batch, channels_out or "classes", *spatial])
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes + tail)
    graph.value_info.extend([core_in, core_out])
    del graph.input[:]
    graph.input.append(new_in)
    del graph.output[:]
    graph.output.append(new_out)
    onnx.checker.check_model(model)
    onnx.save(model, path)


# onnxruntime's InstanceNormalization (GroupNorm's export too) sums each instance in one float32 pass: as exact
# as torch on small maps, ~100x less on a 96³ one (LGMSNet-3D amplified that to 6e-2 on its logits). Above this
# many voxels per patch, norms are exported axis by axis: the same function, but 1.14x slower per patch in
# onnxruntime for stock nnU-Net's network at 56x40, where it is not needed.
AXISWISE_NORM_MIN_VOXELS = 32 ** 3


def axiswise_norms(patch_size: Optional[Sequence[int]]) -> bool:
    """Whether norms are exported as ``AxiswiseGroupNorm`` for this patch (unknown patch: yes)."""
    return patch_size is None or math.prod(int(p) for p in patch_size) > AXISWISE_NORM_MIN_VOXELS


def export_network(network: nn.Module, path: str, num_input_channels: int, multiple: Sequence[int],
                   patch_size: Optional[Sequence[int]] = None, opset: Optional[int] = None, log=None) -> bool:
    """Export ``network`` (already in eval mode) to ``path``: any spatial size, and any batch where the
    network allows it. Returns whether the batch axis is dynamic.

    A network whose graph depends on the batch size in a way ONNX cannot express (MS-LKSeg's
    DynamicConv folds the batch into the ``group`` attribute of one grouped conv, and ONNX needs that
    attribute constant) is exported with batch 1, the batch nnU-Net's sliding window predicts with."""
    core_path = f"{path}.core.tmp"
    tmp = f"{path}.tmp"
    dynamic_batch = True
    if axiswise_norms(patch_size):
        network = with_axiswise_norms(copy.deepcopy(network))  # the caller's network stays as it is
    try:
        try:
            export_core(network, core_path, num_input_channels, multiple, patch_size, opset)
        except ExportError as e:
            dynamic_batch = False
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"note: no dynamic batch for this network ({str(e).splitlines()[0][:300]}...); exporting with "
                f"batch 1, which is what nnU-Net's sliding window uses")
            export_core(network, core_path, num_input_channels, multiple, patch_size, opset, dynamic_batch=False)
        wrap_pad_and_crop(core_path, tmp, multiple)
        os.replace(tmp, path)  # never leave a half-written model under the final name
    finally:
        for leftover in (core_path, tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return dynamic_batch


# ---- the patch model: the network at the one shape nnU-Net's sliding window feeds --------------------------
def has_static_form(network: nn.Module) -> bool:
    """Whether some module exports a different, faster graph at fixed sizes than at symbolic ones (LM-Net's 3D
    neighbourhood attention: its sliced form only exports in useful time with every size a constant)."""
    return any(getattr(m, "static_export_form", False) for m in network.modules())


def export_at_shape(network: nn.Module, path: str, input_shape: Sequence[int], opset: Optional[int] = None) -> None:
    """torch.onnx (dynamo) export of ``network`` (eval mode) at one input shape, every size a constant."""
    network = with_axiswise_norms(copy.deepcopy(network)) if axiswise_norms(input_shape[2:]) else network
    kwargs = {"opset_version": opset} if opset else {}
    tmp = f"{path}.tmp"
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(network, (torch.randn(*input_shape),), tmp, dynamo=True, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], external_data=False, verbose=False, **kwargs)
            os.replace(tmp, path)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {type(network).__name__} at input shape "
                              f"{list(input_shape)}: {type(e).__name__}: {str(e)[:2000]}") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def patch_model_path(onnx_path: str) -> str:
    base = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return base + ".patch.onnx"


def patch_model_for(onnx_path: str, input_shape: Optional[Sequence[int]]) -> Optional[str]:
    """The patch model the sidecar of ``onnx_path`` names for exactly ``input_shape``, if there is one."""
    if input_shape is None or not os.path.isfile(sidecar_path(onnx_path)):
        return None
    with open(sidecar_path(onnx_path)) as f:
        entry = json.load(f).get("patch_model")
    if not entry or [int(v) for v in entry["input_shape"]] != [int(v) for v in input_shape]:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), entry["file"])
    return path if os.path.isfile(path) else None


# ---- onnxruntime -----------------------------------------------------------------------------------------
def ort_session(path: str, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None):
    """An onnxruntime CPU session; ``input_shape``: the one input shape it will see (its free dimensions fixed)."""
    import onnxruntime as ort
    return ort.InferenceSession(path, ort_options(path, threads, input_shape), providers=["CPUExecutionProvider"])


def ort_options(path: str, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None):
    """The session options of ``ort_session`` (for callers that add their own, e.g. profiling)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for name, value in free_dimensions(path, input_shape).items():
        options.add_free_dimension_override_by_name(name, value)
    return options


def free_dimensions(path: str, input_shape: Optional[Sequence[int]]) -> dict:
    """{symbolic dimension name of the model's input: its value in ``input_shape``} (empty without a shape)."""
    if input_shape is None:
        return {}
    import onnx
    graph_input = onnx.load(path, load_external_data=False).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ExportError(f"{path} takes {len(dims)}-dimensional input, not {len(input_shape)}-dimensional "
                          f"{list(input_shape)}: export this model folder again (nnunet-lk export)")
    return {d.dim_param: int(v) for d, v in zip(dims, input_shape) if d.dim_param}


def max_abs_difference(network: nn.Module, session, shapes: Sequence[Sequence[int]], seed: int = 0) -> List[float]:
    """Largest |PyTorch - onnxruntime| logit difference for one random input of each shape."""
    generator = torch.Generator().manual_seed(seed)
    return max_abs_difference_on(network, session, [torch.randn(*shape, generator=generator) for shape in shapes])


def max_abs_difference_on(network: nn.Module, session, inputs: Sequence[torch.Tensor]) -> List[float]:
    """Largest |PyTorch - onnxruntime| logit difference for each given input (e.g. real patches)."""
    diffs = []
    for x in inputs:
        with torch.no_grad():
            reference = network(x)
        reference = (reference[0] if isinstance(reference, (list, tuple)) else reference).numpy()
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        if out.shape != reference.shape:
            raise ExportError(f"onnxruntime returned {out.shape} for input {list(x.shape)}, PyTorch {reference.shape}")
        diffs.append(float(np.abs(out - reference).max()))
    return diffs


def check_shapes(num_input_channels: int, patch_size: Sequence[int], multiple: Sequence[int], batch: int = 2,
                 pads_inside: bool = True) -> List[List[int]]:
    """The plans' patch (batch ``batch``) and a smaller size: no multiple of the network's where it pads
    inside (our backbones), else the largest multiple of the total stride at about half the patch (stock
    nnU-Net's network only runs on multiples; nnU-Net's sliding window only gives it the patch)."""
    if pads_inside:
        other = [max(1, int(p) // 2 + (1 if m > 1 else 0)) for p, m in zip(patch_size, multiple)]
        other = [o + 1 if (m > 1 and o % m == 0) else o for o, m in zip(other, multiple)]
    else:
        other = [max(int(m), (int(p) // 2) // int(m) * int(m)) for p, m in zip(patch_size, multiple)]
    return [[batch, num_input_channels, *map(int, patch_size)], [1, num_input_channels, *other]]


# ---- the sidecar -----------------------------------------------------------------------------------------
def sidecar(fold: LoadedFold, multiple: Sequence[int], results_folder: str, fold_name, diffs, tolerance) -> dict:
    cm, pm = fold.configuration_manager, fold.plans_manager
    lm = pm.get_label_manager(fold.dataset_json)
    return {
        "format": "nnunet-lk onnx sidecar 1",
        "input": INPUT_NAME, "output": OUTPUT_NAME,
        "input_layout": "N C " + " ".join("ZYX"[-len(cm.patch_size):]),
        "model_folder": os.path.abspath(results_folder), "fold": fold_name,
        "checkpoint": os.path.abspath(fold.checkpoint_path), "trainer": fold.trainer_name,
        "plans": pm.plans_name, "configuration": fold.configuration,
        "dataset": pm.dataset_name,
        "patch_size": [int(v) for v in cm.patch_size],
        "spacing": [float(v) for v in cm.spacing],
        "size_multiple": [int(v) for v in multiple],
        "axiswise_norms": axiswise_norms(cm.patch_size),
        "num_input_channels": fold.num_input_channels,
        "channel_names": fold.dataset_json.get("channel_names", fold.dataset_json.get("modality")),
        "num_output_channels": fold.num_output_channels,
        "labels": fold.dataset_json.get("labels"),
        "has_regions": bool(lm.has_regions),
        "regions_class_order": list(lm.regions_class_order) if lm.has_regions else None,
        "transpose_forward": list(pm.transpose_forward),
        "transpose_backward": list(pm.transpose_backward),
        "normalization_schemes": list(cm.normalization_schemes),
        "use_mask_for_norm": list(cm.use_mask_for_norm),
        "foreground_intensity_properties_per_channel": pm.foreground_intensity_properties_per_channel,
        "resampling": {"data": cm.configuration.get("resampling_fn_data"),
                       "probabilities": cm.configuration.get("resampling_fn_probabilities")},
        "inference_allowed_mirroring_axes": list(fold.inference_allowed_mirroring_axes)
        if fold.inference_allowed_mirroring_axes is not None else None,
        "export_revision": EXPORT_REVISION,
        "checkpoint_stamp": checkpoint_stamp(fold.checkpoint_path),
        "check": {"max_abs_diff": diffs, "tolerance": tolerance},
        "note": "Logits for sliding-window inference: preprocess as nnU-Net does (transpose, normalisation, "
                "resampling to 'spacing'), run patches of 'patch_size', or use `nnunet-lk predict-onnx`.",
    }


def sidecar_path(onnx_path: str) -> str:
    base = onnx_path[:-5] if onnx_path.endswith(".onnx") else onnx_path
    return base + ".json"


def default_onnx_path(results_folder: str, fold) -> str:
    """Where the engines and quantize keep a fold's export (made on first use)."""
    return os.path.join(fold_folder(results_folder, fold), "model.onnx")


def outdated_export(onnx_path: str, checkpoint_path: str) -> Optional[str]:
    """Why the export at ``onnx_path`` no longer stands for ``checkpoint_path``, or None. A model without our
    sidecar (not made by ``export_model_folder``) is taken as it is."""
    if not os.path.isfile(sidecar_path(onnx_path)):
        return None
    with open(sidecar_path(onnx_path)) as f:
        info = json.load(f)
    revision = info.get("export_revision", 1)
    if revision < EXPORT_REVISION:
        return f"it was made by an older nnunet-lk (export revision {revision}, now {EXPORT_REVISION})"
    stamp = info.get("checkpoint_stamp")
    if stamp is None or not os.path.isfile(checkpoint_path) \
            or not same_checkpoint(stamp, checkpoint_stamp(checkpoint_path)):
        return f"it was made from another {os.path.basename(checkpoint_path)} than the one there now"
    return None


def fold_export(results_folder: str, fold, checkpoint_name: str, purpose: str, log=print) -> str:
    """The fold's cached export (``default_onnx_path``), exported first where it is missing or outdated."""
    path = default_onnx_path(results_folder, fold)
    checkpoint = os.path.join(fold_folder(results_folder, fold), checkpoint_name)
    reason = "once; later runs reuse it" if not os.path.isfile(path) else outdated_export(path, checkpoint)
    if reason is not None:
        log(f"exporting fold {fold} of {results_folder} to {path} ({purpose}; {reason})")
        export_model_folder(results_folder, fold, path, checkpoint_name=checkpoint_name, log=log)
    return path


def export_model_folder(results_folder: str, fold, output: str, checkpoint_name: str = "checkpoint_final.pth",
                        tolerance: float = DEFAULT_TOLERANCE, opset: Optional[int] = None, log=print) -> dict:
    """``nnunet-lk export``: export, check against PyTorch, write the sidecar. Returns the sidecar."""
    require_extra("export", "nnunet-lk export")
    fold_name = fold if fold == "all" else int(fold)
    loaded = load_fold(results_folder, fold_name, checkpoint_name)
    cm = loaded.configuration_manager
    strides = cm.network_arch_init_kwargs.get("strides") if cm.network_arch_init_kwargs else None
    multiple = size_multiple(loaded.network, strides, len(cm.patch_size))
    log(f"exporting {loaded.trainer_name} ({loaded.configuration}, fold {fold_name}) from {loaded.checkpoint_path}; "
        f"traced on sizes multiple of {list(multiple)} (what this network pads its input to at these plans' depth; "
        f"inputs of any size are padded to it)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    dynamic_batch = export_network(loaded.network, output, loaded.num_input_channels, multiple, cm.patch_size,
                                   opset, log=log)
    from .networks.unet import LKUNet
    shapes = check_shapes(loaded.num_input_channels, cm.patch_size, multiple, batch=2 if dynamic_batch else 1,
                          pads_inside=isinstance(loaded.network, LKUNet))
    diffs = max_abs_difference(loaded.network, ort_session(output), shapes)
    for shape, diff in zip(shapes, diffs):
        log(f"onnxruntime vs PyTorch, input {shape}: max abs difference {diff:.3e} (tolerance {tolerance:.0e})")
    info = sidecar(loaded, multiple, results_folder, fold_name, diffs, tolerance)
    info["dynamic_batch"] = dynamic_batch
    info["check"]["shapes"] = shapes
    patch_path = patch_model_path(output)
    if os.path.exists(patch_path):  # a previous export's: only the sidecar written below may name one
        os.remove(patch_path)
    if has_static_form(loaded.network):
        patch_shape = [1, loaded.num_input_channels, *map(int, cm.patch_size)]
        log(f"exporting the patch model {patch_path}: input {patch_shape}, every size a constant (the engines run "
            f"it for the windows nnU-Net's sliding window feeds; its graph is faster than the general one's)")
        export_at_shape(loaded.network, patch_path, patch_shape, opset)
        (patch_diff,) = max_abs_difference(loaded.network, ort_session(patch_path), [patch_shape])
        log(f"onnxruntime vs PyTorch, patch model, input {patch_shape}: max abs difference {patch_diff:.3e}")
        diffs = diffs + [patch_diff]
        info["patch_model"] = {"file": os.path.basename(patch_path), "input_shape": patch_shape,
                               "max_abs_diff": patch_diff}
    with open(sidecar_path(output), "w") as f:
        json.dump(info, f, indent=2)
    if max(diffs) > tolerance:
        raise ExportError(f"the ONNX model differs from PyTorch by {max(diffs):.3e} > tolerance {tolerance:.0e}; "
                          f"{output} was kept for inspection. Raise --tolerance only if this is float rounding.")
    log(f"wrote {output} and {sidecar_path(output)}")
    return info
