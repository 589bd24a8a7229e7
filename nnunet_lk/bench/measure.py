"""Measuring one network (``python -m nnunet_lk.bench.measure`` reads a JSON job on stdin, prints a JSON line).

One network per process: its peak RSS is its own, and no network warms caches or fragments the allocator
for the next. A job names the trainer (whose ``build_network_architecture`` builds the network exactly as
training does), the plans, and a variant (``VARIANTS``): how the depthwise convolutions run and whether the
whole network runs channels-last.
"""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from typing import List

from .. import settings

# variant -> (environment for the measuring process, whole network channels-last on a CPU: None = as built)
VARIANTS = {
    "shipped": ({}, None),                                 # as the trainer builds it (the default)
    "torch": ({settings.DEPTHWISE: "torch"}, False),       # PyTorch's own depthwise path, contiguous
    "contiguous": ({}, False),                             # our depthwise op, contiguous tensors
    "channels_last": ({}, True),                           # our op, the whole network channels-last
}
VARIANT_LABELS = {"shipped": "as shipped", "torch": "torch depthwise", "contiguous": "ours, contiguous",
                  "channels_last": "ours, channels-last"}


def timing_stats(seconds: List[float]) -> dict:
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": round(statistics.median(ms), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "min": round(ms[0], 3), "max": round(ms[-1], 3), "all": [round(v, 3) for v in ms]}


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 ** 2 if sys.platform == "darwin" else 1024)


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


class Timer:
    """Wall-clock timing that waits for the device (CUDA runs asynchronously) and autocasts as nnU-Net does."""

    def __init__(self, device):
        import torch
        self.device, self.cuda = device, device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", enabled=True)) if self.cuda else contextlib.nullcontext

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def memory_mib(self, baseline_rss: float) -> float:
        import torch
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        return round(peak_rss_mib() - baseline_rss, 1)

    def reset_memory(self):
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats(self.device)


def set_layout(net, channels_last):
    """Our networks convert at their entry (``LKUNet.cpu_channels_last``); stock nnU-Net's stays as it is."""
    if channels_last is not None and hasattr(net, "cpu_channels_last"):
        net.cpu_channels_last = channels_last
    return net


def measure_inference(net, n_in: int, patch, timer: Timer, warmup: int, repeats: int, channels_last: bool,
                      baseline_rss: float, profile: bool = False) -> dict:
    """Eval mode, batch 1 (nnU-Net's sliding window predicts one patch at a time). Re-parameterisable
    backbones also run their unfused branches, interleaved repeat by repeat with the fused form so that load
    and warm-up hit both alike."""
    import torch
    from ..blocks.reparam import ReparamDepthwise, unfused

    net = set_layout(net.to(timer.device).eval(), channels_last)
    x = torch.randn(1, n_in, *patch, device=timer.device)
    reparam = any(isinstance(m, ReparamDepthwise) for m in net.modules())
    forms = {"latency_ms": contextlib.nullcontext}
    if reparam:
        forms["latency_unfused_ms"] = lambda: unfused(net)
    times = {key: [] for key in forms}
    result = {}
    timer.reset_memory()
    with torch.inference_mode(), timer.autocast():
        net(x)  # the inference form alone first: its memory is what is reported
    result["inference_memory_mib"] = timer.memory_mib(baseline_rss)

    def forward():
        with torch.inference_mode(), timer.autocast():
            net(x)
    result["inference_peak_mib"] = peak_of(forward, timer, net, inputs=[x])
    with torch.inference_mode(), timer.autocast():
        for i in range(warmup + repeats):
            for key, form in forms.items():
                with form():  # entering/leaving the unfused form is not timed
                    elapsed = timer.time(lambda: net(x))
                if i >= warmup:
                    times[key].append(elapsed)
        if reparam:
            fused_out = net(x)
            with unfused(net):
                unfused_out = net(x)
            result["fused_vs_unfused_max_abs_diff"] = float((fused_out.float() - unfused_out.float()).abs().max())
        if profile and not timer.cuda:
            result["latency_profile"] = profile_step(lambda: net(x))
    for key, values in times.items():
        if not values:
            continue
        result[key] = timing_stats(values)
        result[f"{key}_median"] = result[key]["median"]
    return result


