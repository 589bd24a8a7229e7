"""The ``nnunet-lk`` command: list, summary, env, doctor, plans here; bench, ablate, export and predict-onnx
register themselves from their own modules (which import their optional extras only when run)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import env as lk_env
from . import ablate as ablate_cli, bench as bench_cli, export as export_cli
from ..networks import get_backbone, list_backbones
from ..errors import NnunetLkError, UsageError


def _trainers():
    from ..training.trainers import all_trainers
    return all_trainers()


def cmd_list(args) -> int:
    trainers = _trainers()
    by_backbone = {}
    for name, cls in sorted(trainers.items()):
        by_backbone.setdefault(cls.backbone, []).append(name)
    if args.json:
        print(json.dumps({"backbones": {b: {"dims": list(get_backbone(b).dims),
                                            "options": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in get_backbone(b).config.items()},
                                            "description": get_backbone(b).description,
                                            "default_recipe": {str(d): _default_recipe(b, d)
                                                               for d in get_backbone(b).dims},
                                            "trainers": by_backbone.get(b, [])} for b in list_backbones()},
                          "trainers": sorted(trainers)}, indent=2))
        return 0
    print("Backbones (nnunet-lk summary NAME) and their trainers (nnUNetv2_train ... -tr NAME):")
    for b in list_backbones():
        spec = get_backbone(b)
        print(f"  {b:12s} {'/'.join(f'{d}D' for d in spec.dims):6s} {spec.description}")
        print(f"      options: {_options_line(b)}")
        print(f"      recipe of {spec.trainer_name}: {_recipe_line(b)}")
        for t in by_backbone.get(b, []):
            print(f"      {t}")
    return 0


def _default_recipe(backbone: str, dim: int) -> str:
    from ..training.recipes import default_recipe
    return default_recipe(backbone, dim)


def _recipe_line(backbone: str) -> str:
    """What the plain trainer trains with, per dimension."""
    spec = get_backbone(backbone)
    if not spec.paper_recipes:
        return "nnU-Net's (no paper recipe published)"
    parts = []
    for d in spec.dims:
        r = spec.paper_recipes[d] if _default_recipe(backbone, d) == "paper" else None
        parts.append(f"{d}D paper ({r.optimizer}, lr {r.lr:g}, {r.schedule})" if r else f"{d}D nnU-Net's")
    return "; ".join(parts) + f"; nnU-Net's with {spec.trainer_name}_nnUNetRecipe"


def _options_line(backbone: str) -> str:
    """Each option with its default (the builder's signature, then the named size)."""
    return ", ".join(f"{k}={v!r}" for k, v in get_backbone(backbone).config.items())


def cmd_summary(args) -> int:
    from ..analysis import summarize_network, summary_configuration
    overrides = dict(_parse_option(o) for o in args.option or [])
    configuration = summary_configuration(args.name, args.dim, args.in_channels, args.classes, args.patch)
    result = summarize_network(args.name, **configuration,
                               strides=json.loads(args.strides) if args.strides else None,
                               deep_supervision=args.deep_supervision, **overrides)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['name']} ({result['dim']}D, {result['input_channels']} -> {result['num_classes']}, "
              f"patch {result['patch_size']}, level strides {result['level_strides']})")
        print(f"  params:              {result['params']:,}")
        print(f"  params w/o DS heads: {result['params_without_ds_heads']:,}  (compare with the paper)")
        print(f"  MACs:                {result['macs'] / 1e9:.3f} G  (torch FlopCounterMode FLOPs / 2)")
    return 0


def cmd_env(args) -> int:
    if args.uninstall:
        removed = lk_env.uninstall_pth()
        print(f"# removed {', '.join(removed)}" if removed else "# no start-up hook installed here", file=sys.stderr)
        return 0
    if args.install:
        path = lk_env.install_pth()
        print(f"# wrote {path}: every Python of this environment now finds the nnunet-lk trainers "
              f"({lk_env.ENV_VAR} += {lk_env.trainer_folder()})", file=sys.stderr)
        return 0
    print(lk_env.shell_lines())
    return 0


def cmd_doctor(args) -> int:
    from .doctor import run_doctor
    return run_doctor(verbose=args.verbose)


