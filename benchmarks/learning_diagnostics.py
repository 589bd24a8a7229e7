"""Why DLKUNet-M and MS-LKSeg learn slowly on Hippocampus 2d (issue 15): a diagnostic, not a test.

Every network is built 2D from the real plans exactly as its trainer builds it (``nnunet_lk.bench.
build_network``); norm variants go through ``build_backbone`` with the plans' strides, kernel sizes and patch
and only ``norm`` changed. Batches are real: nnU-Net's own 2D data loader on the preprocessed cases of fold 0
(nnU-Net's split), its foreground oversampling (33 %), no augmentation; deep-supervision targets made by
nnU-Net's ``DownsampleSegForDSTransform``; padding label -1 set to 0 as nnU-Net's pipeline does. Loss:
nnU-Net's ``DC_and_CE_loss`` (batch Dice, no background, 1:1) in its ``DeepSupervisionWrapper`` with
nnU-Net's weights (the shipped trainers start their sigmoid schedule at Dice 1, CE 0.7). Seeds fixed; every
network and run sees the same batches.

Measured (one section each in the outputs):
1. ``init``: at initialisation, train mode, on the first batches: logit std, spread between classes (std over
   the class axis, mean over pixels), mean softmax probability and argmax fraction per class, initial loss.
2. the gradient norm of each stage (encoder levels, the deepest level = bottleneck, skip blocks, decoder
   stages, seg heads) after one backward of that loss, with the weight norm and the ratio grad / weight;
   the total norm before nnU-Net's clipping at 12.
3. the gated blocks (DLKUNet's large-kernel attention ``x * a``; MS-LKSeg's MIE and MIDM sigmoid gates):
   output std / input std at init, and the attention map ``a`` (mean, std); the std of each stage's output.
4. 1-3 with the backbone's shipped norm and with ``norm=instance``; DLKUNet is built with the official code's
   initialisation (``gate_init=official``, what was shipped when these were measured) and measured with
   ``gate-bias-1`` on top (the gate's pointwise bias + 1, so that ``x * a`` starts near the identity: the
   package's default ``gate_init=identity`` since issue 15's comparison); the class preference over 5 seeds.
5. ``runs``: a short training per configuration (nnU-Net's SGD recipe, or the backbone's paper recipe from
   ``PAPER_RECIPES``, lr held at its initial value, clipping at 12), loss and per-class mean softmax on the
   training batch every few steps, and on held-out patches of fold 0's validation cases (eval mode, as
   nnU-Net validates) per-class Dice, mean softmax and mean probability of the true class at checkpoints.

    P=$nnUNet_preprocessed/Dataset004_Hippocampus
    python benchmarks/learning_diagnostics.py --preprocessed $P --steps 60 --threads 1

``--runs LABEL ...`` trains only some configurations, ``--run-steps LABEL=N`` gives some a longer budget,
``--sections`` chooses init and/or train, ``--merge`` keeps what an earlier invocation wrote (so a long run
can be split), ``--quick`` is a smoke run (3-step trainings). Every run sees the same batch sequence, so runs
of different lengths share their first steps. The committed results (1 thread on 2 CPU cores busy with two
trainings, so each invocation was kept under 4 minutes):

    python benchmarks/learning_diagnostics.py --preprocessed $P --steps 45 --every 5 --eval-every 15 \\
        --runs lgmsnet mslkseg dlkunet_m/batch/nnunet
    python benchmarks/learning_diagnostics.py --preprocessed $P --steps 45 --every 5 --eval-every 15 \\
        --sections train --merge --runs dlkunet_m/instance/nnunet dlkunet_m/batch/paper \\
        dlkunet_m/batch/nnunet+gate-bias-1 mslkseg/batch/nnunet --run-steps mslkseg/batch/nnunet=120

Writes ``benchmarks/results/learning_diagnostics.{json,md}`` (``--out`` to change the stem).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "learning_diagnostics"
TRAINERS = {"lgmsnet": "nnUNetTrainerLGMSNet", "dlkunet_m": "nnUNetTrainerDLKUNetM", "mslkseg": "nnUNetTrainerMSLKSeg"}
# (backbone, norm (None: shipped), recipe, init variant): the training configurations, in report order
RUNS = [("lgmsnet", None, "nnunet", None), ("mslkseg", None, "nnunet", None), ("mslkseg", "instance", "nnunet", None),
        ("dlkunet_m", None, "nnunet", None), ("dlkunet_m", "instance", "nnunet", None),
        ("dlkunet_m", None, "paper", None), ("dlkunet_m", None, "nnunet", "gate-bias-1")]
# (backbone, norm, init variant) measured at initialisation
INITS = [("lgmsnet", None, None), ("lgmsnet", "instance", None), ("dlkunet_m", None, None),
         ("dlkunet_m", "instance", None), ("dlkunet_m", None, "gate-bias-1"), ("mslkseg", None, None),
         ("mslkseg", "instance", None)]
SEEDS = range(5)  # initial class preference of each shipped network over seeds


def gate_bias_one(net):
    """DLKUNet's gate map a = PW(...) starts at 1 + PW(...) (the pointwise conv's bias + 1), so ``x * a``
    starts near the identity: what the package's option ``gate_init="identity"`` builds
    (docs/architectures.md §1.10; it was measured here first, on the official initialisation)."""
    from nnunet_lk.blocks.dlkunet import LargeKernelAttention
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LargeKernelAttention):
                m.pointwise.bias.add_(1.0)
    return net


VARIANTS = {"gate-bias-1": gate_bias_one}
SHIPPED_VARIANT = {"dlkunet_m": "gate-bias-1"}  # the package builds DLKUNet with gate_init=identity


def r(v, n=4):
    return None if v is None or not np.isfinite(v) else round(float(v), n)


# ---- data and networks -----------------------------------------------------------------------------------
class Context:
    """Plans, nnU-Net's fold-0 datasets, its loss and the networks' builder."""

    def __init__(self, folder: str, plans_name: str, configuration: str):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        from nnunet_lk.plans import plans_context
        self.folder = Path(folder)
        self.plans = json.loads((self.folder / f"{plans_name}.json").read_text())
        self.dataset_json = json.loads((self.folder / "dataset.json").read_text())
        self.configuration = configuration
        # DLKUNet at the official initialisation; "gate-bias-1" measures the package's default on top of it
        options = self.plans["configurations"][configuration].setdefault("nnunet_lk", {})
        options.setdefault("dlkunet_m", {})["gate_init"] = "official"
        self.pm, self.cm, self.n_in, self.n_out = plans_context(self.plans, self.dataset_json, configuration)
        data = str(self.folder / self.cm.data_identifier)
        cls = infer_dataset_class(data)
        split = generate_crossval_split(sorted(cls.get_identifiers(data)), seed=12345, n_splits=5)[0]
        self.train = cls(data, split["train"])
        self.val = cls(data, split["val"])
        self.labels = self.pm.get_label_manager(self.dataset_json)

    def batches(self, dataset, n: int, batch: int, foreground: float, seed: int, scales):
        """``n`` batches from nnU-Net's data loader: (image, [target per deep-supervision scale])."""
        from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        np.random.seed(seed)
        patch = list(self.cm.patch_size)
        loader = nnUNetDataLoader(dataset, batch, patch, patch, self.labels, oversample_foreground_percent=foreground)
        downsample = DownsampleSegForDSTransform(scales)
        out = []
        for _ in range(n):
            b = next(loader)
            seg = b["target"].clone()
            seg[seg < 0] = 0  # nnU-Net's RemoveLabelTansform(-1, 0)
            per_sample = [downsample(segmentation=s)["segmentation"] for s in seg]
            targets = [torch.stack([t[k] for t in per_sample]).float() for k in range(len(scales))]
            out.append((b["data"].float(), targets))
        return out

    def build(self, backbone: str, norm, seed: int, variant=None):
        net = self._build(backbone, norm, seed)
        return VARIANTS[variant](net) if variant else net

    def _build(self, backbone: str, norm, seed: int):
        from nnunet_lk.bench import build_network
        from nnunet_lk.networks import build_backbone
        from nnunet_lk.plans import backbone_options, configuration_strides
        torch.manual_seed(seed)
        if norm is None:
            net, _ = build_network(TRAINERS[backbone], self.plans, self.dataset_json, self.configuration, True)
            return net
        strides, kernels = configuration_strides(self.cm)
        options = {**backbone_options(self.cm, backbone), "norm": norm}
        return build_backbone(backbone, dim=len(self.cm.patch_size), input_channels=self.n_in,
                              num_classes=self.n_out, strides=strides, kernel_sizes=kernels,
                              patch_size=self.cm.patch_size, deep_supervision=True, **options)

    def loss(self, n_outputs: int):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        loss = DC_and_CE_loss({"batch_dice": self.cm.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
        weights = np.array([1 / 2 ** i for i in range(n_outputs)])
        weights[-1] = 0  # nnUNetTrainer._build_loss: the lowest resolution gets no weight
        return DeepSupervisionWrapper(loss, weights / weights.sum())


def shipped_norm(backbone: str) -> str:
    from nnunet_lk.networks import get_backbone
    return get_backbone(backbone).config["norm"]


def class_figures(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-class figures of full-resolution logits against the label map (B×1×...)."""
    k = logits.shape[1]
    prob = logits.softmax(1)
    pred, truth = logits.argmax(1), target[:, 0].long()
    true_prob = [float(prob[:, c][truth == c].mean()) if (truth == c).any() else None for c in range(k)]
    return {"mean_softmax": [r(float(p)) for p in prob.mean((0, *range(2, prob.dim())))],
            "true_class_prob": [r(p) for p in true_prob],
            "pred_fraction": [r(float((pred == c).float().mean())) for c in range(k)],
            "true_fraction": [r(float((truth == c).float().mean())) for c in range(k)]}


def dice(logits: torch.Tensor, target: torch.Tensor) -> list:
    pred, truth = logits.argmax(1), target[:, 0].long()
    out = []
    for c in range(1, logits.shape[1]):
        p, t = pred == c, truth == c
        denominator = int(p.sum() + t.sum())
        out.append(r(2 * float((p & t).sum()) / denominator, 3) if denominator else None)
    return out


# ---- 1-4: the network at initialisation ------------------------------------------------------------------
def stage_of(name: str, n_levels: int) -> str:
    parts = name.split(".")
    if parts[0] == "encoder":
        return f"encoder.{parts[1]}" + (" (bottleneck)" if int(parts[1]) == n_levels - 1 else "")
    if parts[0] == "skip_fusion" and parts[1] == "blocks":
        return f"skip_fusion.blocks.{parts[2]}"
    if parts[0] == "decoder" and parts[1] == "seg_layers":
        return f"decoder.seg_layers.{parts[2]} (head)"
    if parts[0] == "decoder":
        return ".".join(parts[:3])
    return parts[0]


def gated_modules(net):
    from nnunet_lk.blocks.dlkunet import LargeKernelAttention
    from nnunet_lk.blocks.mslkseg import MultiSemanticSpatialAttention, ProgressiveChannelSelfAttention
    kinds = (LargeKernelAttention, MultiSemanticSpatialAttention, ProgressiveChannelSelfAttention)
    return [(name, m) for name, m in net.named_modules() if isinstance(m, kinds)]


def attach_probes(net, store: dict):
    """Forward hooks: input/output std of every gate, the attention map ``a`` of DLKUNet's gate, the output
    std of every encoder and decoder stage."""
    handles = []

    def gate_hook(name):
        def hook(module, args, out):
            x, y = args[0].detach(), out.detach()
            store.setdefault("gates", {})[name] = {"type": type(module).__name__, "in_std": r(float(x.std())),
                                                  "out_std": r(float(y.std())), "ratio": r(float(y.std() / x.std()))}
        return hook

    def map_hook(name):
        def hook(module, args, out):
            a = out.detach()
            store.setdefault("maps", {})[name] = {"a_mean": r(float(a.mean())), "a_std": r(float(a.std())),
                                                 "a_abs_mean": r(float(a.abs().mean()))}
        return hook

    def stage_hook(name):
        def hook(module, args, out):
            store.setdefault("stage_out_std", {})[name] = r(float(out.detach().std()))
        return hook

    for name, m in gated_modules(net):
        handles.append(m.register_forward_hook(gate_hook(name)))
        if hasattr(m, "pointwise"):  # DLKUNet's LKA: a = PW(DW(DW(x))), the map multiplied onto x
            handles.append(m.pointwise.register_forward_hook(map_hook(name)))
    for i, m in enumerate(net.encoder):
        handles.append(m.register_forward_hook(stage_hook(f"encoder.{i}")))
    for i, m in enumerate(net.decoder.stages):
        handles.append(m.register_forward_hook(stage_hook(f"decoder.stages.{i}")))
    return handles


def label_of(backbone: str, norm, variant=None) -> str:
    return f"{backbone}/{norm or shipped_norm(backbone)}" + (f"+{variant}" if variant else "")


def init_figures(ctx: Context, backbone: str, norm, variant, batches, seed: int) -> dict:
    start = time.perf_counter()
    net = ctx.build(backbone, norm, seed, variant).train()
    loss_fn = ctx.loss(len(net.deep_supervision_scales))
    probes: dict = {}
    handles = attach_probes(net, probes)
    x, targets = batches[0]
    out = net(x)
    for h in handles:
        h.remove()
    loss = loss_fn(out, targets)
    loss.backward()
    levels = len(net.level_strides)
    grads, weights = {}, {}
    for name, p in net.named_parameters():
        stage = stage_of(name, levels)
        weights[stage] = weights.get(stage, 0.0) + float(p.detach().pow(2).sum())
        grads[stage] = grads.get(stage, 0.0) + (float(p.grad.pow(2).sum()) if p.grad is not None else 0.0)
    with torch.no_grad():
        full = torch.cat([out[0].detach()] + [net(b[0])[0] for b in batches[1:]])
    labels = torch.cat([b[1][0] for b in batches])
    for name, g in probes.get("maps", {}).items():
        probes["gates"][name].update(g)
    return {"backbone": backbone, "norm": norm or shipped_norm(backbone),
            "shipped": norm is None and variant == SHIPPED_VARIANT.get(backbone),
            "variant": variant, "label": label_of(backbone, norm, variant),
            "batches": len(batches), "seconds": r(time.perf_counter() - start, 2),
            "params": sum(p.numel() for p in net.parameters()), "initial_loss": r(float(loss.detach())),
            "logit_std": r(float(full.std())), "class_spread": r(float(full.std(1, unbiased=False).mean())),
            "logit_std_per_output": [r(float(o.detach().std())) for o in out],
            **class_figures(full, labels),
            "grad_norm_total": r(sum(grads.values()) ** 0.5),
            "stages": {s: {"grad_norm": r(grads[s] ** 0.5, 5), "weight_norm": r(weights[s] ** 0.5),
                           "ratio": r((grads[s] / weights[s]) ** 0.5, 6) if weights[s] else None}
                       for s in grads},
            "gates": probes.get("gates", {}), "stage_out_std": probes.get("stage_out_std", {})}


# ---- 5: short trainings ----------------------------------------------------------------------------------
def seed_sweep(ctx: Context, backbone: str, batch, seeds) -> dict:
    """Mean softmax and argmax fraction per class at initialisation (train mode, one batch) for each seed."""
    out = {}
    for seed in seeds:
        net = ctx.build(backbone, None, seed).train()
        with torch.no_grad():
            figures = class_figures(net(batch[0])[0], batch[1][0])
        out[seed] = {k: figures[k] for k in ("mean_softmax", "pred_fraction")}
    return out


def run_label(backbone: str, norm, recipe: str, variant=None) -> str:
    return f"{backbone}/{norm or shipped_norm(backbone)}/{recipe}" + (f"+{variant}" if variant else "")


def evaluate(net, held_out) -> dict:
    x, target = held_out
    net.eval()
    with torch.no_grad():
        logits = net(x)[0]
    net.train()
    return {"dice": dice(logits, target), **class_figures(logits, target)}


def train(ctx: Context, backbone: str, norm, recipe_name: str, variant, batches, held_out, seed: int, every: int,
          checkpoints) -> dict:
    from nnunet_lk.training.recipes import NNUNET, make_optimizer, paper_recipe
    recipe = NNUNET if recipe_name == "nnunet" else paper_recipe(backbone, len(ctx.cm.patch_size))
    net = ctx.build(backbone, norm, seed, variant).train()
    loss_fn = ctx.loss(len(net.deep_supervision_scales))
    torch.manual_seed(seed)
    optimizer = make_optimizer(recipe, net.parameters())
    record = {"label": run_label(backbone, norm, recipe_name, variant), "backbone": backbone, "variant": variant,
              "norm": norm or shipped_norm(backbone), "recipe": recipe_name,
              "optimizer": {"name": recipe.optimizer, "lr": recipe.lr, "weight_decay": recipe.weight_decay,
                            "momentum": recipe.momentum, "nesterov": recipe.nesterov, "source": recipe.source},
              "steps": len(batches), "held_out_patches": int(held_out[0].shape[0]), "log": [], "held_out": []}
    start = time.perf_counter()
    for step, (x, targets) in enumerate(batches, 1):
        out = net(x)
        loss = loss_fn(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
        if step == 1 or step % every == 0 or step == len(batches):
            logits = out[0].detach()
            figures = class_figures(logits, targets[0])
            record["log"].append({"step": step, "loss": r(float(loss.detach())), "grad_norm": r(float(grad_norm)),
                                  "mean_softmax": figures["mean_softmax"],
                                  "true_class_prob": figures["true_class_prob"], "dice": dice(logits, targets[0])})
        if step in checkpoints:
            record["held_out"].append({"step": step, **evaluate(net, held_out)})
            h = record["held_out"][-1]
            print(f"  {record['label']} step {step}: loss {float(loss):.3f}, held-out Dice {h['dice']}, "
                  f"mean softmax {h['mean_softmax']}, p(true) {h['true_class_prob']}", flush=True)
    record["seconds_per_step"] = r((time.perf_counter() - start) / len(batches), 3)
    return record


# ---- report ----------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return " / ".join(fmt(x) for x in v)
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def markdown(result: dict) -> str:
    meta, init, runs = result["meta"], result.get("init", {}), result.get("runs", {})
    lines = [f"# Learning diagnostics (issue 15): {meta['dataset']} {meta['configuration']} ({meta['plans']})", "",
             f"Batch {meta['batch']} of {meta['patch']} patches from nnU-Net's 2D loader (fold 0, 33 % foreground "
             f"oversampling, no augmentation), nnU-Net's Dice+CE with deep supervision, torch {meta['torch']}, "
             f"{meta['threads']} thread(s). Class order: background / anterior / posterior.", ""]
    if init:
        lines += ["## 1. Logits at initialisation (train mode)", ""]
        lines += table(["network/norm", "logit std", "class spread", "std per DS output", "mean softmax",
                        "argmax fraction", "true fraction", "initial loss"],
                       [[v["label"] + (" (shipped)" if v["shipped"] else ""), v["logit_std"],
                         v["class_spread"], v["logit_std_per_output"], v["mean_softmax"], v["pred_fraction"],
                         v["true_fraction"], v["initial_loss"]] for v in init.values()])
        lines += ["", "## 2. Gradient norm per stage after one backward (before clipping at 12)", ""]
        for backbone in dict.fromkeys(v["backbone"] for v in init.values()):
            variants = [v for v in init.values() if v["backbone"] == backbone]
            header = ["stage"] + [f"{k} ({v['label'].split('/', 1)[1]})" for v in variants
                                  for k in ("grad", "weight", "grad/weight")]
            stages = list(variants[0]["stages"])
            keys = ("grad_norm", "weight_norm", "ratio")
            rows = [[s] + [v["stages"].get(s, {}).get(k) for v in variants for k in keys] for s in stages]
            rows.append(["total"] + [x for v in variants for x in (v["grad_norm_total"], None, None)])
            lines += [f"### {backbone}", ""] + table(header, rows) + [""]
        lines += ["## 3. Gates at initialisation: output std / input std, DLKUNet's attention map a", ""]
        for key, v in init.items():
            if not v["gates"]:
                continue
            lines += [f"### {v['label']}", ""]
            lines += table(["module", "type", "in std", "out std", "out/in", "a mean", "a std"],
                           [[n, g["type"], g["in_std"], g["out_std"], g["ratio"], g.get("a_mean"), g.get("a_std")]
                            for n, g in v["gates"].items()]) + [""]
        lines += ["Output std of each stage at initialisation:", ""]
        stages = list(dict.fromkeys(s for v in init.values() for s in v["stage_out_std"]))
        lines += table(["network/norm"] + stages, [[v["label"]] + [v["stage_out_std"].get(s) for s in stages]
                                                   for v in init.values()])
        lines += ["", "Class preference at initialisation over seeds (shipped networks, first batch): mean softmax; "
                  "argmax fraction", ""]
        seeds = result.get("init_seeds", {})
        lines += table(["network"] + [f"seed {k}" for k in next(iter(seeds.values()), {})],
                       [[b] + [f"{fmt(f['mean_softmax'])}; {fmt(f['pred_fraction'])}" for f in v.values()]
                        for b, v in seeds.items()]) + [""]
    if runs:
        lines += ["## 5. Short trainings", "",
                  "Training batch: loss, pre-clipping gradient norm, per-class mean softmax and mean probability of "
                  "the true class. Held-out (eval mode): foreground Dice anterior / posterior.", ""]
        for v in runs.values():
            o = v["optimizer"]
            lines += [f"### {v['label']}: {o['name']} lr {o['lr']}, wd {o['weight_decay']}, momentum {o['momentum']}"
                      f"{' Nesterov' if o['nesterov'] else ''}; {v['steps']} steps, {v['seconds_per_step']} s/step, "
                      f"{v['held_out_patches']} held-out patches", ""]
            lines += table(["step", "loss", "grad norm", "mean softmax", "p(true class)", "batch Dice"],
                           [[e["step"], e["loss"], e["grad_norm"], e["mean_softmax"], e["true_class_prob"], e["dice"]]
                            for e in v["log"]])
            lines += [""] + table(["held-out step", "Dice", "mean softmax", "p(true class)", "argmax fraction",
                                   "true fraction"],
                                  [[h["step"], h["dice"], h["mean_softmax"], h["true_class_prob"], h["pred_fraction"],
                                    h["true_fraction"]] for h in v["held_out"]]) + [""]
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------------
def parse(argv):
    default_folder = os.path.join(os.environ.get("nnUNet_preprocessed", ""), "Dataset004_Hippocampus")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preprocessed", default=default_folder, help="nnU-Net preprocessed dataset folder (with plans)")
    p.add_argument("--plans", default="nnUNetPlans_cpu", help="plans name (nnUNetPlans_cpu: 2d batch 8)")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--every", type=int, default=10, help="log the training batch every N steps")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate on the held-out patches every N steps "
                                                               "(and at the last step)")
    p.add_argument("--run-steps", nargs="+", default=[], metavar="LABEL=N", help="other step counts for some runs")
    p.add_argument("--eval-patches", type=int, default=16)
    p.add_argument("--init-batches", type=int, default=2, help="batches for the initial logit figures")
    p.add_argument("--sections", nargs="+", default=["init", "train"], choices=["init", "train"])
    p.add_argument("--runs", nargs="+", help="train only these (labels such as dlkunet_m/batch/paper, or a prefix "
                                                     "ending at a slash: dlkunet_m, mslkseg/instance)")
    p.add_argument("--merge", action="store_true", help="keep the sections/runs an earlier invocation wrote")
    p.add_argument("--quick", action="store_true", help="smoke run: 3-step trainings on 8 held-out patches "
                                                        "(the init section is the full one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="output stem (.json and .md are added)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.eval_every, args.eval_patches = 3, 1, 3, 8
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    ctx = Context(args.preprocessed, args.plans, args.configuration)
    strides = np.array(ctx.cm.network_arch_init_kwargs["strides"])
    scales = [list(s) for s in 1 / np.cumprod(strides, axis=0)][:-1]  # nnUNetTrainer's deep-supervision scales
    batch, patch = ctx.cm.batch_size, list(ctx.cm.patch_size)
    run_steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.run_steps)}
    n_batches = max([args.steps, args.init_batches, *run_steps.values()])
    batches = ctx.batches(ctx.train, n_batches, batch, 0.33, args.seed, scales)
    x_val, y_val = ctx.batches(ctx.val, 1, args.eval_patches, 1.0, args.seed + 1, scales)[0]
    print(f"batch {list(batches[0][0].shape)}, foreground {float((batches[0][1][0] > 0).float().mean()):.3f}; "
          f"held-out {list(x_val.shape)}", flush=True)
    out = Path(args.out)
    result = json.loads(out.with_suffix(".json").read_text()) if args.merge and out.with_suffix(".json").is_file() \
        else {}
    result["meta"] = {"dataset": ctx.folder.name, "preprocessed": str(ctx.folder), "plans": args.plans,
                      "configuration": args.configuration, "batch": batch, "patch": patch, "threads": args.threads,
                      "seed": args.seed, "deep_supervision_scales": scales, "torch": torch.__version__}
    if "init" in args.sections:
        result["init"], result["init_seeds"] = {}, {}
        for backbone, norm, variant in INITS:
            v = init_figures(ctx, backbone, norm, variant, batches[:args.init_batches], args.seed)
            result["init"][v["label"]] = v
            print(f"init {v['label']}: logit std {v['logit_std']}, spread {v['class_spread']}, "
                  f"mean softmax {v['mean_softmax']}, argmax {v['pred_fraction']}, "
                  f"grad total {v['grad_norm_total']}", flush=True)
        for backbone in TRAINERS:
            result["init_seeds"][backbone] = seed_sweep(ctx, backbone, batches[0], SEEDS)
            print(f"seeds {backbone}: {result['init_seeds'][backbone]}", flush=True)
    if "train" in args.sections:
        result.setdefault("runs", {})
        for backbone, norm, recipe, variant in RUNS:
            label = run_label(backbone, norm, recipe, variant)
            if args.runs and not any(label == w or label.startswith(w.rstrip("/") + "/") for w in args.runs):
                continue
            steps = run_steps.get(label, args.steps)
            checkpoints = set(range(args.eval_every, steps + 1, args.eval_every)) | {steps}
            result["runs"][label] = train(ctx, backbone, norm, recipe, variant, batches[:steps], (x_val, y_val[0]),
                                          args.seed, args.every, checkpoints)
        order = [run_label(*c) for c in RUNS]
        result["runs"] = {k: result["runs"][k] for k in sorted(result["runs"], key=lambda k: order.index(k)
                                                                 if k in order else len(order))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
