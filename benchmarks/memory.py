"""Training and inference memory of every backbone and stock nnU-Net at nnU-Net's own plans, with each memory option
(plain blocks, lean block forms, activation checkpointing), with the shape-only estimate beside each measured peak (`nnunet_lk.memory`).

Plans measured: Hippocampus 2d and 3d_fullres (nnU-Net 2.8.1's plans, tests/fixtures), ACDC 3d_fullres
(anisotropic; `--acdc-plans`: nnUNetPlans.json written by nnUNetv2_plan_experiment -d 27), and the plans nnU-Net's
own ExperimentPlanner writes for a large synthetic CT-like dataset (fingerprint below, 8 GB target: 3d_fullres
128x128x128, batch 2).

For each network: the estimate in float32 and at CUDA's AMP dtypes, and (where the float32 estimate is under
--max-measure-gib, this CPU's memory) the measured CPU peak of one real step: weights, optimiser state and inputs
plus torch.profiler's memory-event peak, contiguous tensors with our CPU depthwise op (torch's own depthwise path,
which the estimate models, needs minutes per 3D step here; tests/test_memory.py checks the estimate against it).
Ratios are to stock nnU-Net's figure of the same kind. Writes benchmarks/results/memory.{json,md}.

    .venv/bin/python benchmarks/memory.py --acdc-plans /path/to/preprocessed/Dataset027_ACDC/nnUNetPlans.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_lk.nnunet_io import resolve_trainer  # noqa: E402
from nnunet_lk.plans import plans_context  # noqa: E402
from nnunet_lk.memory.estimate import block_profile, estimate_inference, estimate_training, trainer_builder  # noqa: E402
from nnunet_lk.memory.step import make_train_step  # noqa: E402
from nnunet_lk.memory import tracker  # noqa: E402
from nnunet_lk.memory.tracker import MiB  # noqa: E402
from nnunet_lk.plans import derive_plans  # noqa: E402

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerDLKUNetS", "nnUNetTrainerDLKUNetM", "nnUNetTrainerDLKUNetL",
            "nnUNetTrainerLGMSNet", "nnUNetTrainerLMNet", "nnUNetTrainerMSLKSeg"]
# the backbones' memory options (``networks.checkpointing``): plain blocks; the lean forms (what "auto", the default,
# runs on a GPU); lean forms and stage checkpointing; stage checkpointing alone
VARIANTS = {"plain": {"memory_lean": False}, "lean": {"memory_lean": True},
            "lean + stages": {"memory_lean": True, "checkpoint_style": "stages"},
            "stages": {"memory_lean": False, "checkpoint_style": "stages"}}
HIPPOCAMPUS_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                    "numTraining": 208, "file_ending": ".nii.gz"}


def large_dataset_plans(work: Path) -> tuple:
    """nnU-Net's ExperimentPlanner on a synthetic fingerprint: 300 CT volumes of 256x256x256 at 1 mm, 3 labels."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    name = "Dataset990_LargeSynthetic"
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                    "numTraining": 300, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
                    # cases named in the dataset.json: the planner lists no folder and opens no image
                    "dataset": {f"case_{i:03d}": {"images": [f"case_{i:03d}_0000.nii.gz"],
                                                  "label": f"case_{i:03d}.nii.gz"} for i in range(300)}}
    (work / "raw" / name).mkdir(parents=True, exist_ok=True)
    (work / "raw" / name / "dataset.json").write_text(json.dumps(dataset_json))
    (work / "pre" / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = [[int(s) for s in rng.integers(230, 282, 3)] for _ in range(300)]
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 300, "shapes_after_crop": shapes,
                   "foreground_intensity_properties_per_channel": {"0": {
                       "max": 3000.0, "mean": 100.0, "median": 90.0, "min": -1000.0, "percentile_00_5": -900.0,
                       "percentile_99_5": 1500.0, "std": 300.0}},
                   "median_relative_size_after_cropping": 1.0}
    (work / "pre" / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"))
    import nnunetv2.paths as paths
    paths.nnUNet_raw, paths.nnUNet_preprocessed = str(work / "raw"), str(work / "pre")
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as planner_module
    planner_module.nnUNet_raw, planner_module.nnUNet_preprocessed = str(work / "raw"), str(work / "pre")
    ExperimentPlanner(name, gpu_memory_target_in_gb=8).plan_experiment()
    return json.loads((work / "pre" / name / "nnUNetPlans.json").read_text()), dataset_json


def measured_peaks(trainer: str, plans: dict, dataset_json: dict, configuration: str) -> dict:
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    torch.manual_seed(0)
    net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, True)
    if hasattr(net, "cpu_channels_last"):
        net.cpu_channels_last = False
    step = make_train_step(net, n_in, n_out, list(cm.patch_size), cm.batch_size, batch_dice=bool(cm.batch_dice),
                           device="cpu")
    start = time.perf_counter()
    step.run()
    seconds = time.perf_counter() - start
    step.optimizer.zero_grad(set_to_none=True)
    train = tracker.measured_peak(step.run, net, step.optimizer, step.inputs)
    net.eval()
    x = torch.randn(1, n_in, *cm.patch_size)

    def forward():
        with torch.no_grad():
            net(x)
    infer = tracker.measured_peak(forward, net, inputs=[x])
    return {"train_measured_mib": round(train / MiB, 1), "inference_measured_mib": round(infer / MiB, 1),
            "step_seconds": round(seconds, 2)}


