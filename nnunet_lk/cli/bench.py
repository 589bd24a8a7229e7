"""``nnunet-lk bench``: argparse glue for :mod:`nnunet_lk.bench`."""
from __future__ import annotations

import sys


def cmd_bench(args) -> int:
    from ..bench import run_bench, write_outputs
    from ..nnunet_io import load_plans
    from ..analysis import default_device
    plans, dataset_json, name = load_plans(args.dataset, args.plans)
    device = args.device or default_device()
    record = run_bench(plans, dataset_json, args.configuration, trainers=args.trainers, batch=args.batch,
                       warmup=args.warmup, repeats=args.repeats, device=device, threads=args.threads,
                       isolate=not args.in_process, dataset=name, plans_name=args.plans, timeout=args.timeout,
                       variants=args.variants, profile=args.profile,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    paths = write_outputs(record, args.output)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}\nwrote {paths['markdown']}", file=sys.stderr)
    return 0 if any(r["status"] == "ok" for r in record["results"]) else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="params, MACs, latency, train-step time and memory of every backbone vs stock nnU-Net, "
                      "built from one dataset's plans",
        description="Build stock nnU-Net's network and each trainer's network from the same nnU-Net plans and "
                    "measure them side by side (each in a fresh process). Writes a JSON file and a markdown table.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (its plans in $nnUNet_preprocessed)")
    p.add_argument("-c", "--configuration", required=True, help="e.g. 2d, 3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans name (default nnUNetPlans)")
    p.add_argument("--trainers", nargs="+", help="trainer names (default: one per backbone, plain loss); stock "
                                                 "nnUNetTrainer is always measured as the baseline")
    p.add_argument("--batch", type=int, help="training-step batch (default: the plans' batch size)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; median and quartiles reported (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's default)")
    p.add_argument("--in-process", action="store_true",
                   help="measure all networks in this process (faster start; CPU memory figures then overlap)")
    p.add_argument("--timeout", type=float, help="seconds allowed per network (default: none)")
    p.add_argument("--variants", nargs="+", default=["shipped"], choices=("shipped", "torch", "contiguous", "channels_last"),
                   help="how each backbone runs, measured one after the other: shipped = as the trainer builds it "
                        "(default); torch = PyTorch's own depthwise path on contiguous tensors "
                        "(NNUNET_LK_DEPTHWISE=torch: the speed before our op); contiguous = our depthwise op on "
                        "contiguous tensors; channels_last = our op, the whole network channels-last. Speed-ups are "
                        "read against torch")
    p.add_argument("--profile", action="store_true",
                   help="CPU: profile one more training step and report its time share per kind of op (depthwise "
                        "convs, other convs, attention, norms, linear, data movement, other)")
    p.add_argument("-o", "--output", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.set_defaults(func=cmd_bench)
