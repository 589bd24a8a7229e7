"""Where each CPU engine spends a patch: per-op profiles of ONNX Runtime and OpenVINO on the exported models of
nnU-Net model folders (stock nnU-Net's and ours), fp32 and the INT8 models of `nnunet-lk quantize`.

Each model runs as `nnunet-lk predict` runs it: one window of the plans' patch at batch 1, the engine's model
specialised to that shape. Operators are grouped in classes an engine could or could not make faster:
- ``conv``, ``depthwise conv``, ``matmul``: the operators with MACs (counted on the fp32 graph, so their GFLOP/s
  stand beside the fp32 sgemm peak measured in the same run);
- ``elementwise``, ``normalisation``, ``reduce/softmax``, ``data movement``, ``(de)quantise``: no MACs; their time
  is memory traffic and per-operator overhead.
ONNX Runtime's profiler gives each node's kernel time; OpenVINO's performance counters give each executed
(already fused) node's time, classed by the ONNX nodes it runs (its runtime model's originalLayersNames): a
grouped convolution with several channels per group is a ``conv``, and an attention OpenVINO fuses into one
Subgraph (MatMul, Softmax, MatMul) a ``matmul`` (before, both were filed by node type: ``depthwise conv`` and
``elementwise``, which put LGMSNet's and LM-Net's 3D floors too low). Times are medians over interleaved repeats of the per-class sum; "wall" is the whole
call, profiling off.

    python benchmarks/engine_profile.py --threads 1 --repeats 20 --models \\
        $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerStockBudget__nnUNetPlans_cpu__2d \\
        $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerLMNet__nnUNetPlans_cpu__2d

Writes ``benchmarks/results/engine_profile_<dataset>_<configuration>.{json,md}`` (``--out`` for another folder).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Collection, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))
from depthwise_ops import sgemm_peak  # noqa: E402

CLASSES = ("conv", "depthwise conv", "matmul", "elementwise", "normalisation", "reduce/softmax", "data movement",
           "(de)quantise")
WITH_MACS = ("conv", "depthwise conv", "matmul")
_ORT = {
    "matmul": {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul"},
    "normalisation": {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                      "InstanceNormalization", "BatchNormalization", "GroupNormalization", "GroupNorm"},
    "reduce/softmax": {"Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2",
                       "GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool", "ArgMax"},
    "data movement": {"Transpose", "Reshape", "Concat", "Slice", "Split", "Gather", "GatherElements", "GatherND",
                      "Pad", "Resize", "ReorderInput", "ReorderOutput", "Squeeze", "Unsqueeze", "Expand", "Tile",
                      "Cast", "Identity", "Shape", "Flatten", "Upsample", "DepthToSpace", "SpaceToDepth"},
    "(de)quantise": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
}
_OV = {
    "matmul": {"MatMul", "FullyConnected", "Gemm"},
    "normalisation": {"MVN", "NormalizeL2", "BatchNormInference", "GroupNormalization", "RMS"},
    "reduce/softmax": {"Reduce", "ReduceSum", "ReduceMean", "ReduceMax", "Softmax", "SoftMax", "Pooling"},
    "data movement": {"Reorder", "Transpose", "Concatenation", "Concat", "Gather", "Split", "Interpolate", "Pad",
                      "Reshape", "StridedSlice", "Convert", "Broadcast", "ShapeOf", "Squeeze", "Unsqueeze",
                      "Tile", "Slice", "VariadicSplit", "DepthToSpace", "ScatterUpdate"},
    "(de)quantise": {"FakeQuantize"},
}


# ---- classes and MACs --------------------------------------------------------------------------------------------
CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcConv", "ConvTranspose")


def conv_kinds(path: str) -> Dict[str, str]:
    """{graph node name: "conv" or "depthwise conv"} for the convolutions of an ONNX file (depthwise: more than one
    group, one input channel per group)."""
    import onnx
    model = onnx.load(path)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    kinds = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            weight = weights.get(n.input[1])
            if weight is None:  # QDQ: the weight comes through a DequantizeLinear of an initializer
                source = next((m for m in model.graph.node if n.input[1] in m.output), None)
                weight = weights.get(source.input[0]) if source is not None else None
            depthwise = n.op_type == "Conv" and group > 1 and weight is not None and weight[1] == 1
            kinds[n.name] = "depthwise conv" if depthwise else "conv"
    return kinds


def ort_class(op: str, inputs: Sequence[Sequence[int]], name: str = "",
              kinds: Optional[Dict[str, str]] = None) -> str:
    """The class of an ONNX Runtime node: a convolution by the graph node it runs (ONNX Runtime keeps the name as
    a prefix), else by its weight's shape (one input channel per group, more than one group: depthwise; ONNX
    Runtime does not list prepacked weights)."""
    if op in CONV_OPS:
        kinds = kinds or {}
        matches = [n for n in kinds if name == n or name.startswith(n + "_")]
        if matches:
            return kinds[max(matches, key=len)]
        if len(inputs) > 1 and len(inputs[0]) > 1 and len(inputs[1]) > 1 and inputs[1][1] == 1 and inputs[0][1] > 1:
            return "depthwise conv"
        return "conv"
    for name, ops in _ORT.items():
        if op in ops:
            return name
    return "elementwise"


MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def graph_macs(path: str, input_shape: Sequence[int]) -> Dict[str, int]:
    """MACs per class of the exported fp32 graph on ``input_shape``, from the shapes ONNX Runtime computes (the graph
    run unoptimised once, every convolution's and matrix product's operands as extra outputs): a convolution
    does (input channels per group x kernel) per output element, a transposed one (output channels per group x
    kernel) per input element, a matrix product (inner size) per output element."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(path)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]
    wanted = sorted({t for n in nodes for t in (*n.input[:2], n.output[0]) if t and t not in weights}
                    - {o.name for o in model.graph.output})
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.zeros(input_shape, np.float32)
    names = [o.name for o in session.get_outputs()]
    shapes = {n: list(v.shape) for n, v in zip(names, session.run(names, {session.get_inputs()[0].name: x}))}
    shapes.update(weights)
    kinds = conv_kinds(path)
    macs: Dict[str, int] = defaultdict(int)
    for n in nodes:
        a, w, out = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in n.attribute}
        if n.op_type == "Conv":
            macs[kinds[n.name]] += math.prod(out) * math.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            macs["conv"] += math.prod(a) * math.prod(w[1:])
        elif n.op_type == "Gemm":
            macs["matmul"] += math.prod(out) * (a[0] if attrs.get("transA", 0) else a[1])
        else:
            macs["matmul"] += math.prod(out) * a[-1]
    return dict(macs)


