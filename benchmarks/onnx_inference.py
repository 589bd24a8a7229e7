"""CPU inference per case: an nnunet-lk model in PyTorch vs the same model in ONNX Runtime vs stock nnU-Net
(issue 7). A benchmark script, not a test; it needs trained model folders (it trains nothing).

Every engine runs nnU-Net's own ``nnUNetPredictor`` on the same cases (sliding window, Gaussian weighting,
mirroring as configured), so only the network differs:
- ``pytorch``: the nnunet-lk model folder as ``nnUNetv2_predict`` runs it (eval: re-parameterised);
- ``onnxruntime``: the same folder with ``predictor.network`` replaced by the exported ONNX model
  (``nnunet-lk export``; exported here first if ``--onnx`` does not exist);
- ``stock``: a stock nnU-Net model folder (``nnUNetTrainer``) of the same dataset, in PyTorch;
- ``stock_onnxruntime``: that stock model exported the same way, in ONNX Runtime.
Each case is preprocessed once per model folder (not timed); the timed part is
``predict_logits_from_preprocessed_data`` (sliding window over the whole case). Engines are interleaved
case by case and repeat by repeat, so that load on a shared machine hits them alike. Ratios are medians of
per-case seconds over the stock model's (and ONNX over PyTorch).

    python benchmarks/onnx_inference.py \\
        --model $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerDLKUNetM__nnUNetPlans_cpu__2d \\
        --stock $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__2d \\
        --fold 0 -i $nnUNet_raw/Dataset004_Hippocampus/imagesTs --cases 5 --threads 1

Writes ``benchmarks/results/onnx_inference.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _fold(value: str):
    return value if value == "all" else int(value)


def case_files(folder: Path, file_ending: str, limit: int):
    """Case id -> channel files, listed as nnUNetv2_predict lists them: every CASE_XXXX<ending> of the case (one
    RGB PNG is one file holding three channels)."""
    from nnunetv2.utilities.utils import (create_lists_from_splitted_dataset_folder,
                                          get_identifiers_from_splitted_dataset_folder)
    ids = sorted(get_identifiers_from_splitted_dataset_folder(str(folder), file_ending))[:limit]
    if not ids:
        raise SystemExit(f"no cases named CASE_0000{file_ending} in {folder}")
    files = create_lists_from_splitted_dataset_folder(str(folder), file_ending, ids, num_processes=1)
    return {case: list(f) for case, f in zip(ids, files)}


def _predictor(model_folder: str, fold, checkpoint: str, mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint)
    return predictor


def preprocess_case(predictor, files):
    pp = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = pp.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                             predictor.dataset_json)
    return torch.from_numpy(data).float()


def _timed(predictor, data) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.predict_logits_from_preprocessed_data(data)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="nnunet-lk model folder (TRAINER__PLANS__CONFIG)")
    parser.add_argument("--stock", help="stock nnU-Net model folder of the same dataset (optional)")
    parser.add_argument("--fold", type=_fold, default=0)
    parser.add_argument("--stock-fold", type=_fold, default=None, help="default: --fold")
    parser.add_argument("-c", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--onnx", help="exported model (default: <model>/fold_F/model.onnx, exported if missing)")
    parser.add_argument("-i", "--input", required=True, help="folder of raw images (CASE_0000.nii.gz ...)")
    parser.add_argument("--cases", type=int, default=5, help="how many cases (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case and engine (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring (nnU-Net's default; off "
                                                                 "here: the ratio is the same and runs 4-8x faster)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "onnx_inference.json"))
    args = parser.parse_args(argv)

    from nnunet_lk import env as lk_env
    from nnunet_lk.engines import OnnxRuntimeNetwork
    from nnunet_lk.export import fold_export
    lk_env.ensure_environment()
    os.environ["nnUNet_compile"] = "f"
    torch.set_num_threads(args.threads)

    def exported(folder, fold, path=None):
        return path or fold_export(folder, fold, args.checkpoint, "the ONNX Runtime engine",
                                   log=lambda m: print(m, file=sys.stderr))

    def onnx_engine(folder, fold, path):
        predictor = _predictor(folder, fold, args.checkpoint, args.mirroring)
        predictor.network = OnnxRuntimeNetwork(path, threads=args.threads)
        predictor.list_of_parameters = [None]
        return predictor

    onnx_path = exported(args.model, args.fold, args.onnx)
    engines = {"pytorch": _predictor(args.model, args.fold, args.checkpoint, args.mirroring),
               "onnxruntime": onnx_engine(args.model, args.fold, onnx_path)}
    if args.stock:
        # stock nnU-Net in both engines too, so that "ours in ONNX vs stock" is not an engine comparison
        stock_fold = args.stock_fold if args.stock_fold is not None else args.fold
        engines["stock"] = _predictor(args.stock, stock_fold, args.checkpoint, args.mirroring)
        engines["stock_onnxruntime"] = onnx_engine(args.stock, stock_fold, exported(args.stock, stock_fold))

    dataset_json = engines["pytorch"].dataset_json
    cases = case_files(Path(args.input), dataset_json["file_ending"], args.cases)
    per_case = {}
    for case, files in cases.items():
        data = {name: preprocess_case(p, files) for name, p in engines.items()}
        for name, p in engines.items():  # warm-up (allocations, onnxruntime's first run)
            _timed(p, data[name])
        times = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, p in engines.items():
                times[name].append(_timed(p, data[name]))
        per_case[case] = {name: {"median_s": statistics.median(t), "runs_s": t,
                                 "preprocessed_shape": list(data[name].shape)} for name, t in times.items()}
        print(f"{case}: " + ", ".join(f"{n} {v['median_s']:.3f} s" for n, v in per_case[case].items()),
              file=sys.stderr)

    def median_of(name):
        return statistics.median(v[name]["median_s"] for v in per_case.values())

    summary = {name: {"median_s_per_case": median_of(name)} for name in engines}
    ratios = {"onnxruntime/pytorch": median_of("onnxruntime") / median_of("pytorch")}
    if "stock" in engines:
        ratios["pytorch/stock"] = median_of("pytorch") / median_of("stock")
        ratios["onnxruntime/stock_onnxruntime"] = median_of("onnxruntime") / median_of("stock_onnxruntime")
        ratios["stock_onnxruntime/stock"] = median_of("stock_onnxruntime") / median_of("stock")
    import onnxruntime
    result = {
        "what": "CPU seconds per case of nnUNetPredictor.predict_logits_from_preprocessed_data (sliding window), "
                "median over repeats then over cases; ratios < 1 mean faster than the denominator",
        "model": os.path.abspath(args.model), "trainer": engines["pytorch"].trainer_name,
        "stock": os.path.abspath(args.stock) if args.stock else None, "fold": args.fold,
        "onnx": os.path.abspath(onnx_path), "cases": list(cases), "repeats": args.repeats,
        "threads": args.threads, "mirroring": args.mirroring,
        "summary": summary, "ratios": ratios, "per_case": per_case,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
