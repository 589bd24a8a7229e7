"""ONNX export and onnxruntime inference (issue 7, ``nnunet_lk/export.py``).

Fast: the export CLI on a fake nnU-Net model folder (hippocampus plans, tiny DLKUNet-S, a checkpoint in
nnU-Net's format), its sidecar, dynamic axes, clear errors for truncated/foreign/mismatched checkpoints
and unknown trainers, and ``predict-onnx`` against ``nnUNetv2_predict_from_modelfolder`` on two
synthetic cases. Slow (``-m slow``; torch's dynamo exporter takes ~15-120 s per network on a loaded
2-core machine): every registered backbone in 2D and 3D, and a stock nnUNetTrainer model.

Tolerance: 1e-4 on logits (float32; the observed differences are ~1e-7)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_lk.blocks.reparam import ReparamDepthwise
from nnunet_lk.cli.main import main as cli_main
from nnunet_lk.export import (ExportError, axiswise_norms, export_network, load_fold, max_abs_difference,
                              ort_session, sidecar_path, size_multiple)
from nnunet_lk.networks import build_backbone, get_backbone, list_backbones
from nnunet_lk.errors import CheckpointError
from tests.helpers.modelfolder import (LABELS, dlkunet_s_network, fake_plans, make_model_folder,
                         randomise_norm_statistics, save_checkpoint)
from tests.helpers.tiny import TINY_OPTIONS  # export is about the graph, not capacity

TOLERANCE = 1e-4
PATCH = {2: (56, 40), 3: (40, 56, 40)}  # the Hippocampus plans' patches
ODD = {2: (37, 29), 3: (21, 27, 19)}  # no multiple of any stride: exercises the padding and crop nodes


# ONNX Conv needs a constant `group`; MS-LKSeg's DynamicConv uses groups=batch, so it exports with batch 1
# (nnU-Net's sliding-window batch). A block change could lift this (see nnunet_lk/export.py).
STATIC_BATCH = {"mslkseg"}


def _check_exported(net, path, channels, dim, dynamic_batch=True, tolerance=TOLERANCE, other=None):
    session = ort_session(path)
    declared = session.get_inputs()[0].shape
    assert all(isinstance(d, str) for d in declared[2:]), declared  # dynamic spatial axes
    assert isinstance(declared[0], str) if dynamic_batch else declared[0] == 1, declared
    b1, b2 = (2, 3) if dynamic_batch else (1, 1)
    shapes = [[b1, channels, *PATCH[dim]], [1, channels, *(other or ODD[dim])], [b2, channels, *PATCH[dim]]]
    diffs = max_abs_difference(net, session, shapes)
    assert max(diffs) <= tolerance, diffs
    return diffs


# ---- every backbone (slow) ---------------------------------------------------------------------------------
# Known gaps, kept visible (none at the moment: LM-Net's 3D pyramid pooling used to need torch's
# adaptive_avg_pool3d, which has no ONNX translation; it now uses nnunet_lk.blocks.ops.adaptive_avg_pool).
EXPORT_GAPS = {}
# LGMSNet-3D (tiny, random weights) amplifies float32 rounding ~600x: PyTorch's own float32 output is
# ~1.5e-4 from float64. (Before norms were exported axis by axis, onnxruntime's one-pass InstanceNormalization
# on the 64³ maps put it 6e-2 off; nnunet_lk.blocks.ops.AxiswiseGroupNorm.)
LOOSE = {("lgmsnet", 3): 1e-3}
CASES = [pytest.param(name, dim, id=f"{name}-{dim}d", marks=([pytest.mark.xfail(
             strict=True, raises=ExportError, reason=EXPORT_GAPS[(name, dim)])] if (name, dim) in EXPORT_GAPS else [])
             + ([pytest.mark.full] if dim == 3 else []))  # 3D exports: minutes each on 2 cores
         for name in list_backbones() for dim in (2, 3) if dim in get_backbone(name).dims]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,dim", CASES)
def test_every_backbone_exports_with_dynamic_axes(name, dim, tmp_path):
    torch.manual_seed(0)
    net = randomise_norm_statistics(build_backbone(name, dim=dim, input_channels=2, num_classes=3,
                                                    **TINY_OPTIONS[name])).eval()
    path = str(tmp_path / f"{name}.onnx")
    dynamic_batch = export_network(net, path, 2, size_multiple(net), PATCH[dim])
    assert dynamic_batch == (name not in STATIC_BATCH)
    assert sorted(os.listdir(tmp_path)) == [f"{name}.onnx"]  # no temporary files left
    _check_exported(net, path, 2, dim, dynamic_batch, LOOSE.get((name, dim), TOLERANCE))
    attention = [m for m in net.modules() if type(m).__name__ == "NeighborhoodAttention"]
    if attention and dim == 2:  # the sliced form: keys and values as slices, gathers of the bias table only
        import onnx
        nodes = onnx.load(path).graph.node
        offsets = sum(math.prod(m.kernel) for m in attention)
        assert sum(n.op_type == "Gather" for n in nodes) <= dim * offsets
        assert sum(n.op_type == "Pad" and any(a.s == b"edge" for a in n.attribute) for n in nodes) >= offsets
        # the window softmax is spelled out; the Softmax left (the global attention's) runs on the last axis
        axes = [a.i for n in nodes if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]
        assert all(axis == -1 for axis in axes), axes
    reparam = [m for m in net.modules() if isinstance(m, ReparamDepthwise)]
    if reparam:  # inference form: one fused conv per ReparamDepthwise, the training branches are gone
        import onnx
        names = [i.name for i in onnx.load(path).graph.initializer]
        assert sum(n.endswith("fused_weight") for n in names) == len(reparam)
        assert not any(".branches." in n for n in names)


@pytest.mark.parametrize("patch,axiswise", [((56, 40), False), ((256, 256), True), ((40, 56, 40), True)])
def test_norms_are_exported_axiswise_on_large_patches(patch, axiswise, tmp_path):
    import onnx
    assert axiswise_norms(patch) == axiswise
    conv = torch.nn.Conv2d if len(patch) == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if len(patch) == 2 else torch.nn.InstanceNorm3d
    net = torch.nn.Sequential(conv(1, 4, 3, padding=1), norm(4, affine=True), torch.nn.GroupNorm(2, 4)).eval()
    path = str(tmp_path / "norms.onnx")
    export_network(net, path, 1, [1] * len(patch), patch)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert ("InstanceNormalization" not in ops) == axiswise, ops
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.modules.instancenorm._InstanceNorm,
                              torch.nn.GroupNorm)) for m in net)  # the caller's network is left as it was
    _check_exported(net, path, 1, len(patch), other=[17] * len(patch))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A DLKUNet-S (width 8) model folder exported once through the CLI."""
    root = tmp_path_factory.mktemp("results")
    plans = fake_plans()
    folder = make_model_folder(root, "nnUNetTrainerDLKUNetS", plans, dlkunet_s_network(plans))
    out = root / "onnx" / "model.onnx"
    code = cli_main(["export", str(folder), "--fold", "0", "-o", str(out)])
    assert code == 0
    return folder, out