# op-name fragments -> category of a profiled step (first match wins; convolutions are split by weight shape)
OP_CATEGORIES = (("attention", ("scaled_dot_product", "softmax", "bmm")),
                 ("norms", ("batch_norm", "instance_norm", "group_norm", "layer_norm")),
                 ("linear", ("aten::mm", "aten::addmm", "aten::linear")),
                 ("data movement", ("copy_", "cat", "index", "select", "fill_", "contiguous", "pad", "clone")))
CONV_OPS = ("mkldnn_convolution", "convolution_backward", "thnn_conv", "slow_conv", "conv_depthwise")


def _conv_category(name: str, shapes) -> str:
    # depthwise: a (C, 1, *k) weight, also the forward convs our op writes its backward as
    weight = shapes[2] if "backward" in name and len(shapes) > 2 else (shapes[1] if len(shapes) > 1 else [])
    return "depthwise convs" if len(weight) >= 4 and weight[1] == 1 and weight[0] > 1 else "other convs"


def profile_step(step) -> dict:
    """Share of one step's (a training step's, an inference forward's) self CPU time per op category
    (``OP_CATEGORIES``, depthwise vs other convolutions): what a speed-up of one kind of op can buy at most."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals: dict = {}
    for event in prof.key_averages(group_by_input_shape=True):
        name = event.key
        if any(op in name for op in CONV_OPS):
            category = _conv_category(name, event.input_shapes or [])
        else:
            category = next((c for c, ops in OP_CATEGORIES if any(op in name for op in ops)), "other")
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def measure_train_step(net, cm, n_in: int, n_out: int, batch: int, timer: Timer, warmup: int, repeats: int,
                       channels_last: bool, baseline_rss: float, profile: bool = False) -> dict:
    """One step as ``nnUNetTrainer.train_step`` (``memory.step``): deep supervision on, nnU-Net's Dice+CE loss
    with its deep-supervision weights, backward, clipping at 12, SGD (Nesterov 0.99); then its peak memory."""
    from ..memory.step import make_train_step

    net = set_layout(net.to(timer.device).train(), channels_last)
    step = make_train_step(net, n_in, n_out, list(cm.patch_size), batch, batch_dice=bool(cm.batch_dice),
                           device=timer.device, cuda_amp=timer.cuda, autocast=timer.autocast)
    timer.reset_memory()
    times = [timer.time(step.run) for _ in range(warmup + repeats)][warmup:]
    result = {"train_memory_mib": timer.memory_mib(baseline_rss)}
    if not warmup + repeats:
        step.run()  # the optimiser's state exists before the measured step, as in training and the estimate
    if times:
        result["train_step_ms"] = timing_stats(times)
        result["train_step_ms_median"] = result["train_step_ms"]["median"]
    result["train_peak_mib"] = peak_of(step.run, timer, net, step.optimizer, step.inputs)
    if profile and not timer.cuda:
        result["train_step_profile"] = profile_step(step.run)
    return result


def peak_of(run, timer: Timer, net, optimizer=None, inputs=()) -> float:
    """Peak tensor memory of ``run`` in MiB: on CUDA the allocator's maximum (everything allocated); on a CPU
    what stays allocated between steps (weights, optimiser state, inputs) plus the peak that torch's memory
    profiler records while it runs: the quantity ``memory.estimate`` estimates."""
    from ..memory.tracker import MiB, measured_peak
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if timer.cuda:
        import torch
        timer.sync()
        torch.cuda.reset_peak_memory_stats(timer.device)
        run()
        timer.sync()
        return round(torch.cuda.max_memory_allocated(timer.device) / MiB, 1)
    return round(measured_peak(run, net, optimizer, inputs) / MiB, 1)


def measure_network(job: dict) -> dict:
    """Every figure of one network. ``job``: trainer, plans, dataset_json, configuration, batch (None = the
    plans'), warmup, repeats, device, threads (0 = torch default), variant (``VARIANTS``; default shipped),
    profile (one more step under torch's profiler: the time share per op category, CPU only).
    The variant's environment must already be set (the parent sets it for the measuring process)."""
    import torch

    from ..nnunet_io import resolve_trainer
    from . import build_network
    from ..analysis import count_macs
    from ..blocks.reparam import ReparamDepthwise
    from ..networks.unet import NetworkConfigError, count_parameters

    baseline_rss = peak_rss_mib()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    trainer, variant = job["trainer"], job.get("variant", "shipped")
    channels_last = VARIANTS[variant][1]
    warmup, repeats = int(job.get("warmup", 2)), int(job.get("repeats", 5))
    timer = Timer(torch.device(job.get("device", "cpu")))
    torch.manual_seed(0)
    try:
        net, (pm, cm, n_in, n_out) = build_network(trainer, job["plans"], job["dataset_json"], job["configuration"],
                                                  deep_supervision=False)
    except (NetworkConfigError, NotImplementedError) as e:
        return {"trainer": trainer, "variant": variant, "status": "skipped", "reason": str(e)}
    patch = list(cm.patch_size)
    batch = int(job.get("batch") or cm.batch_size)
    result = {
        "trainer": trainer, "variant": variant, "status": "ok",
        "backbone": getattr(resolve_trainer(trainer), "backbone", None) or "stock nnU-Net",
        "network_class": type(net).__name__, "patch_size": patch, "input_channels": n_in, "output_channels": n_out,
        "train_batch": batch, "params": sum(p.numel() for p in net.parameters()),
        "params_without_ds_heads": count_parameters(net, deep_supervision_heads=False),
        "macs": count_macs(net, (1, n_in, *patch)),
        # resolution levels actually built (ours: min(paper depth, plan stages); stock: the plans' stages)
        "levels": len(getattr(net, "level_strides", None) or cm.network_arch_init_kwargs.get("strides", [])),
        "reparam_modules": sum(isinstance(m, ReparamDepthwise) for m in net.modules()),
        "depthwise_mode": settings.depthwise_mode(),
        "channels_last": getattr(net, "cpu_channels_last", False) if channels_last is None else channels_last,
        "shipped_channels_last": getattr(net, "cpu_channels_last", False),  # the layout targets are read in
    }
    result.update(measure_inference(net, n_in, patch, timer, warmup, repeats, channels_last, baseline_rss,
                                    profile=bool(job.get("profile"))))
    del net
    torch.manual_seed(0)
    train_net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, True)
    result.update(measure_train_step(train_net, cm, n_in, n_out, batch, timer, warmup, repeats, channels_last,
                                     baseline_rss, profile=bool(job.get("profile"))))
    result.update(estimate_figures(trainer, pm, cm, n_in, n_out, batch, result, amp=timer.cuda))
    if timer.cuda:
        result["memory_kind"] = "torch.cuda.max_memory_allocated (AMP)"
    else:
        result.update(peak_rss_mib=round(peak_rss_mib(), 1), baseline_rss_mib=round(baseline_rss, 1),
                      memory_kind="peak RSS above the process's RSS before the network was built")
    return result


def estimate_figures(trainer: str, pm, cm, n_in: int, n_out: int, batch: int, measured: dict, amp: bool) -> dict:
    """The shape-only estimates (``memory.estimate``) beside the measured peaks, and their relative error."""
    from ..nnunet_io import resolve_trainer
    from ..memory.estimate import estimate_inference, estimate_training, trainer_builder
    build = trainer_builder(resolve_trainer(trainer), pm, cm, n_in, n_out)
    patch = list(cm.patch_size)
    train = estimate_training(build, n_in, n_out, patch, batch, batch_dice=bool(cm.batch_dice), amp=amp,
                              runs_on="cuda" if amp else "cpu")
    infer = estimate_inference(build, n_in, patch, amp=amp)
    figures = {"train_estimate_mib": round(train.total_mib, 1), "inference_estimate_mib": round(infer.total_mib, 1)}
    for kind in ("train", "inference"):
        if measured.get(f"{kind}_peak_mib"):
            figures[f"{kind}_estimate_error"] = round(figures[f"{kind}_estimate_mib"] / measured[f"{kind}_peak_mib"] - 1, 4)
    return figures


def _worker() -> int:
    job = json.loads(sys.stdin.read())
    try:
        result = measure_network(job)
    except Exception as e:  # reported as this network's error; the run goes on with the next network
        import traceback
        traceback.print_exc()
        result = {"trainer": job.get("trainer"), "variant": job.get("variant", "shipped"), "status": "error",
                  "reason": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
