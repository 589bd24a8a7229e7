"""``nnunet-lk bench`` outputs: the markdown table, the speed targets checked on the measured figures,
and the JSON + markdown files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from ..nnunet_io import STOCK_TRAINER
from .measure import VARIANT_LABELS

# speed targets: 3D training step >= 5x faster than torch's depthwise path; 2D training-step ratio to stock at
# least halved (same stock figure, so a speed-up >= 2x); LGMSNet and LM-Net 2D eval latency <= stock's
TRAIN_SPEEDUP_TARGET = {2: 2.0, 3: 5.0}
LATENCY_AT_MOST_STOCK_2D = ("lgmsnet", "lmnet")


def fmt_count(n: float) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _ratio(r: dict, key: str) -> str:
    value = r.get("ratio_to_stock", {}).get(key)
    return f" ({value:.2f}×)" if value is not None and r["trainer"] != STOCK_TRAINER else ""


def _levels(r: dict) -> str:
    return f" ({r['levels']} levels)" if r.get("levels") else ""


def _timing(r: dict, key: str) -> str:
    t = r.get(key)
    return "–" if t is None else f"{t['median']:.2f} [{t['q1']:.2f}–{t['q3']:.2f}]"


def _path(r: dict) -> str:
    return "nnU-Net's own" if r["trainer"] == STOCK_TRAINER else VARIANT_LABELS.get(r.get("variant", "shipped"), "")


def _speedup(r: dict, key: str) -> str:
    value = r.get("speedup_vs_torch_path", {}).get(key)
    return "–" if value is None else f"{value:.2f}×"


def row(r: dict) -> str:
    return (f"| {r['backbone']}{_levels(r)} | {r['trainer']} | {_path(r)} | {fmt_count(r['params'])}"
            f"{_ratio(r, 'params')} | {r['macs'] / 1e9:.3f} G{_ratio(r, 'macs')} | "
            f"{_timing(r, 'latency_ms')}{_ratio(r, 'latency_ms_median')} | "
            f"{_timing(r, 'latency_unfused_ms')}{_ratio(r, 'latency_unfused_ms_median')} | "
            f"{_timing(r, 'train_step_ms')}{_ratio(r, 'train_step_ms_median')} | "
            f"{_speedup(r, 'latency_ms_median')} | {_speedup(r, 'train_step_ms_median')} | "
            f"{r['inference_memory_mib']:.0f}{_ratio(r, 'inference_memory_mib')} | "
            f"{r['train_memory_mib']:.0f}{_ratio(r, 'train_memory_mib')} | "
            f"{_peak(r, 'inference')} | {_peak(r, 'train')} |")


def _peak(r: dict, kind: str) -> str:
    """Measured peak tensor memory (× stock), and the shape-only estimate with its error."""
    if f"{kind}_peak_mib" not in r:
        return "–"
    error = r.get(f"{kind}_estimate_error")
    estimate = (f"; est. {r[f'{kind}_estimate_mib']:.0f} ({100 * error:+.0f}%)" if error is not None else "")
    return f"{r[f'{kind}_peak_mib']:.0f}{_ratio(r, f'{kind}_peak_mib')}{estimate}"


def markdown_table(record: dict) -> str:
    mem = "GPU max allocated MiB" if record["device"].startswith("cuda") else "RSS above base MiB"
    lines = [
        f"# nnunet-lk bench: {record['dataset']} {record['configuration']} ({record['plans']})",
        "",
        f"Device {record['device']} ({record['device_name']}, {record['threads']} threads"
        f"{', AMP' if record['amp'] else ''}), torch {record['torch']}, nnunetv2 {record['nnunetv2']}. "
        f"Patch {record['patch_size']}, {record['input_channels']} input channel(s), {record['output_channels']} "
        f"outputs. Latency: eval-mode forward of one patch (batch 1); train step: forward + loss + backward + "
        f"SGD step at batch {record['train_batch']} with deep supervision. {record['warmup']} warm-up, "
        f"{record['repeats']} repeats: median [quartiles] in ms. Each network measured in "
        f"{'its own fresh process' if record['isolated_processes'] else 'one shared process'}, a backbone's "
        f"variants one after the other. (×) = ratio to stock nnU-Net (lower is smaller/faster); speed-up = "
        f"time with torch's depthwise path / time of this row. Peak MiB: tensor memory of one inference forward / "
        f"one training step (weights, optimiser state and inputs included; "
        f"{'torch.cuda.max_memory_allocated' if record['device'].startswith('cuda') else 'torch.profiler memory events'}"
        f"), beside the shape-only estimate (`nnunet_lk.memory.estimate`, torch's own convolutions"
        f"{', AMP dtypes' if record['amp'] else ''}) and its error.",
        "",
        f"| network | trainer | depthwise path | params | MACs/patch | latency ms | unfused latency ms | "
        f"train step ms | latency speed-up | train speed-up | inference {mem} | train {mem} | "
        f"inference peak MiB | train step peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(r) for r in record["results"] if r["status"] == "ok"]
    if any(r.get("reparam_modules") for r in record["results"]):
        lines += ["", "Unfused latency: every re-parameterisable block runs its parallel conv+BN branches "
                      "(training form); its ratio is to stock nnU-Net's latency."]
    lines += profile_table(record)
    checks = target_checks(record)
    if checks:
        lines += ["", "Speed targets of the depthwise op (each against torch's own depthwise path):", ""]
        lines += [f"- {c['text']}" for c in checks]
    others = [r for r in record["results"] if r["status"] != "ok"]
    if others:
        lines += ["", "Not measured:", ""]
        for r in others:
            reason = r["reason"].strip().splitlines()[-1] if r.get("reason") else ""
            lines.append(f"- {r['trainer']} ({_path(r)}): {r['status']}: {reason}")
    return "\n".join(lines) + "\n"


def profile_table(record: dict) -> List[str]:
    lines = []
    for key, what in (("latency_profile", "one inference forward"), ("train_step_profile", "one training step")):
        rows = [r for r in record["results"] if r["status"] == "ok" and r.get(key)]
        if not rows:
            continue
        categories = sorted({c for r in rows for c in r[key]}, key=lambda c: -max(r[key].get(c, 0) for r in rows))
        lines += ["", f"Where {what} goes (share of self CPU time, profiled once; depthwise = a (C, 1, *k) weight, "
                      f"including the forward convs our op writes its backward as):", "",
                  "| network | trainer | depthwise path | " + " | ".join(categories) + " |",
                  "|---|---|---|" + "---:|" * len(categories)]
        for r in rows:
            shares = " | ".join(f"{100 * r[key].get(c, 0):.0f}%" for c in categories)
            lines.append(f"| {r['backbone']} | {r['trainer']} | {_path(r)} | {shares} |")
    return lines


def _rows_by_backbone(record: dict) -> Dict[str, Dict[str, dict]]:
    rows: Dict[str, Dict[str, dict]] = {}
    for r in record["results"]:
        if r["status"] == "ok" and r["trainer"] != STOCK_TRAINER:
            rows.setdefault(r["backbone"], {})[r.get("variant", "shipped")] = r
    return rows


def target_checks(record: dict) -> List[dict]:
    """The speed targets, each as {backbone, target, value, met, text}, from the figures of this run (CPU
    runs with the torch path measured; nothing is checked otherwise)."""
    if record["device"] != "cpu":
        return []
    dims = len(record["patch_size"])
    checks = []
    for backbone, variants in sorted(_rows_by_backbone(record).items()):
        best = _as_shipped(variants, "train_step_ms_median")
        if "torch" in variants and best is not None:
            speedup = variants["torch"]["train_step_ms_median"] / best["train_step_ms_median"]
            need = TRAIN_SPEEDUP_TARGET[dims]
            checks.append(_check(backbone, f"train step >= {need:g}x faster than torch's depthwise path",
                                 speedup, speedup >= need, f"{speedup:.2f}x ({VARIANT_LABELS[best['variant']]})",
                                 _amdahl(variants["torch"])))
        if dims == 2 and backbone in LATENCY_AT_MOST_STOCK_2D:
            fastest = _as_shipped(variants, "latency_ms_median")
            ratio = fastest.get("ratio_to_stock", {}).get("latency_ms_median") if fastest else None
            if ratio is not None:
                checks.append(_check(backbone, "eval latency <= stock nnU-Net's", ratio, ratio <= 1.0,
                                     f"{ratio:.2f}x stock ({VARIANT_LABELS[fastest['variant']]})"))
    return checks


def _as_shipped(variants: Dict[str, dict], key: str) -> Optional[dict]:
    """The row measured in the layout the backbone ships with (``shipped_channels_last``); without that
    record (older results), the fastest of our rows by ``key``."""
    ours = [r for v, r in variants.items() if v != "torch"]
    shipped = [r for r in ours if "shipped_channels_last" in r and r["channels_last"] == r["shipped_channels_last"]]
    return shipped[0] if shipped else (min(ours, key=lambda r: r[key]) if ours else None)


def _amdahl(torch_row: dict) -> str:
    """Why a speed-up is bounded: the depthwise convs' share of the step on torch's path (Amdahl's law)."""
    share = torch_row.get("train_step_profile", {}).get("depthwise convs")
    if share is None:
        return ""
    bound = f"{1 / (1 - share):.1f}x" if share < 1 else "unbounded"
    return (f" (depthwise convs were {100 * share:.0f}% of the step on torch's path: making them free would give "
            f"at most {bound})")


def _check(backbone: str, target: str, value: float, met: bool, shown: str, why: str = "") -> dict:
    return {"backbone": backbone, "target": target, "value": round(value, 4), "met": bool(met),
            "text": f"{backbone}: {target}: {shown}: {'met' if met else 'missed'}{why if not met else ''}"}


def write_outputs(record: dict, out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{record['dataset']}_{record['configuration']}_{record['plans']}_{record['device'].split(':')[0]}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps({**record, "targets": target_checks(record)}, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(record))
    return paths