def with_variant(plans: dict, configuration: str, trainer: str, variant: str) -> dict:
    backbone = getattr(resolve_trainer(trainer), "backbone", None)
    if backbone is None:
        return plans
    return derive_plans(plans, configuration, plans["plans_name"], backbone_opts={backbone: VARIANTS[variant]})


def measure_configuration(label: str, plans: dict, dataset_json: dict, configuration: str, max_measure_gib: float,
                          log) -> dict:
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    rows = []
    for trainer in TRAINERS:
        cls = resolve_trainer(trainer)
        backbone = getattr(cls, "backbone", None)
        for style in VARIANTS if backbone else ("plain",):
            styled = with_variant(plans, configuration, trainer, style)
            spm, scm, _, _ = plans_context(styled, dataset_json, configuration)
            build = trainer_builder(cls, spm, scm, n_in, n_out)
            try:
                start = time.perf_counter()
                fp32 = estimate_training(build, n_in, n_out, list(cm.patch_size), cm.batch_size,
                                         batch_dice=bool(cm.batch_dice))
                seconds = time.perf_counter() - start
                amp = estimate_training(build, n_in, n_out, list(cm.patch_size), cm.batch_size,
                                        batch_dice=bool(cm.batch_dice), amp=True)
                infer = estimate_inference(build, n_in, list(cm.patch_size))
            except Exception as e:  # a backbone that cannot build these plans
                rows.append({"trainer": trainer, "style": style, "status": f"{type(e).__name__}: {e}"[:300]})
                log(f"{label} {trainer} [{style}]: {rows[-1]['status']}")
                continue
            row = {"trainer": trainer, "backbone": backbone or "stock nnU-Net", "style": style, "status": "ok",
                   "train_estimate_mib": round(fp32.total_mib, 1), "train_estimate_amp_mib": round(amp.total_mib, 1),
                   "inference_estimate_mib": round(infer.total_mib, 1), "estimate_seconds": round(seconds, 2)}
            if fp32.total_mib < max_measure_gib * 1024:
                row.update(measured_peaks(trainer, styled, dataset_json, configuration))
                for kind in ("train", "inference"):
                    row[f"{kind}_estimate_error"] = round(row[f"{kind}_estimate_mib"] / row[f"{kind}_measured_mib"] - 1, 4)
            if style in ("plain", "lean") and backbone:
                row["blocks"] = block_profile(build, n_in, list(cm.patch_size), cm.batch_size, depth=3)[:5]
            rows.append(row)
            log(f"{label} {trainer} [{style}]: estimate {row['train_estimate_mib']:.0f} MiB (AMP "
                f"{row['train_estimate_amp_mib']:.0f}), measured {row.get('train_measured_mib', '-')}")
    stock = rows[0]
    for r in rows:
        if r["status"] == "ok":
            r["ratio_to_stock"] = {k: round(r[k] / stock[k], 3) for k in ("train_estimate_mib", "train_estimate_amp_mib",
                                                                         "train_measured_mib", "inference_estimate_mib")
                                   if k in r and k in stock}
    return {"label": label, "configuration": configuration, "patch_size": list(cm.patch_size),
            "batch_size": cm.batch_size, "rows": rows}