def test_export_cli_writes_model_and_sidecar(exported, capsys):
    folder, out = exported
    info = json.loads(Path(sidecar_path(str(out))).read_text())
    assert Path(sidecar_path(str(out))).name == "model.json"
    assert info["patch_size"] == [56, 40] and info["spacing"] == [1.0, 1.0]
    assert info["num_input_channels"] == 1 and info["num_output_channels"] == 3
    assert info["labels"] == LABELS and info["transpose_forward"] == [0, 1, 2]
    assert info["normalization_schemes"] == ["ZScoreNormalization"]
    assert info["trainer"] == "nnUNetTrainerDLKUNetS" and info["configuration"] == "2d" and info["fold"] == 0
    assert info["inference_allowed_mirroring_axes"] == [0, 1]
    assert max(info["check"]["max_abs_diff"]) <= TOLERANCE == info["check"]["tolerance"]
    assert info["axiswise_norms"] is False  # 56x40: onnxruntime's own InstanceNormalization is exact enough
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx"]
    # the ONNX model against the network nnUNetv2_predict builds, at other sizes and batches
    loaded = load_fold(str(folder), 0)
    assert not loaded.network.training and not loaded.network.decoder.deep_supervision
    _check_exported(loaded.network, str(out), 1, 2)


def _fold_files(folder):
    return folder / "fold_0" / "checkpoint_final.pth"


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("truncated", "truncated or not a torch file"),
    ("foreign", "not an nnU-Net checkpoint"),
    ("other_width", "weights do not fit the network"),
    ("unknown_trainer", "names the trainer 'nnUNetTrainerDoesNotExist' (its 'trainer_name' entry)"),
    ("no_fold", "does not exist"),
])
def test_export_errors_are_clear_and_write_nothing(exported, tmp_path, capsys, damage, message):
    folder = _copy_folder(exported[0], tmp_path / "model")
    checkpoint = _fold_files(folder)
    fold = "0"
    if damage == "truncated":
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[:len(data) // 2])
    elif damage == "foreign":
        torch.save({"state_dict": dlkunet_s_network(fake_plans()).state_dict()}, checkpoint)
    elif damage == "other_width":
        save_checkpoint(checkpoint, dlkunet_s_network(fake_plans(width=16)), fake_plans(), "nnUNetTrainerDLKUNetS")
    elif damage == "unknown_trainer":
        save_checkpoint(checkpoint, dlkunet_s_network(fake_plans()), fake_plans(), "nnUNetTrainerDoesNotExist")
    else:
        fold = "3"
    out = tmp_path / "out" / "model.onnx"
    code = cli_main(["export", str(folder), "--fold", fold, "-o", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    if damage == "unknown_trainer":  # where the name comes from and what can fix it; not the -tr advice
        assert str(checkpoint) in err and "install the package that defines" in err and "env --install" not in err
    assert not out.exists() and not Path(sidecar_path(str(out))).exists()


def test_loading_errors_raise_typed_exceptions(exported, tmp_path):
    folder = _copy_folder(exported[0], tmp_path / "model")
    _fold_files(folder).write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(CheckpointError, match="truncated"):
        load_fold(str(folder), 0)
    with pytest.raises(ExportError, match="no plans.json"):
        load_fold(str(tmp_path), 0)


# ---- predict-onnx against nnUNetv2_predict -----------------------------------------------------------------
def _write_cases(folder: Path, n=2):
    import SimpleITK as sitk
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (12 + 3 * i, 50, 35)  # z, y, x as SimpleITK arrays
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        blob = np.exp(-((yy - 0.2 * i) ** 2 + xx ** 2 + zz ** 2) * 4)
        image = (300 * blob + 20 * rng.standard_normal(shape)).astype(np.float32)
        itk = sitk.GetImageFromArray(image)
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, str(folder / f"hippo_{i:03d}_0000.nii.gz"))


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.timeout(600)
def test_predict_onnx_matches_nnunetv2_predict(exported, tmp_path):
    from nnunet_lk.env import with_trainer_folder
    folder, onnx_path = exported
    images = tmp_path / "images"
    _write_cases(images)
    stock_out, onnx_out = tmp_path / "stock", tmp_path / "onnx"
    env = dict(os.environ, nnUNet_compile="f", nnUNet_extTrainer=with_trainer_folder(os.environ.get("nnUNet_extTrainer")),
               nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path),
               OMP_NUM_THREADS="1")
    stock = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(images),
                            "-o", str(stock_out), "-m", str(folder), "-f", "0", "-device", "cpu", "-npp", "1",
                            "-nps", "1"], env=env, capture_output=True, text=True, timeout=500)
    assert stock.returncode == 0, stock.stderr[-3000:]
    code = cli_main(["predict-onnx", "-i", str(images), "-o", str(onnx_out), "-m", str(folder),
                     "--onnx", str(onnx_path), "--fold", "0", "-npp", "0", "-nps", "0", "--threads", "1"])
    assert code == 0
    cases = sorted(p.name for p in stock_out.glob("*.nii.gz"))
    assert cases == ["hippo_000.nii.gz", "hippo_001.nii.gz"]
    assert sorted(p.name for p in onnx_out.glob("*.nii.gz")) == cases
    for case in cases:
        a, b = _read_labels(stock_out / case), _read_labels(onnx_out / case)
        assert a.shape == b.shape
        assert (a == b).mean() >= 0.999, f"{case}: {(a != b).sum()} of {a.size} voxels differ"
        assert len(np.unique(a)) >= 2  # a real segmentation, not one constant label

    # every engine of `nnunet-lk predict`, the same label maps; openvino without --onnx exports the fold once
    fold_onnx = folder / "fold_0" / "model.onnx"
    fold_onnx.unlink(missing_ok=True)
    for engine in ("torch", "openvino", "compile"):
        out = tmp_path / engine
        code = cli_main(["predict", "--engine", engine, "-i", str(images), "-o", str(out), "-m", str(folder),
                         "-f", "0", "-npp", "0", "-nps", "0", "--threads", "1"])
        assert code == 0, engine
        for case in cases:
            a, b = _read_labels(stock_out / case), _read_labels(out / case)
            assert (a == b).mean() >= 0.999, f"{engine}, {case}: {(a != b).sum()} of {a.size} voxels differ"
        if engine == "openvino":
            assert fold_onnx.is_file() and fold_onnx.with_suffix(".json").is_file()


