"""``nnunet-lk bench``: every backbone and stock nnU-Net built from the same nnU-Net plans, measured side
by side (issue 6).

For one dataset's plans and configuration, each network is built exactly as training builds it (the
trainer class's ``build_network_architecture``) and measured: parameters, MACs (torch's FLOP counter),
eval-mode forward latency per patch (batch 1), the time of one training step (forward + loss + backward
+ gradient clipping + SGD step, as ``nnUNetTrainer.train_step`` does) at the plans' batch, and memory.
Re-parameterisable backbones (``ReparamDepthwise``) get fused and unfused latency, timed interleaved repeat
by repeat (timed one after the other, the first form measured carried the warm-up).

Each network is measured in a fresh Python process (``python -m nnunet_lk.bench`` reads a JSON job on
stdin), one after the other: the peak RSS read there belongs to that network alone, and no network
warms caches or fragments the allocator for the next. On CUDA, memory is ``torch.cuda.max_memory_allocated``
and both inference and training run under AMP, as nnU-Net trains and predicts.
"""
from __future__ import annotations

import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .blocks.reparam import unfused
from .errors import UsageError
from .nnunet_io import dataset_name  # noqa: F401  (re-exported: ablate and the CLI resolve names here)
from .networks.unet import count_parameters

STOCK_TRAINER = "nnUNetTrainer"
STOCK_BUDGET_TRAINER = "nnUNetTrainerStockBudget"
STOCK_TRAINERS = (STOCK_TRAINER, STOCK_BUDGET_TRAINER)

# figure -> whether a smaller value is better (all of them are); ratios are value / stock value
RATIO_KEYS = ("params", "params_without_ds_heads", "macs", "latency_ms_median", "latency_unfused_ms_median",
              "train_step_ms_median", "inference_memory_mib", "train_memory_mib")


# ---- trainers and plans ---------------------------------------------------------------------------------
def default_trainers() -> List[str]:
    """One trainer per registered backbone: the plain one (default sigmoid loss schedule, no suffix)."""
    from .training.trainers import all_trainers
    by_backbone: Dict[str, List[str]] = {}
    for name, cls in all_trainers().items():
        by_backbone.setdefault(cls.backbone, []).append(name)
    chosen = []
    for backbone, names in sorted(by_backbone.items()):
        plain = [n for n in names if "_" not in n] or names
        chosen.append(min(plain, key=len))
    return chosen


def resolve_trainer(name: str):
    """Trainer class by name: ours, our stock-budget wrapper, then nnU-Net's own lookup."""
    from .training.trainers import all_trainers
    ours = all_trainers()
    if name in ours:
        return ours[name]
    if name == STOCK_TRAINER:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    if name == STOCK_BUDGET_TRAINER:
        from .training.stock import nnUNetTrainerStockBudget
        return nnUNetTrainerStockBudget
    from .nnunet_io import find_trainer_class
    return find_trainer_class(name, not_found_hint=f"unknown trainer {name!r}: not an nnunet-lk trainer "
                                                   f"(`nnunet-lk list`) and nnU-Net cannot find it")


def load_plans(dataset: str, plans_name: str = "nnUNetPlans"):
    """(plans, dataset_json, dataset folder name) from $nnUNet_preprocessed/DatasetXXX/."""
    from nnunetv2.paths import nnUNet_preprocessed
    if not nnUNet_preprocessed:
        raise UsageError("nnUNet_preprocessed is not set; export it to nnU-Net's preprocessed folder")
    name = dataset_name(dataset)
    folder = Path(nnUNet_preprocessed) / name
    plans_file, dataset_file = folder / f"{plans_name}.json", folder / "dataset.json"
    for f in (plans_file, dataset_file):
        if not f.is_file():
            raise UsageError(f"{f} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first "
                             f"(or name existing plans with -p)")
    return json.loads(plans_file.read_text()), json.loads(dataset_file.read_text()), name