def ov_class(node_type: str, originals: Sequence[str] = (), kinds: Optional[Dict[str, str]] = None,
             matmuls: Collection[str] = ()) -> str:
    """The class of an executed OpenVINO node: by the ONNX nodes it runs (``originals``, its runtime model's
    originalLayersNames) where one has MACs: a convolution's kind from the ONNX graph (a GroupConvolution with
    several input channels per group is a ``conv``), a matrix product as ``matmul`` (an attention fused into one
    Subgraph: MatMul, Softmax, MatMul, Transposes); else by its type."""
    kinds = kinds or {}
    conv = next((kinds[o] for o in originals if o in kinds), None)
    if conv is not None:
        return conv
    if any(o in matmuls for o in originals):
        return "matmul"
    if node_type in ("Convolution", "Deconvolution", "ConvolutionBackpropData"):
        return "conv"
    if node_type == "GroupConvolution":
        return "depthwise conv"
    for name, types in _OV.items():
        if node_type in types:
            return name
    return "elementwise"  # Eltwise, Subgraph (OpenVINO's fused elementwise chains), activations


def matmul_nodes(path: str) -> set:
    import onnx
    return {n.name for n in onnx.load(path, load_external_data=False).graph.node if n.op_type in ("MatMul", "Gemm")}


def ov_originals(compiled) -> Dict[str, List[str]]:
    """{executed node name: the ONNX node names it runs}, from the compiled model's runtime graph."""
    originals = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        originals[op.get_friendly_name()] = [n for n in names.split(",") if n]
    return originals


def _shape_list(entries) -> List[List[int]]:
    return [list(next(iter(e.values()))) for e in entries or []]


