"""CPU inference per case on every engine of `nnunet-lk predict` (torch, compile, onnxruntime, openvino, and the
INT8 models of `nnunet-lk quantize` as onnxruntime-int8 / openvino-int8), for any nnU-Net model folders (stock
nnU-Net's and ours), with nnU-Net's own sliding window.

Every (model, engine) pair runs ``nnUNetPredictor.predict_logits_from_preprocessed_data`` on the same cases
(each case preprocessed once per model, not timed), interleaved case by case and repeat by repeat, so that load
on the machine hits them alike; for each thread count and mirroring setting asked for. Beside each figure: the
roof, the network's MACs per patch times the patches the sliding window runs (times the mirrorings) at the fp32
sgemm peak measured in the same run with the same threads. Ratios are to the first model's ``torch`` engine (give
stock nnU-Net's folder first).

    python benchmarks/engines.py -i $nnUNet_raw/Dataset004_Hippocampus/imagesTr --cases 5 --repeats 3 \\
        --threads 1 2 --mirroring off on --models \\
        $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerStockBudget__nnUNetPlans_cpu__2d \\
        $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerLGMSNet__nnUNetPlans_cpu__2d

Writes ``benchmarks/results/engines_<dataset>_<configuration>.{json,md}`` (``--out`` for another folder).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from depthwise_ops import sgemm_peak  # noqa: E402
from onnx_inference import case_files, preprocess_case  # noqa: E402


def _timed(predictor, data) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.predict_logits_from_preprocessed_data(data)
    return time.perf_counter() - start


def _patches(predictor, shape) -> int:
    """How many patches the sliding window runs on a preprocessed case of ``shape`` (C, *spatial)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    patch = predictor.configuration_manager.patch_size
    spatial = [max(s, p) for s, p in zip(shape[1:][-len(patch):], patch)]
    steps = compute_steps_for_sliding_window(spatial, patch, predictor.tile_step_size)
    slices = shape[1] if len(patch) == 2 and len(shape) == 4 else 1  # 2D: one slice at a time
    return slices * len(list(itertools.product(*steps)))


def _macs(model: str) -> int:
    """MACs of one patch of the network the model folder's trainer builds from its plans."""
    from nnunet_lk.analysis import count_macs
    from nnunet_lk.nnunet_io import resolve_trainer
    from nnunet_lk.plans import plans_context
    trainer, _, configuration = Path(model).name.split("__")
    pm, cm, n_in, n_out = plans_context(json.loads((Path(model) / "plans.json").read_text()),
                                        json.loads((Path(model) / "dataset.json").read_text()), configuration)
    net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, False)
    return count_macs(net, (1, n_in, *cm.patch_size))


