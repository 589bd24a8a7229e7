"""Depthwise convolutions of our backbones: torch's default CPU path vs ``nnunet_lk.blocks.depthwise``.
A benchmark script, not a test.

1. Collects every distinct depthwise conv (groups == channels > 1) the backbones run, with forward hooks on
   networks built the way the trainers build them (``build_network_architecture`` on the Hippocampus
   plans in tests/fixtures: 2d patch 56x40 at batch 8 as in the committed ``nnunet-lk bench`` runs,
   3d_fullres patch 40x56x40 at the plans' batch 2), plus Kvasir-like 2D (3 channels, 256², batch 4,
   nnU-Net-like x2 pyramid), each backbone at its paper defaults, in training mode (re-parameterised
   blocks run their branches; the fused eval kernel is the largest branch's shape).
2. Times, per shape, torch (``F.conv2d``/``F.conv3d``) against ours (``grouped_conv``) on contiguous
   (NCHW/NCDHW) tensors, as the networks run: forward (eval, no_grad) and forward+backward (input, weight
   and bias requiring grad). Runs are interleaved (torch, ours, torch, ours, ...) and the speed-up is the
   median of the paired ratios, so load on a shared machine hits both alike. Achieved GFLOP/s use
   2·N·C·Π(out)·Π(k) FLOPs forward and 3x that forward+backward, and are given as a fraction of the fp32
   sgemm peak measured in the same run (best of a few 2048² ``torch.mm``).
3. ``--formulations``: times each candidate formulation alone (the measurements behind the static rule of
   ``nnunet_lk/blocks/depthwise.py``, written down in ``docs/depthwise.md`` §1), in both input layouts.

    python benchmarks/depthwise_ops.py --quick                 # a few shapes
    python benchmarks/depthwise_ops.py                         # every shape (see --slow)
    python benchmarks/depthwise_ops.py --formulations --quick

Writes ``benchmarks/results/depthwise_ops_<device>.json`` and ``.md`` (``--out`` to change the folder).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_lk.blocks import depthwise as dw
from nnunet_lk.networks import build_backbone, get_backbone, list_backbones

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLANS = ROOT / "tests" / "fixtures" / "hippocampus_plans.json"


# ---- shapes ------------------------------------------------------------------------------------------------
def _trainer_networks(configuration: str, batch: int):
    """(backbone, network, batch, input channels) built by each backbone's trainer from the Hippocampus plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.training import trainers

    plans = PlansManager(json.loads(PLANS.read_text()))
    cm = plans.get_configuration(configuration)
    dim = len(cm.patch_size)
    for name in list_backbones():
        if dim not in get_backbone(name).dims:
            continue
        trainer = next(t for t in vars(trainers).values()
                       if isinstance(t, type) and getattr(t, "backbone", None) == name
                       and t.__name__ == "nnUNetTrainer" + _trainer_suffix(name))
        net = trainer.build_network_architecture(plans, cm, 1, 3, True)
        yield name, net, [batch, 1, *cm.patch_size]


def _trainer_suffix(name: str) -> str:
    return {"dlkunet_s": "DLKUNetS", "dlkunet_m": "DLKUNetM", "dlkunet_l": "DLKUNetL", "lgmsnet": "LGMSNet",
            "lmnet": "LMNet", "mslkseg": "MSLKSeg"}[name]