def cmd_plans(args) -> int:
    from ..plans import derive_plans, list_presets, load_preset
    if args.list_presets:
        for name in list_presets():
            print(f"{name:24s} {load_preset(name).get('description', '')}")
        return 0
    if args.gpu_memory is not None and args.backbone is None:
        raise UsageError("--gpu-memory plans for one backbone: add --backbone NAME (`nnunet-lk list`; "
                         "nnUNetTrainer for stock nnU-Net)")
    if args.backbone is not None and (args.patch or args.batch):
        raise UsageError("--backbone re-plans patch and batch itself; leave out --patch and --batch")
    if args.backbone is not None and args.name is None and args.dataset is not None:
        args.name = f"{args.source}_{args.backbone}" + (f"_{args.gpu_memory:g}GB" if args.gpu_memory else "")
    if args.dataset is None or args.configuration is None or args.name is None:
        raise UsageError("nnunet-lk plans needs -d DATASET -c CONFIGURATION --name NEW_PLANS_NAME")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed
    if nnUNet_preprocessed is None:
        raise UsageError("nnUNet_preprocessed is not set; export it to nnU-Net's preprocessed folder")
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.dataset))
    source = os.path.join(folder, f"{args.source}.json")
    target = os.path.join(folder, f"{args.name}.json")
    if not os.path.isfile(source):
        raise UsageError(f"{source} does not exist: run nnUNetv2_plan_and_preprocess -d {args.dataset} first "
                                 f"(or name the source plans with -p)")
    if os.path.exists(target) and not args.force:
        raise UsageError(f"{target} already exists; choose another --name or pass --force to replace it")
    if args.name == args.source:
        raise UsageError("--name must differ from the source plans, which stay untouched")
    with open(source) as f:
        plans = json.load(f)
    options = {}
    for item in args.option or []:
        key, value = _parse_option(item)
        if "." not in key:
            raise UsageError(f"--option {item!r}: write BACKBONE.KEY=VALUE, e.g. dlkunet_m.width=32")
        backbone, option = key.split(".", 1)
        options.setdefault(backbone, {})[option] = value
    derived = derive_plans(plans, args.configuration, args.name, patch_size=args.patch, batch_size=args.batch,
                           backbone_opts=options, preset=load_preset(args.preset) if args.preset else None)
    memory_note = ""
    if args.backbone is not None:
        derived, memory_note = _plan_for_memory(args, derived, folder)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(derived, f, indent=2)
    os.replace(tmp, target)
    cfg = derived["configurations"][args.configuration]
    print(f"wrote {target}\n  {args.configuration}: patch {cfg['patch_size']}, batch {cfg['batch_size']}"
          + (f", options {cfg['nnunet_lk']}" if "nnunet_lk" in cfg else "")
          + memory_note + _next_commands(args))
    return 0


def _next_commands(args) -> str:
    """The stock commands that use the new plans, with -device cpu where no GPU can be used."""
    import torch
    device = "" if torch.cuda.is_available() else " -device cpu"
    trainer = getattr(args, "trainer_name", None) or "TRAINER"
    return (f"\n  train with:   nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr {trainer} -p {args.name}"
            f"{device}"
            f"\n  predict with: nnUNetv2_predict -i INPUT -o OUTPUT -d {args.dataset} -c {args.configuration} -f FOLD "
            f"-tr {trainer} -p {args.name}{device}")


def _plan_for_memory(args, plans: dict, folder: str):
    """Patch and batch re-planned so that the backbone's training estimate fits the target (memory.planner)."""
    from ..memory.planner import plan_for_memory
    from ..memory.tracker import MiB
    trainer = _trainer_for(args.backbone)
    args.trainer_name = trainer.__name__
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    print(f"re-planning {args.configuration} for {trainer.__name__} ...", file=sys.stderr)
    plan = plan_for_memory(trainer, plans, dataset_json, args.configuration, args.name, gpu_memory_gb=args.gpu_memory,
                           log=lambda m: print(m, file=sys.stderr))
    note = (f"\n  memory: estimate {plan.estimate.total / MiB:.0f} MiB for {trainer.__name__} (AMP), target "
            f"{plan.target_bytes / MiB:.0f} MiB: {plan.target_source}; was patch {plan.original_patch}, batch "
            f"{plan.original_batch}")
    return plan.plans, note


def _trainer_for(name: str):
    """A backbone name's plain trainer, or a trainer named directly (nnUNetTrainer: stock nnU-Net)."""
    from ..nnunet_io import default_trainers, resolve_trainer
    by_backbone = {resolve_trainer(t).backbone: t for t in default_trainers()}
    return resolve_trainer(by_backbone.get(name, name))


def _parse_option(item: str):
    if "=" not in item:
        raise UsageError(f"option {item!r} must look like KEY=VALUE")
    key, value = item.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