def run(models, engines, cases_folder: Path, n_cases: int, repeats: int, threads: int, mirroring: bool, fold,
        checkpoint: str, log) -> dict:
    from nnunet_lk.engines import engine_predictor
    from nnunet_lk.quantize import int8_path
    predictors = {}
    for model in models:
        for engine in engines:
            # an INT8 model is timed whether or not quantize accepted it; the record carries the verdict
            runtime, onnx_path = (engine[:-len("-int8")], int8_path(model, fold)) if engine.endswith("-int8") \
                else (engine, None)
            if onnx_path and not os.path.isfile(onnx_path):
                log(f"{Path(model).name}: no INT8 model (nnunet-lk quantize), {engine} left out")
                continue
            predictors[(model, engine)] = engine_predictor(model, fold, runtime, onnx_path=onnx_path,
                                                           checkpoint_name=checkpoint, use_mirroring=mirroring,
                                                           threads=threads, log=log)
    torch.set_num_threads(threads)
    peak = sgemm_peak("cpu") * 1e9
    first = predictors[(models[0], engines[0])]
    dataset_json = first.dataset_json
    cases = case_files(cases_folder, dataset_json["file_ending"], n_cases)
    macs = {m: _macs(m) for m in models}
    mirrors = {m: (2 ** len(predictors[(m, engines[0])].allowed_mirroring_axes or ()) if mirroring else 1)
               for m in models}
    per_case = {}
    for case, files in cases.items():
        data = {m: preprocess_case(predictors[(m, engines[0])], files) for m in models}
        for key, p in predictors.items():  # warm-up: allocations, first runs, compilation
            _timed(p, data[key[0]])
        times = {key: [] for key in predictors}
        for _ in range(repeats):
            for key, p in predictors.items():
                times[key].append(_timed(p, data[key[0]]))
        per_case[case] = {}
        for (m, e), t in times.items():
            patches = _patches(predictors[(m, e)], tuple(data[m].shape))
            per_case[case][f"{Path(m).name}|{e}"] = {
                "median_s": statistics.median(t), "runs_s": t, "patches": patches,
                "roof_s": patches * mirrors[m] * 2 * macs[m] / peak}
        log(f"{case}: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in per_case[case].items()))
    keys = list(next(iter(per_case.values())))
    median = {k: statistics.median(c[k]["median_s"] for c in per_case.values()) for k in keys}
    roof = {k: statistics.median(c[k]["roof_s"] for c in per_case.values()) for k in keys}
    base = keys[0]
    return {"threads": threads, "mirroring": mirroring, "sgemm_gflops": peak / 1e9,
            "macs_per_patch": {Path(m).name: macs[m] for m in models},
            "summary": {k: {"median_s_per_case": median[k], "roof_s_per_case": roof[k],
                            "ratio_to_first": median[k] / median[base], "fraction_of_roof": roof[k] / median[k]}
                        for k in keys},
            "per_case": per_case}


def markdown(record: dict) -> str:
    lines = [f"# CPU engines per case: {record['dataset']} {record['configuration']}", "",
             "nnU-Net's own sliding window (`predict_logits_from_preprocessed_data`), median over repeats then over "
             f"{len(record['cases'])} cases, engines interleaved case by case. Ratio: to `{record['first']}`. "
             "Roof: the network's MACs per patch x patches (x mirrorings) at the fp32 sgemm peak of the same run "
             "(INT8 engines may pass it).", ""]
    if record.get("int8"):
        lines += ["INT8 models (`nnunet-lk quantize`): foreground Dice on the fold's validation cases", "",
                  "| model | fp32 | INT8 | drop | accepted |", "|---|---|---|---|---|"]
        for model, v in record["int8"].items():
            lines.append(f"| {model} | {v['fp32']:.4f} | {v['int8']:.4f} | {v['drop']:+.4f} | "
                         f"{'yes' if v['accepted'] else 'no'} |")
        lines.append("")
    for block in record["runs"]:
        lines += [f"## {block['threads']} thread(s), mirroring {'on' if block['mirroring'] else 'off'} "
                  f"(sgemm peak {block['sgemm_gflops']:.0f} GFLOP/s)", "",
                  "| model | engine | s per case | ratio | roof s | roof / time |", "|---|---|---|---|---|---|"]
        for key, v in block["summary"].items():
            model, engine = key.split("|")
            lines.append(f"| {model} | {engine} | {v['median_s_per_case']:.3f} | {v['ratio_to_first']:.2f} | "
                         f"{v['roof_s_per_case']:.3f} | {v['fraction_of_roof']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def _int8_verdicts(models, fold) -> dict:
    from nnunet_lk.quantize import int8_path, report_path
    verdicts = {}
    for model in models:
        if not os.path.isfile(report_path(int8_path(model, fold))):
            continue
        report = json.loads(Path(report_path(int8_path(model, fold))).read_text())
        verdicts[Path(model).name] = {"fp32": report["validation"]["fp32_foreground_dice"],
                                      "int8": report["validation"]["int8_foreground_dice"],
                                      "drop": report["dice_drop"], "accepted": report["accepted"],
                                      "validation_cases": len(report["validation"]["cases"])}
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="model folders; the first is the reference")
    parser.add_argument("--engines", nargs="+", default=["torch", "compile", "onnxruntime", "openvino"],
                        help="also onnxruntime-int8, openvino-int8: fold_F/model.int8.onnx of `nnunet-lk quantize`")
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-i", "--input", required=True, help="folder of raw images (CASE_0000.nii.gz ...)")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--mirroring", choices=("off", "on"), nargs="+", default=["off"])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    from nnunet_lk.startup import start
    start()
    fold = args.fold if args.fold == "all" else int(args.fold)
    runs = [run(args.models, args.engines, Path(args.input), args.cases, args.repeats, t, m == "on", fold,
                args.checkpoint, log=lambda s: print(s, file=sys.stderr))
            for t in args.threads for m in args.mirroring]
    plans = json.loads((Path(args.models[0]) / "plans.json").read_text())
    configuration = Path(args.models[0]).name.split("__")[-1]
    record = {"dataset": plans["dataset_name"], "configuration": configuration,
              "first": f"{Path(args.models[0]).name}|{args.engines[0]}", "models": [os.path.abspath(m) for m in
                                                                                  args.models],
              "engines": args.engines, "cases": sorted(runs[0]["per_case"]), "repeats": args.repeats,
              "load_average": os.getloadavg()[0], "torch": torch.__version__, "runs": runs,
              "int8": _int8_verdicts(args.models, fold) if any(e.endswith("-int8") for e in args.engines) else {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engines_{record['dataset']}_{configuration}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