# ---- profiling ---------------------------------------------------------------------------------------------------
def profile_onnxruntime(path: str, shape: Sequence[int], threads: int, repeats: int, warmup: int = 3) -> dict:
    """Per class: median ms per call, from ONNX Runtime's profiler (warm-up calls dropped); nodes executed per call;
    median wall ms per call without profiling."""
    import onnxruntime as ort
    from nnunet_lk.export import ort_options, ort_session
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    plain = ort_session(path, threads, shape)
    name = plain.get_inputs()[0].name
    wall = _wall(lambda: plain.run(None, {name: x}), repeats, warmup)
    options = ort_options(path, threads, shape)
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "ort")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + repeats):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
    kinds = conv_kinds(path)
    per_run = [defaultdict(float) for _ in runs]
    nodes = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        index = next((i for i, r in enumerate(runs) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
        if index is None:
            continue
        args = e["args"]
        node = e["name"][:-len("_kernel_time")]
        per_run[index][ort_class(args["op_name"], _shape_list(args.get("input_type_shape")), node, kinds)] += \
            e["dur"] / 1e3
        nodes += index == 0
    return _summary(per_run, wall, nodes)


def profile_openvino(path: str, shape: Sequence[int], threads: int, repeats: int, warmup: int = 3) -> dict:
    """As ``profile_onnxruntime`` with OpenVINO's performance counters (the static model for ``shape``)."""
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def compiled(perf: bool):
        model = core.read_model(path)
        model.reshape({model.input(0).get_any_name(): list(shape)})
        return core.compile_model(model, "CPU", {**config, "PERF_COUNT": perf})
    plain = compiled(False).create_infer_request()
    wall = _wall(lambda: plain.infer({0: x}), repeats, warmup)
    profiled = compiled(True)
    originals, kinds, matmuls = ov_originals(profiled), conv_kinds(path), matmul_nodes(path)
    request = profiled.create_infer_request()
    per_run, nodes = [], 0
    for i in range(warmup + repeats):
        request.infer({0: x})
        if i < warmup:
            continue
        times = defaultdict(float)
        executed = [p for p in request.get_profiling_info() if p.status == ov.ProfilingInfo.Status.EXECUTED]
        for p in executed:
            times[ov_class(p.node_type, originals.get(p.node_name, ()), kinds, matmuls)] += \
                p.real_time.total_seconds() * 1e3
        nodes = len(executed)
        per_run.append(times)
    return _summary(per_run, wall, nodes)


def _wall(call, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _summary(per_run: List[Dict[str, float]], wall_ms: float, nodes: int) -> dict:
    classes = {c: statistics.median(r.get(c, 0.0) for r in per_run) for c in CLASSES}
    return {"wall_ms": wall_ms, "profiled_ms": sum(classes.values()), "nodes": nodes, "class_ms": classes}


# ---- the run -----------------------------------------------------------------------------------------------------
def model_files(model: str, fold) -> Dict[str, str]:
    from nnunet_lk.export import default_onnx_path
    from nnunet_lk.quantize import int8_path
    return {"fp32": default_onnx_path(model, fold), "int8": int8_path(model, fold)}


def run(models: Sequence[str], engines: Sequence[str], fold, threads: int, repeats: int, log=print) -> dict:
    import torch

    from nnunet_lk.export import patch_model_for
    torch.set_num_threads(threads)
    peak = sgemm_peak("cpu")
    record = {"threads": threads, "repeats": repeats, "sgemm_gflops": peak, "models": {}}
    for model in models:
        files = model_files(model, fold)
        sidecar = json.loads(Path(files["fp32"]).with_suffix(".json").read_text())
        shape = [1, sidecar["num_input_channels"], *sidecar["patch_size"]]
        files["fp32"] = patch_model_for(files["fp32"], shape) or files["fp32"]  # what the engines run per window
        entry = record["models"][Path(model).name] = {"input_shape": shape, "engines": {}, "fp32_file": files["fp32"],
                                                      "class_macs": graph_macs(files["fp32"], shape)}
        for engine in engines:
            runtime, precision = (engine[:-5], "int8") if engine.endswith("-int8") else (engine, "fp32")
            if not os.path.isfile(files[precision]):
                log(f"{Path(model).name}: no {files[precision]}, {engine} left out")
                continue
            profile = profile_onnxruntime if runtime == "onnxruntime" else profile_openvino
            entry["engines"][engine] = profile(files[precision], shape, threads, repeats)
            log(f"{Path(model).name} {engine}: {entry['engines'][engine]['wall_ms']:.2f} ms per patch")
    return record


def markdown(record: dict, title: str) -> str:
    peak = record["sgemm_gflops"]
    lines = [f"# Where the CPU engines spend a patch: {title}", "",
             f"{record['threads']} thread(s); one window of the plans' patch at batch 1 with each engine's model "
             f"specialised to that shape, as `nnunet-lk predict` runs it; median of {record['repeats']} profiled "
             f"calls after warm-up. fp32 sgemm peak of this run: {peak:.0f} GFLOP/s. Wall: the whole call, "
             "profiling off; classes: summed kernel times (ONNX Runtime's profiler, OpenVINO's performance "
             "counters), ms and share of the profiled time. MACs: the fp32 graph's; GFLOP/s: in ONNX Runtime fp32.",
             ""]
    engines = sorted({e for m in record["models"].values() for e in m["engines"]},
                     key=lambda e: ("int8" in e, e))
    lines += ["| model | " + " | ".join(f"{e} wall ms" for e in engines) + " |",
              "|---|" + "---|" * len(engines)]
    for name, m in record["models"].items():
        cells = [f"{m['engines'][e]['wall_ms']:.2f}" if e in m["engines"] else "-" for e in engines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *floor_table(record)]
    for name, m in record["models"].items():
        ort = m["engines"].get("onnxruntime")
        macs = m["class_macs"]
        lines += ["", f"## {name} (input {m['input_shape']})", "",
                  "| class | MACs (M) | " + " | ".join(engines) + " | GFLOP/s (onnxruntime) |",
                  "|---|---|" + "---|" * len(engines) + "---|"]
        for cls in CLASSES:
            cells = []
            for e in engines:
                p = m["engines"].get(e)
                if p is None:
                    cells.append("-")
                    continue
                ms = p["class_ms"][cls]
                cells.append(f"{ms:.2f} ({100 * ms / p['profiled_ms']:.0f}%)" if p["profiled_ms"] else "-")
            rate = (2 * macs.get(cls, 0) / (ort["class_ms"][cls] * 1e-3) / 1e9
                    if ort and cls in WITH_MACS and ort["class_ms"][cls] > 0 else None)
            lines.append(f"| {cls} | {macs.get(cls, 0) / 1e6:.1f} | " + " | ".join(cells) + " | "
                         + (f"{rate:.0f} ({100 * rate / peak:.0f}% of peak)" if rate is not None else "") + " |")
        nodes = " / ".join(f"{e} {m['engines'][e]['nodes']}" for e in engines if e in m["engines"])
        lines += ["", f"Nodes executed per call: {nodes}."]
    return "\n".join(lines) + "\n"


def floor_table(record: dict) -> List[str]:
    """Per model: its fastest engine, and a floor no engine here reaches below: the operators with MACs, each class
    at the fastest time any engine gave it, everything else free. Compared with the first model's fastest call."""
    rows, base = [], None
    for name, m in record["models"].items():
        engines = m["engines"]
        if not engines:
            continue
        best = min(engines, key=lambda e: engines[e]["wall_ms"])
        floor = sum(min(p["class_ms"][c] for p in engines.values()) for c in WITH_MACS)
        base = base if base is not None else engines[best]["wall_ms"]
        rows.append(f"| {name} | {best} | {engines[best]['wall_ms']:.2f} | {engines[best]['wall_ms'] / base:.2f} | "
                    f"{floor:.2f} | {floor / base:.2f} |")
    return ["Fastest engine, and the floor of the operators with MACs (each class at the fastest time any engine "
            "gave it, every other operator free); ratios to the first model's fastest call:", "",
            "| model | fastest engine | ms | ratio | MAC-operator floor ms | floor ratio |",
            "|---|---|---|---|---|---|", *rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="nnU-Net model folders with fold_F/model.onnx")
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino", "onnxruntime-int8",
                                                         "openvino-int8"],
                        choices=["onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    fold = args.fold if args.fold == "all" else int(args.fold)
    record = run(args.models, args.engines, fold, args.threads, args.repeats, log=lambda m: print(m, file=sys.stderr))
    dataset, configuration = Path(args.models[0]).parent.name, Path(args.models[0]).name.split("__")[-1]
    record.update(dataset=dataset, configuration=configuration, cpu=platform.processor() or platform.machine(),
                  load_average=os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine_profile_{dataset}_{configuration}_{args.threads}thread"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(markdown(record, f"{dataset} {configuration}"))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