def markdown(record: dict) -> str:
    lines = ["# Training memory at nnU-Net's own plans", "",
             f"CPU ({record['cpu']}), torch {record['torch']}. One training step (forward with deep supervision, "
             "nnU-Net's loss, backward, clipping, SGD step): weights, optimiser state and inputs plus the step's peak. "
             "Estimate: shape-only, on the meta device (`nnunet_lk.memory.estimate`); measured: torch.profiler memory "
             "events of a real CPU step (contiguous tensors, our CPU depthwise op), float32. AMP: the estimate "
             "at CUDA autocast's dtypes (what the planner uses; not measurable without a GPU). (×) = ratio to stock "
             "nnU-Net's figure of the same kind. Memory options: `plain` = `memory_lean=false`; `lean` = `memory_lean=true`, "
             "what the default `auto` runs on a GPU (on a CPU it runs plain); `stages` = `checkpoint_style=stages`. "
             "Measured only where the float32 "
             f"estimate is under {record['max_measure_gib']:g} GiB (CPU time: DLKUNet's 3D steps take minutes here).", ""]
    for c in record["configurations"]:
        lines += [f"## {c['label']}: patch {c['patch_size']}, batch {c['batch_size']}", "",
                  "| network | memory options | train estimate MiB | measured MiB (estimate error) | AMP estimate MiB | "
                  "inference estimate MiB |", "|---|---|---:|---:|---:|---:|"]
        for r in c["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['trainer']} | {r['style']} | {r['status']} | | | |")
                continue
            ratio = r["ratio_to_stock"]
            measured = (f"{r['train_measured_mib']:.0f} ({ratio.get('train_measured_mib', 0):.2f}×; "
                        f"{100 * r['train_estimate_error']:+.1f}%)" if "train_measured_mib" in r else "not measured")
            lines.append(f"| {r['backbone']} | {r['style']} | {r['train_estimate_mib']:.0f} "
                         f"({ratio['train_estimate_mib']:.2f}×) | {measured} | {r['train_estimate_amp_mib']:.0f} "
                         f"({ratio['train_estimate_amp_mib']:.2f}×) | {r['inference_estimate_mib']:.0f} "
                         f"({ratio['inference_estimate_mib']:.2f}×) |")
        lines += ["", "Where the memory goes (bytes a module leaves allocated after its training forward: its output "
                      "and what it saved for backward; top 3):", ""]
        for r in c["rows"]:
            if r.get("blocks"):
                top = "; ".join(f"{b['module']} ({b['kind']}) {b['retained_mib']:.0f} MiB, {100 * b['share']:.0f}%"
                                for b in r["blocks"][:3])
                lines.append(f"- {r['trainer']} ({r['style']}): {top}")
        lines.append("")
    errors = [abs(r["train_estimate_error"]) for c in record["configurations"] for r in c["rows"]
              if "train_estimate_error" in r]
    if errors:
        lines += [f"Estimate vs measured over {len(errors)} training steps: largest error {100 * max(errors):.1f}% "
                  f"(target: within 15%)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acdc-plans", help="nnUNetPlans.json of Dataset027_ACDC (nnUNetv2_plan_experiment -d 27)")
    parser.add_argument("--acdc-dataset-json", default=str(REPO.parent / "shared/data/Dataset027_ACDC/dataset.json"))
    parser.add_argument("--max-measure-gib", type=float, default=10.0,
                        help="measure a real step only where the float32 estimate is below this (this CPU's memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    hippocampus = json.loads((REPO / "tests/fixtures/hippocampus_plans.json").read_text())
    configurations = [("Hippocampus 2d", hippocampus, HIPPOCAMPUS_JSON, "2d"),
                      ("Hippocampus 3d_fullres", hippocampus, HIPPOCAMPUS_JSON, "3d_fullres")]
    if args.acdc_plans:
        configurations.append(("ACDC 3d_fullres", json.loads(Path(args.acdc_plans).read_text()),
                               json.loads(Path(args.acdc_dataset_json).read_text()), "3d_fullres"))
    with tempfile.TemporaryDirectory() as work:
        large, large_json = large_dataset_plans(Path(work))
    configurations.append(("Large synthetic CT 3d_fullres (nnU-Net's ExperimentPlanner, 8 GB)", large, large_json,
                           "3d_fullres"))
    record = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": args.threads,
              "max_measure_gib": args.max_measure_gib, "configurations": []}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for c in configurations:  # written after each configuration: a long run keeps what it measured
        record["configurations"].append(measure_configuration(*c, args.max_measure_gib, log))
        (out / "memory.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "memory.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