def test_predict_onnx_refuses_a_model_with_other_channels(exported, tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.engines import onnx_predictor
    from nnunet_lk.training.trainers import nnUNetTrainerDLKUNetS
    plans = fake_plans()
    pm = PlansManager(plans)
    two_channel = nnUNetTrainerDLKUNetS.build_network_architecture(pm, pm.get_configuration("2d"), 2, 3, True)
    folder = make_model_folder(tmp_path, "nnUNetTrainerDLKUNetS", plans, two_channel)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["channel_names"] = {"0": "T1", "1": "T2"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ExportError, match="takes 1 input channels but .* expects 2"):
        onnx_predictor(str(folder), str(exported[1]), 0)


def test_predict_onnx_refuses_non_finite_inputs_naming_case_and_count(exported, tmp_path):
    # NRRD keeps NaN (SimpleITK reads NaN in NIfTI as 0); nnU-Net's own predictor would write an all-background
    # segmentation for such a case with exit status 0
    import SimpleITK as sitk
    from tests.helpers.realdata import BIN, run
    folder = _copy_folder(exported[0], tmp_path / "model")
    dataset = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset, "file_ending": ".nrrd"}))
    images = tmp_path / "images"
    images.mkdir()
    for case, bad in (("clean", []), ("broken", [float("nan")] * 7 + [float("inf")] * 3)):
        array = np.random.default_rng(0).standard_normal((6, 50, 35)).astype(np.float32)
        array.reshape(-1)[:len(bad)] = bad
        sitk.WriteImage(sitk.GetImageFromArray(array), str(images / f"{case}_0000.nrrd"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.nrrd").write_bytes(b"a prediction written before")
    proc = run([BIN / "nnunet-lk", "predict-onnx", "-i", images, "-o", out, "-m", folder, "--onnx", exported[1],
                "-f", "0", "-npp", "0", "-nps", "0", "--threads", "1"], env=dict(os.environ), timeout=600, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 input cases" in proc.stderr
    assert "broken: broken_0000.nrrd has 10 of 10,500 voxels NaN/Inf" in proc.stderr and "clean:" not in proc.stderr
    assert "Nothing was predicted" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["earlier.nrrd"]
    assert (out / "earlier.nrrd").read_bytes() == b"a prediction written before"


def _hippocampus_cases(folder: Path, n: int) -> Path:
    from tests.helpers.realdata import SHARED_DATA
    folder.mkdir()
    for image in sorted((SHARED_DATA / "Dataset004_Hippocampus" / "imagesTr").glob("*_0000.nii.gz"))[:n]:
        (folder / image.name).symlink_to(image)
    return folder


def test_predict_onnx_leaves_out_damaged_cases_and_predicts_the_others(exported, tmp_path):
    from tests.helpers.realdata import BIN, run
    images = _hippocampus_cases(tmp_path / "images", 3)
    damaged = sorted(images.iterdir())[1]
    data = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(data[: len(data) // 2])  # SimpleITK would read it without an error
    out = tmp_path / "out"
    proc = run([BIN / "nnunet-lk", "predict-onnx", "-i", images, "-o", out, "-m", exported[0], "--onnx", exported[1],
                "-f", "0", "-npp", "0", "-nps", "0", "--threads", "1"], env=dict(os.environ), timeout=600, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    case = damaged.name[:-len("_0000.nii.gz")]
    assert f"1 input case(s) in {images} are damaged and were not predicted ({case}: {damaged.name} is truncated" \
        in proc.stderr
    assert "the other 2 case(s) are in" in proc.stderr
    predicted = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(predicted) == 2 and f"{case}.nii.gz" not in predicted


def test_one_ctrl_c_ends_predict_onnx_with_no_worker_left(exported, tmp_path):
    from nnunet_lk.file_integrity import damage
    from tests.helpers.realdata import BIN, interrupt_after_first_output
    images = _hippocampus_cases(tmp_path / "images", 30)
    out = tmp_path / "out"
    cmd = [BIN / "nnunet-lk", "predict-onnx", "-i", images, "-o", out, "-m", exported[0], "--onnx", exported[1],
           "-f", "0", "-npp", "2", "-nps", "2", "--threads", "1"]
    ended = interrupt_after_first_output(cmd, dict(os.environ), out)
    assert not ended["finished_before_interrupt"]
    assert ended["returncode"] == 130, ended["stderr"][-3000:]
    assert ended["seconds"] < 15 and ended["left"] == []
    assert "nnunet-lk predict-onnx interrupted" in ended["stderr"]
    assert 0 < len(ended["outputs"]) < 30 and all(damage(str(out / name)) is None for name in ended["outputs"])


# ---- stock nnU-Net (slow) ----------------------------------------------------------------------------------
def _stock_2d_model_folder(tmp_path):
    """A model folder of stock nnU-Net's own 2D network (PlainConvUNet) on the Hippocampus plans, narrowed."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads((Path(__file__).parent / "fixtures" / "hippocampus_plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 8, 8]
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True)
    return make_model_folder(tmp_path, "nnUNetTrainer", plans, net)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stock_nnunet_model_exports(tmp_path, capsys):
    folder = _stock_2d_model_folder(tmp_path)
    out = tmp_path / "stock.onnx"
    assert cli_main(["export", str(folder), "-f", "0", "-o", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    info = json.loads(Path(sidecar_path(str(out))).read_text())
    assert info["size_multiple"] == [8, 8] and info["trainer"] == "nnUNetTrainer"
    # checked on the patch and a smaller multiple of the total stride: stock nnU-Net runs on nothing else
    assert info["check"]["shapes"][1] == [1, 1, 24, 16]
    _check_exported(load_fold(str(folder), 0).network, str(out), 1, 2, other=(24, 16))


def test_checkpoint_and_step_flags_follow_nnunet_and_old_spellings_still_work(capsys):
    from nnunet_lk.cli.main import build_parser
    parser = build_parser()
    args = parser.parse_args(["export", "model", "-f", "0", "-o", "x.onnx", "-chk", "checkpoint_best.pth"])
    assert args.checkpoint == "checkpoint_best.pth" and capsys.readouterr().err == ""
    args = parser.parse_args(["export", "model", "-f", "0", "-o", "x.onnx", "-c", "checkpoint_latest.pth"])
    assert args.checkpoint == "checkpoint_latest.pth"
    assert "-c is deprecated" in capsys.readouterr().err
    args = parser.parse_args(["predict-onnx", "-i", "a", "-o", "b", "-m", "m", "--onnx", "x.onnx", "-f", "0",
                              "-step_size", "0.75", "-chk", "checkpoint_best.pth"])
    assert (args.step_size, args.checkpoint) == (0.75, "checkpoint_best.pth")
    args = parser.parse_args(["predict-onnx", "-i", "a", "-o", "b", "-m", "m", "--onnx", "x.onnx", "-f", "0",
                              "--step_size", "1"])
    assert args.step_size == 1.0 and "--step_size is deprecated" in capsys.readouterr().err


def test_the_cached_fold_export_is_made_again_only_when_outdated(tmp_path, monkeypatch):
    """fold_F/model.onnx, which the engines and quantize export on first use, is exported again when the fold's
    checkpoint has changed (a new training) or an older nnunet-lk made it; otherwise it is reused, and a model
    without our sidecar is taken as it is."""
    from nnunet_lk import export
    folder = _stock_2d_model_folder(tmp_path)
    model, sidecar = folder / "fold_0" / "model.onnx", folder / "fold_0" / "model.json"
    logs = []
    assert export.fold_export(str(folder), 0, "checkpoint_final.pth", "a test", log=logs.append) == str(model)
    assert "(a test; once; later runs reuse it)" in logs[0] and model.is_file()
    assert json.loads(sidecar.read_text())["export_revision"] == export.EXPORT_REVISION

    exports = []  # from here on, record what would be exported again
    monkeypatch.setattr(export, "export_model_folder", lambda *args, **kwargs: exports.append(args))

    def exported_again_because():
        logs.clear()
        export.fold_export(str(folder), 0, "checkpoint_final.pth", "a test", log=logs.append)
        assert len(exports) == len(logs) and all(m.startswith("exporting fold 0") for m in logs)
        exports.clear()
        return logs[0] if logs else None

    assert exported_again_because() is None  # reused
    os.utime(folder / "fold_0" / "checkpoint_final.pth", ns=(0, 0))  # a new training wrote the checkpoint again
    assert "made from another checkpoint_final.pth than the one there now" in exported_again_because()
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "export_revision": export.EXPORT_REVISION - 1}))
    assert (f"older nnunet-lk (export revision {export.EXPORT_REVISION - 1}, now {export.EXPORT_REVISION})"
            in exported_again_because())
    sidecar.unlink()
    assert exported_again_because() is None  # not ours to replace
