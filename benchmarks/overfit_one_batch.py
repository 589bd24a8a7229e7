"""How fast each backbone can fit one fixed batch of real patches: a learning-speed diagnostic, not a test.

Two preprocessed cases of a dataset (nnU-Net's own preprocessed files), one patch each centred on the
foreground, the same batch every step, nnU-Net's optimiser (SGD 0.01, momentum 0.99, Nesterov, clipping 12)
and loss (Dice + CE, batch Dice, no background), deep supervision off. Prints and records the foreground
Dice of each class on that batch every few steps and the spread of the initial logits.

    python benchmarks/overfit_one_batch.py \\
        --preprocessed $nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans_3d_fullres \\
        --patch 24 32 24 --strides 1,1,1 2,2,2 2,2,2 --classes 3 \\
        --backbone lgmsnet --backbone dlkunet_m width=32 norm=instance

Writes ``benchmarks/results/overfit_one_batch.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "overfit_one_batch.json"


def foreground_patches(folder: str, patch, n_cases: int = 2):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(folder)(folder)
    images, labels = [], []
    for identifier in dataset.identifiers[:n_cases]:
        data, seg = (np.asarray(a) for a in dataset.load_case(identifier)[:2])
        centre = np.argwhere(seg[0] > 0).mean(0).astype(int)
        box = tuple(slice(s0, s0 + p) for s0, p in
                    ((max(0, min(c - p // 2, s - p)), p) for c, p, s in zip(centre, patch, seg.shape[1:])))
        images.append(data[(slice(None),) + box])
        labels.append(seg[(slice(None),) + box])
    return torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(labels)).float()


def fit(name: str, options: dict, x, y, classes: int, strides, steps: int, every: int) -> dict:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunet_lk.networks import build_backbone
    torch.manual_seed(0)
    net = build_backbone(name, dim=x.dim() - 2, input_channels=x.shape[1], num_classes=classes, strides=strides,
                         patch_size=list(x.shape[2:]), **options)
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    record = {"backbone": name, "options": options, "steps": []}
    for step in range(1, steps + 1):
        out = net(x)
        if step == 1:
            record["initial_logit_std"] = round(float(out.detach().std()), 4)
        loss = loss_fn(out, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
        if step % every == 0:
            pred, truth = out.argmax(1), y[:, 0]
            dice = [float(2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum()).clamp(min=1))
                    for c in range(1, classes)]
            record["steps"].append({"step": step, "loss": round(float(loss), 4), "dice": [round(d, 3) for d in dice]})
            print(f"{name} {options}: step {step}, loss {float(loss):.3f}, Dice {[round(d, 3) for d in dice]}",
                  flush=True)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preprocessed", required=True, help="nnU-Net preprocessed configuration folder")
    p.add_argument("--patch", type=int, nargs="+", required=True)
    p.add_argument("--strides", nargs="+", required=True, help="plans strides, e.g. 1,1,1 2,2,2 2,2,2")
    p.add_argument("--classes", type=int, required=True, help="output channels (background included)")
    p.add_argument("--backbone", nargs="+", action="append", required=True, metavar="NAME [key=value ...]")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    strides = [[int(v) for v in s.split(",")] for s in args.strides]
    x, y = foreground_patches(args.preprocessed, args.patch)
    print(f"batch {list(x.shape)}, foreground fraction {float((y > 0).float().mean()):.3f}")
    runs = []
    for name, *pairs in args.backbone:
        options = {k: (ast.literal_eval(v) if v[:1].isdigit() or v[:1] in "[-" else v)
                   for k, v in (pair.split("=", 1) for pair in pairs)}
        runs.append(fit(name, options, x, y, args.classes, strides, args.steps, args.every))
    result = {"what": "foreground Dice per class on the one batch being fitted (nnU-Net's SGD and Dice+CE)",
              "preprocessed": args.preprocessed, "patch": args.patch, "strides": strides,
              "batch": list(x.shape), "runs": runs, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
