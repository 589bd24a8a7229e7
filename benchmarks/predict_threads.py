"""Per-case time of the stock ``nnUNetv2_predict`` against torch's thread count, on an idle CPU and with one
core busy. A benchmark script, not a test; it needs a trained nnunet-lk model folder (it trains nothing).

Settings, interleaved within each block and repeat: ``NNUNET_LK_THREADS=1``, ``=N`` (every usable core), and
unset (our default: the cores idle when the prediction starts, sampled from /proc/stat). Blocks: idle, then
one core kept busy by a spinning process started ``--warm-up`` seconds earlier.
Each run is the whole command (start-up, model loading, preprocessing, sliding window, export) with
``-npp 0 -nps 0``; per case = wall time / cases. The roof beside it: fp32 sgemm measured in the same run.

    python benchmarks/predict_threads.py \\
        -m $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerLGMSNet__nnUNetPlans_cpu__2d -f 0 -i new_cases/

Writes ``benchmarks/results/predict_threads.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from nnunet_lk import settings  # noqa: E402
from depthwise_ops import sgemm_peak  # noqa: E402


def sgemm_peak_with(threads: int) -> float:
    """fp32 sgemm GFLOP/s with ``threads`` torch threads."""
    import torch
    torch.set_num_threads(threads)
    return sgemm_peak("cpu")


def predict_once(model: Path, fold: str, cases: Path, threads, env: dict) -> float:
    out = Path(tempfile.mkdtemp(prefix="predict_threads_"))
    run_env = dict(env)
    run_env.pop(settings.THREADS, None)
    if threads is not None:
        run_env[settings.THREADS] = str(threads)
    # nnUNetv2_predict (its -npp 0 -nps 0 path; the model-folder entry point always starts worker pools), with
    # nnUNet_results, dataset, trainer, plans and configuration read from the model folder's path
    trainer, plans, configuration = model.name.split("__")
    run_env["nnUNet_results"] = str(model.parent.parent)
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(cases), "-o", str(out),
                           "-d", model.parent.name, "-tr", trainer, "-p", plans, "-c", configuration, "-f", fold,
                           "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"],
                          env=run_env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nnUNetv2_predict failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, type=Path, help="trained nnunet-lk model folder")
    parser.add_argument("-f", "--fold", default="0")
    parser.add_argument("-i", "--input", required=True, type=Path, help="cases to predict")
    parser.add_argument("--cases", type=int, default=3, help="cases used from -i (default 3)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warm-up", type=float, default=5.0,
                        help="seconds the spinning process runs before the busy block")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "predict_threads")
    args = parser.parse_args()

    cores = settings.usable_cores()
    cases = Path(tempfile.mkdtemp(prefix="predict_threads_cases_"))
    for image in sorted(args.input.iterdir())[:args.cases]:
        (cases / image.name).symlink_to(image.resolve())
    n_cases = len(list(cases.iterdir()))
    env = dict(os.environ, nnUNet_compile="f")
    settings_list = [1, cores, None]
    rows = []
    for block in ("idle", "one core busy"):
        spinner = None
        if block != "idle":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(args.warm_up)
        try:
            roof = {t: sgemm_peak_with(t) for t in sorted({1, cores})}
            seconds = {t: [] for t in settings_list}
            loads = []
            for _ in range(args.repeats):
                for threads in settings_list:
                    loads.append(os.getloadavg()[0])
                    seconds[threads].append(predict_once(args.model, args.fold, cases, threads, env))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        for threads in settings_list:
            median = statistics.median(seconds[threads])
            rows.append({"block": block, "threads": "default" if threads is None else threads,
                         "seconds": [round(s, 2) for s in seconds[threads]], "per_case_s": round(median / n_cases, 2),
                         "sgemm_gflops": {str(t): round(g, 1) for t, g in roof.items()},
                         "load_avg_at_runs": [round(x, 2) for x in loads]})  # context only
        print(f"{block}: " + ", ".join(f"{r['threads']}: {r['per_case_s']} s/case" for r in rows[-3:]), flush=True)
    shutil.rmtree(cases, ignore_errors=True)
    for block in ("idle", "one core busy"):
        block_rows = [r for r in rows if r["block"] == block]
        best = min(r["per_case_s"] for r in block_rows)
        for r in block_rows:
            r["vs_best"] = round(r["per_case_s"] / best, 2)
    result = {"model": str(args.model), "cases": n_cases, "repeats": args.repeats, "usable_cores": cores,
              "machine": platform.processor() or platform.machine(), "command": "nnUNetv2_predict -device cpu "
              "-npp 0 -nps 0 (whole command, per case = wall / cases)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# nnUNetv2_predict per case against torch threads ({n_cases} cases, {args.repeats} repeats, "
             f"{cores} usable cores)", "", "| machine | NNUNET_LK_THREADS | s per case (median) | × best in block | "
             "sgemm peak, GFLOP/s (threads: value) |", "|---|---|---|---|---|"]
    for r in rows:
        roof = ", ".join(f"{t}: {g}" for t, g in r["sgemm_gflops"].items())
        lines.append(f"| {r['block']} | {r['threads']} | {r['per_case_s']} | {r['vs_best']} | {roof} |")
    lines += ["", "default = unset: the cores idle when the prediction starts (each usable core sampled from "
              "/proc/stat over 0.25 s). Whole command per case, so start-up and model loading are included."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