DESCRIPTION = """Lightweight large-kernel segmentation backbones (DLKUNet S/M/L, LGMSNet, LM-Net, MS-LKSeg) as
nnU-Net v2 trainers. Train and predict with the stock commands (nnUNetv2_train ... -tr nnUNetTrainerDLKUNetL);
these tools list the backbones, check the installation, derive plans, and benchmark, compare and export models."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-lk", description=DESCRIPTION,
                                     epilog="Start with `nnunet-lk doctor` and `nnunet-lk list`; "
                                            "`nnunet-lk COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (_register_list, _register_summary, _register_env, _register_doctor, _register_plans,
                     ablate_cli.register, bench_cli.register, export_cli.register):
        register(sub)
    return parser


def _register_list(sub) -> None:
    p = sub.add_parser("list", help="backbone names and trainer names")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_list)


def _register_summary(sub) -> None:
    p = sub.add_parser("summary", help="build a backbone and print params and MACs (default: the paper's "
                                       "configuration)",
                       description="Build a backbone and print its parameters and MACs. Without flags: the "
                                   "paper's configuration (e.g. dlkunet_s 2D 1->9 at 224x224), whose parameter "
                                   "count is the official one; each flag replaces one value.",
                       epilog="backbone options (--option KEY=VALUE) and their defaults:\n" + "\n".join(
                           f"  {b}: {_options_line(b)}" for b in list_backbones()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="backbone name (`nnunet-lk list`), e.g. dlkunet_s")
    p.add_argument("--dim", type=int, choices=(2, 3), help="2 or 3 (default: the paper's; --dim 3 picks the "
                                                           "paper's 3D configuration where there is one)")
    p.add_argument("--in-channels", type=int, help="input channels (default: the paper's)")
    p.add_argument("--classes", type=int, help="output classes (default: the paper's)")
    p.add_argument("--patch", type=int, nargs="+", help="input size, D H W (3D) or H W (2D) (default: the paper's)")
    p.add_argument("--strides", help="plans-style per-stage strides as JSON, e.g. '[[1,1],[2,2],[2,2]]' "
                                     "(default: the paper's x2 pyramid)")
    p.add_argument("--option", action="append", help="backbone option KEY=VALUE (e.g. width=32); repeatable")
    p.add_argument("--deep-supervision", action="store_true",
                   help="build with deep supervision on (outputs at every decoder level, as in training)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_summary)


def _register_env(sub) -> None:
    p = sub.add_parser("env", help="shell lines that make nnU-Net find our trainers")
    p.add_argument("--install", action="store_true",
                   help="instead, install a start-up hook into this Python environment (no shell line needed)")
    p.add_argument("--uninstall", action="store_true",
                   help="remove the start-up hook from this environment (do this before `pip uninstall nnunet-lk`; "
                        "a hook left behind does nothing once the package is gone)")
    p.set_defaults(func=cmd_env)


def _register_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check the installation through nnU-Net's own trainer lookup")
    p.add_argument("-v", "--verbose", action="store_true", help="also print nnU-Net's own lookup messages")
    p.set_defaults(func=cmd_doctor)


def _register_plans(sub) -> None:
    p = sub.add_parser("plans", help="derive a plans variant (patch, batch, backbone options) without "
                                     "re-preprocessing; train it with -p NAME")
    p.add_argument("-d", "--dataset", help="dataset id or name, as for nnUNetv2_train (e.g. 4)")
    p.add_argument("-c", "--configuration", help="configuration to change, e.g. 2d or 3d_fullres")
    p.add_argument("-p", "--source", default="nnUNetPlans", help="source plans name (default nnUNetPlans)")
    p.add_argument("--name", help="new plans name (e.g. nnUNetPlans_cpu)")
    p.add_argument("--patch", type=int, nargs="+", help="new patch size (the topology is re-planned for it; sizes "
                                                        "that do not fit are refused with the nearest that do)")
    p.add_argument("--batch", type=int, help="new batch size")
    p.add_argument("--preset", help="a preset name from `--list-presets` or a JSON file")
    p.add_argument("--option", action="append", help="backbone option BACKBONE.KEY=VALUE, e.g. dlkunet_m.width=32")
    p.add_argument("--backbone", help="re-plan patch and batch so that this backbone's (or trainer's) training "
                                      "fits the GPU memory the plans were made for, or --gpu-memory")
    p.add_argument("--gpu-memory", "-gpu_memory_target", dest="gpu_memory", type=float, metavar="GB",
                   help="with --backbone: the GPU memory to plan for in GB (nnU-Net's -gpu_memory_target; default: "
                        "what stock nnU-Net's network uses at the source plans)")
    p.add_argument("--force", action="store_true", help="replace an existing derived plans file")
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.set_defaults(func=cmd_plans)




def main(argv=None) -> int:
    from ..startup import start
    start([])  # the trainer folder and the hints, when no start-up hook ran (not installed, python -m)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NnunetLkError as e:  # ours name the problem and the fix; anything else is a bug: traceback
        print(f"nnunet-lk {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