def _kvasir_networks(batch: int = 4, patch=(256, 256)):
    strides, size = [[1, 1]], list(patch)
    while len(strides) < 7 and all(s // 2 >= 4 for s in size):
        strides.append([2, 2])
        size = [s // 2 for s in size]
    for name in list_backbones():
        if 2 in get_backbone(name).dims:
            net = build_backbone(name, dim=2, input_channels=3, num_classes=2, strides=strides,
                                 kernel_sizes=[[3, 3]] * len(strides), patch_size=list(patch), deep_supervision=True)
            yield name, net, [batch, 3, *patch]


SETTINGS = {"hippocampus_2d": lambda: _trainer_networks("2d", 8),
            "hippocampus_3d_fullres": lambda: _trainer_networks("3d_fullres", 2),
            "kvasir_2d_256": lambda: _kvasir_networks(4)}


def collect_shapes(settings):
    """Distinct depthwise convs: key -> record with the networks and settings that run it."""
    shapes = {}
    for setting in settings:
        for name, net, input_shape in SETTINGS[setting]():
            seen = []

            def hook(module, args, out):
                x = args[0]
                key = (x.dim() - 2, tuple(x.shape), tuple(module.kernel_size), tuple(module.stride),
                       tuple(module.padding), tuple(module.dilation), module.bias is not None)
                seen.append(key)

            handles = [m.register_forward_hook(hook) for m in net.modules()
                       if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.groups == m.in_channels > 1
                       and m.out_channels == m.groups]
            with torch.no_grad():
                net.train()(torch.randn(*input_shape))
            for h in handles:
                h.remove()
            for key in seen:
                rec = shapes.setdefault(key, {"dim": key[0], "input": list(key[1]), "kernel": list(key[2]),
                                              "stride": list(key[3]), "padding": list(key[4]),
                                              "dilation": list(key[5]), "bias": key[6], "calls": 0,
                                              "used_by": []})
                rec["calls"] += 1
                tag = f"{setting}:{name}"
                if tag not in rec["used_by"]:
                    rec["used_by"].append(tag)
            del net
    return list(shapes.values())


def quick_subset(shapes):
    """One Hippocampus shape (the first level's) per main kernel family: 2D 7x7 dil 3 (DLKUNet), 21x21
    (MS-LKSeg), 5x5 (LM-Net); 3D 7³ dil 3 (DLKUNet, its smallest), 7³ (MS-LKSeg), 5³ (LM-Net), 3³."""
    wanted = [(2, (7, 7), (3, 3), 96), (2, (21, 21), (1, 1), 32), (2, (5, 5), (1, 1), 24),
              (3, (7, 7, 7), (3, 3, 3), 384), (3, (7, 7, 7), (1, 1, 1), 32), (3, (5, 5, 5), (1, 1, 1), 24),
              (3, (3, 3, 3), (1, 1, 1), 24)]
    out = []
    for dim, k, d, channels in wanted:
        cands = [s for s in shapes if s["dim"] == dim and tuple(s["kernel"]) == k and tuple(s["dilation"]) == d
                 and s["input"][1] == channels and any(u.startswith("hippocampus") for u in s["used_by"])]
        if cands:
            out.append(max(cands, key=flops))
    return out


def per_family(shapes, n: int):
    """At most ``n`` shapes per (dim, kernel, dilation, stride) family, spread over its FLOP range."""
    families = {}
    for s in shapes:
        families.setdefault((s["dim"], tuple(s["kernel"]), tuple(s["dilation"]), tuple(s["stride"])), []).append(s)
    out = []
    for group in families.values():
        group = sorted(group, key=flops, reverse=True)
        picks = sorted({round(i * (len(group) - 1) / max(n - 1, 1)) for i in range(min(n, len(group)))})
        out += [group[i] for i in picks]
    return out


def out_spatial(s):
    return [(i + 2 * p - d * (k - 1) - 1) // st + 1
            for i, k, st, p, d in zip(s["input"][2:], s["kernel"], s["stride"], s["padding"], s["dilation"])]


def flops(s) -> float:
    n, c = s["input"][:2]
    return 2.0 * n * c * math.prod(out_spatial(s)) * math.prod(s["kernel"])


# ---- timing -----------------------------------------------------------------------------------------------
def interleaved(fns, repeats: int, slow: float):
    """Warm up each callable once (the cold time is kept), then time them interleaved; a warm-up longer than
    ``slow`` seconds cuts the repeats to one. Returns {name: {cold, times, median, min, ratio}}, ratio =
    median of (time / time of the first callable) over the paired runs."""
    names = list(fns)
    cold = {}
    for k in names:
        t = time.perf_counter()
        fns[k]()
        cold[k] = time.perf_counter() - t
    if max(cold.values()) > slow:  # too slow to repeat: one warm call each
        repeats = 1
    times = {k: [] for k in names}
    for _ in range(repeats):
        for k in names:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    base = times[names[0]]
    return {k: {"cold_s": cold[k], "times_s": v, "median_s": statistics.median(v), "min_s": min(v),
                "ratio_to_first": statistics.median(a / b for a, b in zip(v, base))} for k, v in times.items()}


def sgemm_peak(device: str, n: int = 2048, tries: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(tries):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tensors(s, device, layout="nchw"):
    dim = s["dim"]
    x = torch.randn(*s["input"], device=device)
    c = s["input"][1]
    w = torch.randn(c, 1, *s["kernel"], device=device) * 0.1
    b = torch.randn(c, device=device) if s["bias"] else None
    g = torch.randn(s["input"][0], c, *out_spatial(s), device=device)
    if layout == "channels_last":
        x, g = dw.to_channels_last(x), dw.to_channels_last(g)
    return x, w, b, g, dim


def time_shape(s, device, repeats, slow):
    x, w, b, g, dim = _tensors(s, device)
    args = (tuple(s["stride"]), tuple(s["padding"]), tuple(s["dilation"]), s["input"][1])
    conv = F.conv2d if dim == 2 else F.conv3d

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, w, b, *args)
            _sync(device)
        return run

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    bg = b.clone().requires_grad_() if b is not None else None

    def fwd_bwd(fn):
        def run():
            xg.grad = wg.grad = None
            if bg is not None:
                bg.grad = None
            fn(xg, wg, bg, *args).backward(g)
            _sync(device)
        return run

    res = {"forward": interleaved({"torch": fwd(conv), "ours": fwd(dw.grouped_conv)}, repeats, slow),
           "forward_backward": interleaved({"torch": fwd_bwd(conv), "ours": fwd_bwd(dw.grouped_conv)}, repeats, slow)}
    # agreement of ours with torch (forward, and the three gradients)
    with torch.no_grad():
        err_f = _rel(dw.grouped_conv(x, w, b, *args), conv(x, w, b, *args))
    grads = []
    for fn in (conv, dw.grouped_conv):
        xg.grad = wg.grad = None
        if bg is not None:
            bg.grad = None
        fn(xg, wg, bg, *args).backward(g)
        grads.append([t.grad.clone() for t in (xg, wg, bg) if t is not None])
    res["max_rel_error"] = {"forward": err_f, **{n: _rel(a, r) for n, a, r in zip(("grad_input", "grad_weight",
                                                                                     "grad_bias"), grads[1], grads[0])}}
    return res


def _rel(a, ref) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def time_formulations(s, device, repeats, slow, layout):
    """Each candidate formulation alone, outputs converted to the input's layout (as the autograd Function
    returns them). First entry of each group = torch's default path on that layout (the ratio baseline)."""
    x, w, b, g, dim = _tensors(s, device, layout)
    st, p, d = tuple(s["stride"]), tuple(s["padding"]), tuple(s["dilation"])
    c = s["input"][1]
    cl = layout == "channels_last"
    conv = F.conv2d if dim == 2 else F.conv3d
    k = tuple(s["kernel"])

    def keep(t):
        return dw._in_layout(t, cl)

    fwd = {"torch": lambda: conv(x, w, b, st, p, d, c),
           "channels_last": lambda: keep(dw.forward_channels_last(x, w, b, st, p, d))}
    gi = {"torch": lambda: dw.torch_backward(g, x, w, st, p, d, cl, (True, False, False))[0],
          "torch_cl": lambda: keep(dw.torch_backward(g, x, w, st, p, d, True, (True, False, False))[0]),
          "transposed": lambda: keep(dw.grad_input_transposed(g, w, x.shape, st, p, d))}
    if all(v == 1 for v in st):
        gi["flipped"] = lambda: keep(dw.grad_input_flipped(g, w, p, d))
    gw = {"torch": lambda: dw.torch_backward(g, x, w, st, p, d, cl, (False, True, False))[1],
          "torch_cl": lambda: dw.torch_backward(g, x, w, st, p, d, True, (False, True, False))[1],
          "folded": lambda: dw.grad_weight_folded(g, x, k, st, p, d)}
    return {"forward": interleaved(fwd, repeats, slow), "grad_input": interleaved(gi, repeats, slow),
            "grad_weight": interleaved(gw, repeats, slow)}


# ---- report -----------------------------------------------------------------------------------------------
def describe(s) -> str:
    k = "x".join(map(str, s["kernel"]))
    extra = "".join([f" d{s['dilation'][0]}" if any(v > 1 for v in s["dilation"]) else "",
                     f" s{s['stride'][0]}" if any(v > 1 for v in s["stride"]) else ""])
    return f"{s['dim']}D {k}{extra}{'' if s['bias'] else ' nb'}, {'x'.join(map(str, s['input']))}"


def _gflops(flop: float, seconds: float) -> float:
    return flop / seconds / 1e9


def _row(r, peak: float) -> str:
    f, fb = r["forward"], r["forward_backward"]
    used = ", ".join(sorted({u.split(":")[1] for u in r["used_by"]}))
    settings = ", ".join(sorted({u.split(":")[0] for u in r["used_by"]}))
    cells = [describe(r), f"{used} ({settings})"]
    for res, mult in ((f, 1), (fb, 3)):
        torch_rate = _gflops(mult * r["flops"], res["torch"]["median_s"])
        ours_rate = _gflops(mult * r["flops"], res["ours"]["median_s"])
        cells += [f"{res['torch']['median_s'] * 1e3:.1f}", f"{res['ours']['median_s'] * 1e3:.1f}",
                  f"{1 / res['ours']['ratio_to_first']:.2f}x",
                  f"{torch_rate:.1f} → {ours_rate:.1f} ({100 * ours_rate / peak:.0f}%)"]
    cells.append(f"{max(r['max_rel_error'].values()):.0e}")
    return "| " + " | ".join(cells) + " |"


def markdown(record) -> str:
    peak = record["sgemm_gflops"]
    lines = [
        f"# Depthwise convolutions: torch default vs nnunet_lk.blocks.depthwise ({record['device']})", "",
        f"{record['machine']}, torch {record['torch']}, {record['threads']} threads, fp32, contiguous (NCHW/NCDHW) "
        f"tensors as the networks run. Interleaved runs (torch, ours, torch, ...), {record['repeats']} repeats "
        f"(1 where a first call takes more than {record['slow_s']} s; first calls, which include oneDNN's one-time "
        f"kernel creation, are in the JSON as cold_s): median ms; speed-up = 1 / median of the paired ratios "
        f"ours/torch. GFLOP/s: 2·N·C·Π(out)·Π(k) forward, 3x that forward+backward; % = of the fp32 sgemm peak "
        f"measured in this run ({peak:.0f} GFLOP/s, best 2048² torch.mm). Timings depend on the machine's load: "
        f"compare the ratios. 'nb': no bias; 'd3': dilation 3.", ""]
    if record["shapes"]:
        lines += ["| depthwise conv (N×C×spatial) | used by | fwd torch ms | fwd ours ms | fwd speed-up "
                  "| fwd GFLOP/s torch → ours (% peak) | fwd+bwd torch ms | fwd+bwd ours ms | fwd+bwd speed-up "
                  "| fwd+bwd GFLOP/s torch → ours (% peak) | max rel. err |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|"]
        lines += [_row(r, peak) for r in record["shapes"]]
    if record.get("totals"):
        t = record["totals"]
        lines += ["", f"Sum over these shapes, each weighted by how often it runs in one pass of every backbone in "
                      f"every setting: forward {t['forward_torch_s'] * 1e3:.0f} ms → "
                      f"{t['forward_ours_s'] * 1e3:.0f} ms; "
                      f"forward+backward {t['fb_torch_s'] * 1e3:.0f} ms → {t['fb_ours_s'] * 1e3:.0f} ms (medians)."]
    if record.get("formulations"):
        lines += ["", "## Formulations alone (time / torch's default on that layout, median of paired ratios)", "",
                  "| depthwise conv | layout | forward: channels_last | grad_input: torch_cl / flipped / transposed "
                  "| grad_weight: torch_cl / folded | torch ms (fwd / gi / gw) |", "|---|---|---|---|---|---|"]
        for r in record["formulations"]:
            for layout, res in r["layouts"].items():
                def ratio(group, name):
                    return f"{res[group][name]['ratio_to_first']:.2f}" if name in res[group] else "–"
                base = " / ".join(f"{res[g]['torch']['median_s'] * 1e3:.1f}"
                                  for g in ("forward", "grad_input", "grad_weight"))
                lines.append(f"| {describe(r)} | {layout} | {ratio('forward', 'channels_last')} | "
                             f"{ratio('grad_input', 'torch_cl')} / {ratio('grad_input', 'flipped')} / "
                             f"{ratio('grad_input', 'transposed')} | {ratio('grad_weight', 'torch_cl')} / "
                             f"{ratio('grad_weight', 'folded')} | {base} |")
    return "\n".join(lines) + "\n"


def _rounded(value):
    """Floats to 4 significant digits (the JSON stays readable and small)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--slow", type=float, default=3.0,
                        help="a first (warm-up) call longer than this (s) cuts that measurement to one repeat")
    parser.add_argument("--max-shapes", type=int, default=None, help="at most this many shapes (by FLOPs)")
    parser.add_argument("--per-family", type=int, default=None,
                        help="at most this many shapes per kernel family (largest to smallest)")
    parser.add_argument("--formulations", action="store_true",
                        help="also time each formulation alone, in both layouts (the rule's measurements)")
    parser.add_argument("--no-compare", action="store_true", help="with --formulations: skip torch-vs-ours")
    parser.add_argument("--list", action="store_true", help="print the shapes and exit")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ[dw.ENV] = "fast"
    shapes = collect_shapes(args.settings)
    shapes.sort(key=lambda s: (s["dim"], -flops(s)))
    if args.quick:
        shapes = quick_subset(shapes)
    if args.per_family:
        shapes = per_family(shapes, args.per_family)
    if args.max_shapes:
        shapes = sorted(shapes, key=flops, reverse=True)[:args.max_shapes]
        shapes.sort(key=lambda s: (s["dim"], -flops(s)))
    if args.list:
        for s in shapes:
            print(f"{describe(s):45s} calls {s['calls']:3d}  {flops(s)/1e9:7.3f} GFLOP  {', '.join(s['used_by'])}")
        return 0

    record = {"device": args.device, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "slow_s": args.slow,
              "settings": args.settings, "quick": args.quick, "sgemm_gflops": sgemm_peak(args.device),
              "shapes": [], "formulations": []}
    start = time.perf_counter()
    if not args.no_compare:
        for s in shapes:
            res = time_shape(s, args.device, args.repeats, args.slow)
            record["shapes"].append({**s, "flops": flops(s), **res})
            f, fb = res["forward"], res["forward_backward"]
            print(f"{describe(s):42s} fwd {f['torch']['median_s'] * 1e3:8.1f} -> {f['ours']['median_s'] * 1e3:7.1f} ms "
                  f"({1 / f['ours']['ratio_to_first']:5.2f}x)  fwd+bwd {fb['torch']['median_s'] * 1e3:8.1f} -> "
                  f"{fb['ours']['median_s'] * 1e3:7.1f} ms ({1 / fb['ours']['ratio_to_first']:5.2f}x)  "
                  f"err {max(res['max_rel_error'].values()):.0e}", flush=True)
        rows = record["shapes"]
        record["totals"] = {
            "forward_torch_s": sum(r["calls"] * r["forward"]["torch"]["median_s"] for r in rows),
            "forward_ours_s": sum(r["calls"] * r["forward"]["ours"]["median_s"] for r in rows),
            "fb_torch_s": sum(r["calls"] * r["forward_backward"]["torch"]["median_s"] for r in rows),
            "fb_ours_s": sum(r["calls"] * r["forward_backward"]["ours"]["median_s"] for r in rows)}
    if args.formulations:
        for s in shapes:
            layouts = {layout: time_formulations(s, args.device, args.repeats, args.slow, layout)
                       for layout in ("nchw", "channels_last")}
            record["formulations"].append({**s, "flops": flops(s), "layouts": layouts})
            for layout, res in layouts.items():
                parts = [grp + " " + " ".join(f"{n}={v['median_s'] * 1e3:.1f}ms/{v['ratio_to_first']:.2f}"
                                              for n, v in group.items()) for grp, group in res.items()]
                print(f"{describe(s):42s} {layout:13s} " + " | ".join(parts), flush=True)
    record["sgemm_gflops"] = max(record["sgemm_gflops"], sgemm_peak(args.device))
    record["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"depthwise_ops_{args.device.split(':')[0]}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(_rounded(record), indent=1))
    (out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out / stem}.json and .md ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
