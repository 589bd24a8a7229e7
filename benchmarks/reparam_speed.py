"""Fused vs unfused CPU inference time per patch for a backbone with re-parameterisable blocks
(architectures.md §4.6 Fig. 3; MS-LKSeg's LD, LM-Net's ReparamConv). A benchmark script, not a test.

Both paths run the same eval-mode network (batch 1) on the same input in one process, interleaved repeat by
repeat so that load on a shared machine hits both alike:
- fused: what ``.eval()`` gives (each ``ReparamDepthwise`` runs one folded depthwise conv);
- unfused: every ``ReparamDepthwise`` runs its parallel conv+BN branches (BN with running stats),
  which is the training-form computation in inference mode (``nnunet_lk.blocks.reparam.unfused``).
The outputs of both paths are compared as a sanity check. Besides the whole network, the
re-parameterisable modules are timed alone on the inputs they saw (their share of the network).

    python benchmarks/reparam_speed.py                      # mslkseg, Hippocampus-like + Kvasir-like
    python benchmarks/reparam_speed.py --backbone lmnet --kvasir-patch 256 256 --repeats 5

Writes ``benchmarks/results/reparam_speed.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nnunet_lk.blocks.reparam import ReparamDepthwise, unfused
from nnunet_lk.networks import build_backbone

RESULTS = Path(__file__).resolve().parent / "results" / "reparam_speed.json"




def nnunet_like_strides(patch, max_stages: int = 7, min_feature: int = 4):
    """x2 pooling per axis while the feature map stays >= 2·min_feature (nnU-Net's 2D planning, roughly)."""
    strides, size = [[1] * len(patch)], list(patch)
    while len(strides) < max_stages:
        step = [2 if s % 2 == 0 and s // 2 >= min_feature else 1 for s in size]
        if all(v == 1 for v in step):
            break
        strides.append(step)
        size = [s // v for s, v in zip(size, step)]
    return strides


def time_once(net, x) -> float:
    start = time.perf_counter()
    net(x)
    return time.perf_counter() - start


def capture_reparam_inputs(net, x, modules):
    """The input each re-parameterisable module sees in one forward (to time those modules alone)."""
    inputs, handles = {}, []
    for m in modules:
        handles.append(m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0])))
    net(x)
    for h in handles:
        h.remove()
    return [(m, inputs[m]) for m in modules]


def time_modules(pairs) -> float:
    start = time.perf_counter()
    for module, inp in pairs:
        module(inp)
    return time.perf_counter() - start


def benchmark_patch(backbone, name, patch, input_channels, num_classes, strides, overrides, warmup, repeats):
    torch.manual_seed(0)
    net = build_backbone(backbone, dim=len(patch), input_channels=input_channels, num_classes=num_classes,
                         strides=strides, kernel_sizes=[[3] * len(patch)] * len(strides), patch_size=patch,
                         **overrides)
    reparams = [m for m in net.modules() if isinstance(m, ReparamDepthwise)]
    if not reparams:
        sys.exit(f"{backbone} has no ReparamDepthwise modules: nothing to compare")
    # non-trivial BN statistics, as after training
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, input_channels, *patch))
    net.eval()
    x = torch.randn(1, input_channels, *patch)
    fused_times, unfused_times, fused_block_times, unfused_block_times = [], [], [], []
    with torch.inference_mode():
        fused_out = net(x)
        with unfused(net):
            unfused_out = net(x)
        pairs = capture_reparam_inputs(net, x, reparams)
        for i in range(warmup + repeats):
            f, fb = time_once(net, x), time_modules(pairs)
            with unfused(net):
                u, ub = time_once(net, x), time_modules(pairs)
            if i >= warmup:
                fused_times.append(f), unfused_times.append(u)
                fused_block_times.append(fb), unfused_block_times.append(ub)
    fused_ms, unfused_ms = 1e3 * statistics.median(fused_times), 1e3 * statistics.median(unfused_times)
    fused_block_ms = 1e3 * statistics.median(fused_block_times)
    unfused_block_ms = 1e3 * statistics.median(unfused_block_times)
    return {
        "name": name, "patch": list(patch), "batch": 1, "input_channels": input_channels,
        "num_classes": num_classes, "levels": len(net.level_strides) if hasattr(net, "level_strides") else None,
        "reparam_modules": len(reparams),
        "reparam_kernels": [[list(k) for k in m.kernels] for m in reparams],
        "fused_ms_median": round(fused_ms, 2), "unfused_ms_median": round(unfused_ms, 2),
        "speedup": round(unfused_ms / fused_ms, 3),
        "reparam_modules_only": {"fused_ms_median": round(fused_block_ms, 2),
                                 "unfused_ms_median": round(unfused_block_ms, 2),
                                 "speedup": round(unfused_block_ms / fused_block_ms, 3)},
        "fused_ms_all": [round(1e3 * t, 2) for t in fused_times],
        "unfused_ms_all": [round(1e3 * t, 2) for t in unfused_times],
        "max_abs_diff_fused_vs_unfused": float((fused_out - unfused_out).abs().max()),
    }


def parse_overrides(items):
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mslkseg", help="any registered backbone with ReparamDepthwise")
    parser.add_argument("--hippocampus-patch", type=int, nargs=2, default=[56, 40],
                        help="Hippocampus 2d plan patch (1 channel, 3 classes, 4 stages)")
    parser.add_argument("--kvasir-patch", type=int, nargs=2, default=[640, 640],
                        help="Kvasir-SEG 2d plan patch (3 channels, 2 classes)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch default); 1 gives stable figures on a shared box")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="backbone config overrides")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)

    hippo = tuple(args.hippocampus_patch)
    cases = [("hippocampus-like", hippo, 1, 3, [[1, 1], [2, 2], [2, 2], [2, 2]]),
             ("kvasir-like", tuple(args.kvasir_patch), 3, 2, nnunet_like_strides(args.kvasir_patch))]
    results = []
    print(f"{args.backbone}: CPU inference per patch (batch 1, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} after {args.warmup} warm-up)")
    print(f"{'':30}{'whole network':^33}{'re-param modules only':^33}")
    print(f"{'case':<18}{'patch':>12}{'unfused ms':>13}{'fused ms':>11}{'speedup':>9}"
          f"{'unfused ms':>13}{'fused ms':>11}{'speedup':>9}{'max |diff|':>12}")
    for name, patch, cin, classes, strides in cases:
        r = benchmark_patch(args.backbone, name, patch, cin, classes, strides, overrides, args.warmup, args.repeats)
        results.append(r)
        b = r["reparam_modules_only"]
        print(f"{name:<18}{'x'.join(map(str, patch)):>12}{r['unfused_ms_median']:>13.1f}"
              f"{r['fused_ms_median']:>11.1f}{r['speedup']:>8.2f}x"
              f"{b['unfused_ms_median']:>13.1f}{b['fused_ms_median']:>11.1f}{b['speedup']:>8.2f}x"
              f"{r['max_abs_diff_fused_vs_unfused']:>12.1e}",
              flush=True)
    record = {"backbone": args.backbone, "config_overrides": overrides, "device": "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "processor": platform.processor(), "warmup": args.warmup,
              "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
