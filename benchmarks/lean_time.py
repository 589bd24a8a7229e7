"""What the lean block forms cost in time on a CPU: one training step (forward with deep supervision, nnU-Net's loss,
backward, clipping, SGD step) of each backbone with ``memory_lean=false`` (plain) and ``memory_lean=true`` (lean),
the two interleaved step by step in one run, median over repeats. On a CPU the default ``auto`` runs the plain
forms; this is the price of turning them on here. Writes benchmarks/results/lean_time.{json,md}.

    .venv/bin/python benchmarks/lean_time.py [--configuration 2d] [--batch 8] [--threads 1] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from nnunet_lk.nnunet_io import resolve_trainer  # noqa: E402
from nnunet_lk.plans import plans_context  # noqa: E402
from nnunet_lk.memory.step import make_train_step  # noqa: E402
from nnunet_lk.plans import derive_plans  # noqa: E402
from depthwise_ops import sgemm_peak  # noqa: E402

TRAINERS = ["nnUNetTrainerDLKUNetS", "nnUNetTrainerDLKUNetM", "nnUNetTrainerLGMSNet", "nnUNetTrainerLMNet",
            "nnUNetTrainerMSLKSeg"]
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                "numTraining": 208, "file_ending": ".nii.gz"}


def build_steps(configuration: str, batch: int) -> dict:
    plans = json.loads((REPO / "tests/fixtures/hippocampus_plans.json").read_text())
    steps = {}
    for trainer in TRAINERS:
        cls = resolve_trainer(trainer)
        for lean in (False, True):
            derived = derive_plans(plans, configuration, plans["plans_name"],
                                   backbone_opts={cls.backbone: {"memory_lean": lean}})
            pm, cm, n_in, n_out = plans_context(derived, DATASET_JSON, configuration)
            torch.manual_seed(0)
            net = cls.build_network_architecture(pm, cm, n_in, n_out, True)
            step = make_train_step(net, n_in, n_out, list(cm.patch_size), batch, batch_dice=bool(cm.batch_dice),
                                   device="cpu")
            step.run()  # warm-up: oneDNN primitives, optimiser state
            steps[(trainer, lean)] = step
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-o", "--output", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = build_steps(args.configuration, args.batch)
    times = {key: [] for key in steps}
    peaks = []
    for _ in range(args.repeats):  # interleaved: both forms of every backbone in each round
        peaks.append(sgemm_peak("cpu"))
        for key, step in steps.items():
            start = time.perf_counter()
            step.run()
            times[key].append(time.perf_counter() - start)
    rows = []
    for trainer in TRAINERS:
        plain, lean = (statistics.median(times[(trainer, v)]) for v in (False, True))
        rows.append({"trainer": trainer, "plain_ms": round(1000 * plain, 1), "lean_ms": round(1000 * lean, 1),
                     "lean_to_plain": round(lean / plain, 3)})
    record = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads,
              "configuration": args.configuration, "batch": args.batch, "repeats": args.repeats,
              "sgemm_gflops_median": round(statistics.median(peaks), 1), "rows": rows}
    lines = [f"# Lean block forms: training-step time on a CPU ({args.configuration}, batch {args.batch}, "
             f"{args.threads} thread(s))", "",
             f"{record['cpu']}, torch {record['torch']}; Hippocampus plans; median of {args.repeats} interleaved steps; "
             f"sgemm peak in the same run: {record['sgemm_gflops_median']} GFLOP/s.", "",
             "| network | plain ms | lean ms | lean / plain |", "|---|---:|---:|---:|"]
    lines += [f"| {r['trainer']} | {r['plain_ms']:.0f} | {r['lean_ms']:.0f} | {r['lean_to_plain']:.2f}× |" for r in rows]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lean_time.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "lean_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
