"""LM-Net in ONNX Runtime and OpenVINO: its neighbourhood attention exported in the reference form (one gather per
window offset and axis, a softmax over the stacked logits) and in the sliced form (slices, edge pads and
elementwise ops on maps the size of q: what `nnunet-lk export` writes in 2D). Per patch, 1 thread, the four compiled
models and PyTorch eager interleaved; graph nodes and Gathers of each export; the roof (the network's MACs at the
fp32 sgemm peak measured in the same run).

    python benchmarks/neighborhood_export.py --repeats 30

Writes benchmarks/results/neighborhood_export.{md,json}. A benchmark, not a test: parity is tested in
tests/test_neighborhood.py and tests/test_export.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from depthwise_ops import sgemm_peak  # noqa: E402

# (name, plans file, configuration, input channels, classes, patch): the Hippocampus plans nnU-Net writes, and
# a larger 2D patch with the same strides
PLANS = REPO / "tests" / "fixtures" / "hippocampus_plans.json"
CASES = [("Hippocampus 2d", PLANS, "2d", 1, 3, None),
         ("256 x 256 patch (those plans' strides)", PLANS, "2d", 3, 2, [256, 256])]
FORMS = ("reference", "sliced")
ENGINES = ("onnxruntime", "openvino")


def build(plans_file: Path, configuration: str, channels: int, classes: int, patch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.training.trainers import nnUNetTrainerLMNet
    plans = json.loads(plans_file.read_text())
    if patch is not None:
        plans["configurations"][configuration]["patch_size"] = list(patch)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return nnUNetTrainerLMNet.build_network_architecture(pm, cm, channels, classes, False).eval(), list(cm.patch_size)


def measure(name, plans_file, configuration, channels, classes, patch, repeats: int, peak: float) -> dict:
    import onnx
    import onnxruntime as ort

    from nnunet_lk.analysis import count_macs
    from nnunet_lk.blocks import lmnet
    from nnunet_lk.engines import OpenVinoNetwork
    from nnunet_lk.export import export_network, size_multiple
    net, patch = build(plans_file, configuration, channels, classes, patch)
    folder = Path(tempfile.mkdtemp())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    models, graphs = {}, {}
    shape = (1, channels, *patch)
    for form in FORMS:
        lmnet.NeighborhoodAttention.export_sliced = form == "sliced"
        path = folder / f"{form}.onnx"
        export_network(net, str(path), channels, size_multiple(net), patch)
        ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        graphs[form] = {"nodes": sum(ops.values()), "gathers": ops.get("Gather", 0)}
        models[f"{form} onnxruntime"] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        models[f"{form} openvino"] = OpenVinoNetwork(str(path), threads=1, input_shape=shape)
    lmnet.NeighborhoodAttention.export_sliced = True
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.inference_mode():
        eager_out = net(torch.from_numpy(x)).numpy()

    def run(name):
        with torch.inference_mode():
            if name == "pytorch":
                return net(torch.from_numpy(x)).numpy()
            model = models[name]
            if isinstance(model, OpenVinoNetwork):
                return model(torch.from_numpy(x)).numpy()
            return model.run(None, {model.get_inputs()[0].name: x})[0]
    forms = ["pytorch", *models]
    deviation = {f: float(np.abs(run(f) - eager_out).max()) for f in forms[1:]}
    times = {f: [] for f in forms}
    for _ in range(repeats):
        for f in forms:
            start = time.perf_counter()
            run(f)
            times[f].append(time.perf_counter() - start)
    macs = count_macs(net, (1, channels, *patch))
    median = {f: statistics.median(t) for f, t in times.items()}
    return {"case": name, "patch": patch, "macs": macs, "roof_ms": 1e3 * 2 * macs / peak,
            "median_ms": {f: 1e3 * v for f, v in median.items()}, "graphs": graphs,
            "max_abs_difference_from_pytorch": deviation,
            "sliced/reference": {e: median[f"sliced {e}"] / median[f"reference {e}"] for e in ENGINES}}


def markdown(record: dict) -> str:
    lines = ["# LM-Net's neighbourhood attention in ONNX Runtime and OpenVINO: reference vs sliced export", "",
             f"1 thread, per patch (batch 1), {record['repeats']} interleaved repeats, median. fp32 sgemm peak of this "
             f"run: {record['sgemm_gflops']:.0f} GFLOP/s; roof = 2 x MACs / peak. Load: {record['load']}.", "",
             "| case | patch | nodes (reference / sliced) | Gathers | PyTorch ms | ORT reference ms | ORT sliced ms | "
             "OpenVINO reference ms | OpenVINO sliced ms | sliced / reference (ORT, OpenVINO) | roof ms | "
             "max abs diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        g, m, ratio = r["graphs"], r["median_ms"], r["sliced/reference"]
        lines.append(f"| {r['case']} | {' x '.join(map(str, r['patch']))} | {g['reference']['nodes']} / "
                     f"{g['sliced']['nodes']} | {g['reference']['gathers']} / {g['sliced']['gathers']} | "
                     f"{m['pytorch']:.1f} | {m['reference onnxruntime']:.1f} | {m['sliced onnxruntime']:.1f} | "
                     f"{m['reference openvino']:.1f} | {m['sliced openvino']:.1f} | "
                     f"{ratio['onnxruntime']:.2f}, {ratio['openvino']:.2f} | "
                     f"{r['roof_ms']:.2f} | {max(r['max_abs_difference_from_pytorch'].values()):.1e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    peak = sgemm_peak("cpu") * 1e9
    results = [measure(*case, repeats=args.repeats, peak=peak) for case in CASES]
    load = os.getloadavg()
    record = {"repeats": args.repeats, "sgemm_gflops": peak / 1e9, "torch": torch.__version__,
              "load": f"load average {load[0]:.1f} over the last minute, {os.cpu_count()} cores", "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "neighborhood_export.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "neighborhood_export.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