def plans_context(plans: dict, dataset_json: dict, configuration: str):
    """(plans manager, configuration manager, input channels, output channels) as nnU-Net derives them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise UsageError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{', '.join(plans.get('configurations', {}))}")
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    return pm, cm, n_in, n_out


def precheck(trainer: str, patch_size: Sequence[int]) -> Optional[str]:
    """Why a trainer cannot build this configuration (None if it may): cheap, before any process starts."""
    from .networks import get_backbone
    cls = resolve_trainer(trainer)
    backbone = getattr(cls, "backbone", None)
    if backbone is None:
        return None
    dims = get_backbone(backbone).dims
    if len(patch_size) not in dims:
        return (f"{backbone} is a {'/'.join(f'{d}D' for d in dims)} network and this configuration is "
                f"{len(patch_size)}D")
    return None


def build_network(trainer: str, plans: dict, dataset_json: dict, configuration: str, deep_supervision: bool):
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    cls = resolve_trainer(trainer)
    return cls.build_network_architecture(pm, cm, n_in, n_out, deep_supervision), (pm, cm, n_in, n_out)


# ---- measuring one network ------------------------------------------------------------------------------
def timing_stats(seconds: List[float]) -> dict:
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": round(statistics.median(ms), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "min": round(ms[0], 3), "max": round(ms[-1], 3), "all": [round(v, 3) for v in ms]}


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 ** 2 if sys.platform == "darwin" else 1024)


def measure_network(job: dict) -> dict:
    """Every figure of one network. ``job``: trainer, plans, dataset_json, configuration, batch (None =
    the plans'), warmup, repeats, device, threads (0 = torch default)."""
    import numpy as np
    import torch

    from .analysis import count_macs
    from .blocks.reparam import ReparamDepthwise
    from .networks.unet import NetworkConfigError

    baseline_rss = _peak_rss_mib()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = torch.device(job.get("device", "cpu"))
    cuda = device.type == "cuda"
    trainer, configuration = job["trainer"], job["configuration"]
    warmup, repeats = int(job.get("warmup", 2)), int(job.get("repeats", 5))
    torch.manual_seed(0)
    try:
        net, (pm, cm, n_in, n_out) = build_network(trainer, job["plans"], job["dataset_json"], configuration,
                                                  deep_supervision=False)
    except (NetworkConfigError, NotImplementedError) as e:
        return {"trainer": trainer, "status": "skipped", "reason": str(e)}
    patch = list(cm.patch_size)
    batch = int(job.get("batch") or cm.batch_size)
    result = {
        "trainer": trainer, "status": "ok", "backbone": getattr(resolve_trainer(trainer), "backbone", None) or "stock nnU-Net",
        "network_class": type(net).__name__, "patch_size": patch, "input_channels": n_in, "output_channels": n_out,
        "train_batch": batch, "params": sum(p.numel() for p in net.parameters()),
        "params_without_ds_heads": count_parameters(net, deep_supervision_heads=False),
        "macs": count_macs(net, (1, n_in, *patch)),
    }
    # resolution levels actually built (ours: min(paper depth, plan stages); stock: the plans' stages)
    result["levels"] = len(getattr(net, "level_strides", None) or cm.network_arch_init_kwargs.get("strides", []))
    reparams = [m for m in net.modules() if isinstance(m, ReparamDepthwise)]
    result["reparam_modules"] = len(reparams)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    autocast = (lambda: torch.autocast("cuda", enabled=True)) if cuda else contextlib.nullcontext

    # -- inference: eval mode, batch 1, as nnU-Net's sliding window predicts one patch at a time
    net = net.to(device).eval()
    x = torch.randn(1, n_in, *patch, device=device)

    # Forms of the network timed side by side: the inference form, and for re-parameterisable backbones
    # the unfused branches too, interleaved repeat by repeat so that load and warm-up hit both alike.
    forms = {"latency_ms": contextlib.nullcontext}
    if reparams:
        forms["latency_unfused_ms"] = lambda: unfused(net)
    times = {key: [] for key in forms}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast():
        net(x)  # the inference form alone first: its memory is what is reported
    if cuda:
        result["inference_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    else:
        result["inference_memory_mib"] = round(_peak_rss_mib() - baseline_rss, 1)
    with torch.inference_mode(), autocast():
        for i in range(warmup + repeats):
            for key, form in forms.items():
                with form():  # entering/leaving the unfused form is not timed
                    sync()
                    start = time.perf_counter()
                    net(x)
                    sync()
                    elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[key].append(elapsed)
    for key, values in times.items():
        result[key] = timing_stats(values)
        result[f"{key}_median"] = result[key]["median"]
    if reparams:
        with torch.inference_mode(), autocast():
            fused_out = net(x)
            with unfused(net):
                unfused_out = net(x)
        result["fused_vs_unfused_max_abs_diff"] = float((fused_out.float() - unfused_out.float()).abs().max())
    del net, x

    # -- one training step, as nnUNetTrainer.train_step: deep supervision on, nnU-Net's loss, SGD, clipping
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    torch.manual_seed(0)
    net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, True).to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    loss_fn = DC_and_CE_loss({"batch_dice": cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    data = torch.randn(batch, n_in, *patch, device=device)
    with torch.no_grad(), autocast():
        shapes = [o.shape[2:] for o in _as_list(net(data[:1]))]
    # targets at every output resolution (nnU-Net downsamples the label to the deep-supervision scales)
    targets = [torch.randint(0, n_out, (batch, 1, *s), device=device).float() for s in shapes]
    weights = np.array([1 / 2 ** i for i in range(len(shapes))])
    if len(shapes) > 1:
        weights[-1] = 0
    weights = weights / weights.sum()
    loss_fn = DeepSupervisionWrapper(loss_fn, weights) if len(shapes) > 1 else loss_fn

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = _as_list(net(data))
            loss = loss_fn(out, targets) if len(shapes) > 1 else loss_fn(out[0], targets[0])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result["train_step_ms"] = timing_stats(times)
    result["train_step_ms_median"] = result["train_step_ms"]["median"]
    if cuda:
        result["train_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        result["memory_kind"] = "torch.cuda.max_memory_allocated (AMP)"
    else:
        peak = _peak_rss_mib()
        result["peak_rss_mib"] = round(peak, 1)
        result["baseline_rss_mib"] = round(baseline_rss, 1)
        result["train_memory_mib"] = round(peak - baseline_rss, 1)
        result["memory_kind"] = "peak RSS above the process's RSS before the network was built"
    return result


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _measure_in_subprocess(job: dict, timeout: Optional[float]) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "nnunet_lk.bench"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # one slow network must not lose the others' figures
        return {"trainer": job["trainer"], "status": "timeout",
                "reason": f"not measured within --timeout {timeout:g} s; raise --timeout or lower --repeats/--batch"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"trainer": job["trainer"], "status": "error", "reason": f"measuring process exited "
                                                                        f"{proc.returncode}: {tail.strip()}"}
    return json.loads(lines[-1])


# ---- the whole run --------------------------------------------------------------------------------------
def run_bench(plans: dict, dataset_json: dict, configuration: str, *, trainers: Optional[Sequence[str]] = None,
              batch: Optional[int] = None, warmup: int = 2, repeats: int = 5, device: str = "cpu",
              threads: int = 0, isolate: bool = True, dataset: str = "", plans_name: str = "",
              timeout: Optional[float] = None, log=print) -> dict:
    """Measure stock nnU-Net and every trainer's network; returns the results record (see ``write_outputs``)."""
    import torch
    import nnunetv2

    if repeats < 1 or warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats}, {warmup})")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    _, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    names = list(trainers) if trainers else default_trainers()
    names = [STOCK_TRAINER] + [t for t in names if t != STOCK_TRAINER]
    results = []
    for i, trainer in enumerate(names, 1):
        reason = precheck(trainer, cm.patch_size)
        if reason is not None:
            log(f"[{i}/{len(names)}] {trainer}: skipped ({reason})")
            results.append({"trainer": trainer, "status": "skipped", "reason": reason})
            continue
        log(f"[{i}/{len(names)}] {trainer}: measuring ({'fresh process' if isolate else 'in process'}) ...")
        job = {"trainer": trainer, "plans": plans, "dataset_json": dataset_json, "configuration": configuration,
               "batch": batch, "warmup": warmup, "repeats": repeats, "device": device, "threads": threads}
        start = time.perf_counter()
        r = _measure_in_subprocess(job, timeout) if isolate else measure_network(job)
        if r["status"] == "ok":
            log(f"    {_fmt_count(r['params'])} params, {r['macs'] / 1e9:.3f} GMACs, latency "
                f"{r['latency_ms_median']:.2f} ms, train step {r['train_step_ms_median']:.1f} ms "
                f"({time.perf_counter() - start:.0f} s)")
        else:
            log(f"    {r['status']}: {r['reason'].splitlines()[-1] if r['reason'] else ''}")
        results.append(r)
    stock = results[0] if results[0]["status"] == "ok" else None
    for r in results:
        if r["status"] == "ok" and stock is not None:
            r["ratio_to_stock"] = {k: round(r[k] / stock[k], 4) for k in RATIO_KEYS
                                   if k in r and k in stock and stock[k]}
            if "latency_unfused_ms_median" in r and stock.get("latency_ms_median"):
                r["ratio_to_stock"]["latency_unfused_ms_median"] = round(
                    r["latency_unfused_ms_median"] / stock["latency_ms_median"], 4)
    return {
        "dataset": dataset, "configuration": configuration, "plans": plans_name or plans.get("plans_name", ""),
        "patch_size": list(cm.patch_size), "plans_batch": cm.batch_size, "train_batch": batch or cm.batch_size,
        "latency_batch": 1, "input_channels": n_in, "output_channels": n_out, "warmup": warmup, "repeats": repeats,
        "device": device, "device_name": _device_name(device), "threads": threads or torch.get_num_threads(),
        "amp": device.startswith("cuda"), "isolated_processes": isolate, "torch": torch.__version__,
        "nnunetv2": getattr(nnunetv2, "__version__", _dist_version("nnunetv2")), "python": platform.python_version(),
        "baseline": STOCK_TRAINER, "results": results,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# ---- reports --------------------------------------------------------------------------------------------
def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _ratio(r: dict, key: str) -> str:
    value = r.get("ratio_to_stock", {}).get(key)
    return f" ({value:.2f}×)" if value is not None and r["trainer"] != STOCK_TRAINER else ""


def _levels(r: dict) -> str:
    return f" ({r['levels']} levels)" if r.get("levels") else ""


def _timing(r: dict, key: str) -> str:
    t = r.get(key)
    return "–" if t is None else f"{t['median']:.2f} [{t['q1']:.2f}–{t['q3']:.2f}]"


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
        f"{'its own fresh process' if record['isolated_processes'] else 'one shared process'}. "
        f"(×) = ratio to stock nnU-Net (lower is smaller/faster).",
        "",
        f"| network | trainer | params | params w/o DS heads | MACs/patch | latency ms | unfused latency ms | "
        f"train step ms | inference {mem} | train {mem} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        if r["status"] != "ok":
            continue
        lines.append(
            f"| {r['backbone']}{_levels(r)} | {r['trainer']} | {_fmt_count(r['params'])}{_ratio(r, 'params')} | "
            f"{_fmt_count(r['params_without_ds_heads'])}{_ratio(r, 'params_without_ds_heads')} | "
            f"{r['macs'] / 1e9:.3f} G{_ratio(r, 'macs')} | {_timing(r, 'latency_ms')}{_ratio(r, 'latency_ms_median')} | "
            f"{_timing(r, 'latency_unfused_ms')}{_ratio(r, 'latency_unfused_ms_median')} | "
            f"{_timing(r, 'train_step_ms')}{_ratio(r, 'train_step_ms_median')} | "
            f"{r['inference_memory_mib']:.0f}{_ratio(r, 'inference_memory_mib')} | "
            f"{r['train_memory_mib']:.0f}{_ratio(r, 'train_memory_mib')} |")
    others = [r for r in record["results"] if r["status"] != "ok"]
    if any(r.get("reparam_modules") for r in record["results"]):
        lines += ["", "Unfused latency: every re-parameterisable block runs its parallel conv+BN branches "
                      "(training form); its ratio is to stock nnU-Net's latency."]
    if others:
        lines += ["", "Not measured:", ""]
        for r in others:
            lines.append(f"- {r['trainer']}: {r['status']}: {r['reason'].strip().splitlines()[-1] if r['reason'] else ''}")
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{record['dataset']}_{record['configuration']}_{record['plans']}_{record['device'].split(':')[0]}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(record))
    return paths


def _worker() -> int:
    job = json.loads(sys.stdin.read())
    try:
        result = measure_network(job)
    except Exception as e:  # reported as this network's error; the run goes on with the next network
        import traceback
        traceback.print_exc()
        result = {"trainer": job.get("trainer"), "status": "error", "reason": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
