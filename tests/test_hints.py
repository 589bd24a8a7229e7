"""Diagnoses printed under the stock nnUNetv2_predict's own traceback (``nnunet_lk/hints.py``, installed at
start-up by the .pth hook): a truncated or foreign checkpoint, input cases with other channels than the
model's. Real CLI, a fake model folder (tiny DLKUNet-S in nnU-Net's checkpoint format), real Hippocampus
images; in every case the error names the problem and the fix, and nothing already written is lost."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.modelfolder import dlkunet_s_network, fake_plans, make_model_folder
from nnunet_lk.hints import channel_hint, checkpoint_hint, no_gpu_hint
from tests.helpers.realdata import SHARED_DATA

HIPPOCAMPUS = SHARED_DATA / "Dataset004_Hippocampus" / "imagesTr"
PREDICT = Path(sys.executable).parent / "nnUNetv2_predict"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    plans = fake_plans()
    return root, make_model_folder(root, "nnUNetTrainerDLKUNetS", plans, dlkunet_s_network(plans))


def _cases(folder: Path, n: int = 2, channels: int = 1) -> Path:
    folder.mkdir()
    for image in sorted(HIPPOCAMPUS.glob("*_0000.nii.gz"))[:n]:
        for c in range(channels):  # extra channels: the same image again, as a second modality would be
            (folder / image.name.replace("_0000", f"_{c:04d}")).symlink_to(image)
    return folder


def _predict(results: Path, cases: Path, out: Path, *extra, device=("-device", "cpu")) -> subprocess.CompletedProcess:
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(results), nnUNet_preprocessed=str(results),
               nnUNet_compile="f")
    cmd = [str(PREDICT), "-i", str(cases), "-o", str(out), "-d", "4", "-c", "2d", "-f", "0",
           "-tr", "nnUNetTrainerDLKUNetS", *device, "--disable_progress_bar", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _previous_output(out: Path) -> Path:
    out.mkdir()
    kept = out / "earlier_case.nii.gz"
    kept.write_bytes(b"a prediction written before")
    return kept


def test_stock_predict_works_on_the_fake_model(model, tmp_path):
    results, _ = model
    proc = _predict(results, _cases(tmp_path / "in"), tmp_path / "out", "-npp", "1", "-nps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2
    assert "nnunet-lk:" not in proc.stderr


def _copy_results(model, tmp_path) -> Path:
    import shutil
    results = tmp_path / "results"
    shutil.copytree(model[0], results)
    return results


@pytest.mark.parametrize("damage,message,others", [
    ("truncated", "truncated or not a torch file", []),
    ("foreign", "is not an nnU-Net checkpoint", []),
    ("truncated", "truncated or not a torch file", ["checkpoint_best.pth"]),  # a finished fold: final and best
])
def test_damaged_checkpoint_is_named_with_the_fix(model, tmp_path, damage, message, others):
    results = _copy_results(model, tmp_path)
    checkpoint = next(results.rglob("checkpoint_final.pth"))
    for name in others:
        (checkpoint.parent / name).write_bytes(checkpoint.read_bytes())
    if damage == "truncated":
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"state_dict": {}}, checkpoint)
    before = checkpoint.read_bytes()
    kept = _previous_output(tmp_path / "out")
    proc = _predict(results, _cases(tmp_path / "in"), tmp_path / "out")
    assert proc.returncode != 0
    hint = proc.stderr[proc.stderr.index("nnunet-lk:"):]
    assert str(checkpoint) in hint and message in hint
    assert "checkpoint_latest" not in hint  # a finished fold has none: only files that exist are suggested
    if others:
        assert "-chk checkpoint_best.pth" in hint and "--c` then continues from checkpoint_best.pth" in hint
    else:
        assert "holds no other checkpoint" in hint and "checkpoint_best" not in hint and "-chk" not in hint
    assert checkpoint.read_bytes() == before and kept.read_bytes() == b"a prediction written before"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["earlier_case.nii.gz"]


@pytest.mark.parametrize("trainer_name,fix", [
    ("nnUNetTrainerFromAnotherPackage", "install the package that defines nnUNetTrainerFromAnotherPackage"),
    ("nnUNetTrainerDLKUNetSS", "close nnunet-lk trainers: nnUNetTrainerDLKUNetS"),  # a mistyped/renamed class
])
def test_unknown_trainer_named_by_the_checkpoint(model, tmp_path, trainer_name, fix):
    from tests.helpers.modelfolder import save_checkpoint
    results = _copy_results(model, tmp_path)
    checkpoint = next(results.rglob("checkpoint_final.pth"))
    plans = fake_plans()
    save_checkpoint(checkpoint, dlkunet_s_network(plans), plans, trainer_name)
    kept = _previous_output(tmp_path / "out")
    proc = _predict(results, _cases(tmp_path / "in"), tmp_path / "out")  # -tr names the folder's trainer
    assert proc.returncode != 0
    hint = proc.stderr[proc.stderr.index("nnunet-lk:"):]
    assert f"{checkpoint} names the trainer {trainer_name!r} (its 'trainer_name' entry)" in hint
    assert fix in hint and "set the checkpoint's 'trainer_name'" in hint
    assert "env --install" not in hint and "found no trainer named" not in hint  # the -tr advice cannot help
    assert kept.read_bytes() == b"a prediction written before"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["earlier_case.nii.gz"]


@pytest.mark.parametrize("channels", [2])
def test_input_with_other_channels_is_named_with_the_fix(model, tmp_path, channels):
    results, _ = model
    kept = _previous_output(tmp_path / "out")
    proc = _predict(results, _cases(tmp_path / "in", channels=channels), tmp_path / "out", "-npp", "1", "-nps", "1")
    assert proc.returncode != 0
    hint = proc.stderr[proc.stderr.index("nnunet-lk:"):]
    assert "expects channels [0] (0000=MRI)" in hint and "2 of 2 cases differ" in hint and "[0, 1]" in hint
    assert "Fix:" in hint
    assert kept.read_bytes() == b"a prediction written before"
    assert not list((tmp_path / "out").glob("hippocampus_*.nii.gz"))


def test_predict_without_the_plans_it_was_trained_with_names_them(model, tmp_path):
    """The walk-through's CPU path trains on derived plans (-p nnUNetPlans_cpu); predicting without -p looks
    for TRAINER__nnUNetPlans__2d, which does not exist."""
    results = _copy_results(model, tmp_path)
    folder = next(results.glob("Dataset004_Hippocampus/nnUNetTrainerDLKUNetS__*__2d"))
    folder.rename(folder.with_name("nnUNetTrainerDLKUNetS__nnUNetPlans_cpu__2d"))
    kept = _previous_output(tmp_path / "out")
    proc = _predict(results, _cases(tmp_path / "in"), tmp_path / "out")
    assert proc.returncode != 0 and "FileNotFoundError" in proc.stderr
    hint = proc.stderr[proc.stderr.index("nnunet-lk:"):]
    assert "no trained model nnUNetTrainerDLKUNetS__nnUNetPlans__2d" in hint
    assert "Trained models there: nnUNetTrainerDLKUNetS__nnUNetPlans_cpu__2d" in hint
    assert "Fix: add -p nnUNetPlans_cpu" in hint
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["earlier_case.nii.gz"]
    assert kept.read_bytes() == b"a prediction written before"
    proc = _predict(results, tmp_path / "in", tmp_path / "out", "-p", "nnUNetPlans_cpu", "-npp", "0", "-nps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]  # the fix the hint names works


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_predict_on_its_default_device_without_a_gpu_says_add_device_cpu(model, tmp_path):
    results, _ = model
    kept = _previous_output(tmp_path / "out")
    proc = _predict(results, _cases(tmp_path / "in"), tmp_path / "out", "-npp", "0", "-nps", "0", device=())
    assert proc.returncode != 0
    hint = proc.stderr[proc.stderr.index("nnunet-lk:"):]
    assert "no CUDA GPU can be used here" in hint and "Fix: add -device cpu" in hint
    assert "--disable_tta" in hint  # nnUNetv2_predict: the CPU speed tips too
    assert kept.read_bytes() == b"a prediction written before"


def test_stock_predict_warns_about_a_truncated_input_at_start_up(model, tmp_path):
    """SimpleITK reads a .nii.gz cut to half its bytes without an error (half the voxels zero), and
    nnUNetv2_predict segments it and exits 0; the start-up hook names the file before it starts."""
    results, _ = model
    cases = _cases(tmp_path / "in")
    damaged = sorted(cases.iterdir())[0]
    data = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(data[: len(data) // 2])
    proc = _predict(results, cases, tmp_path / "out", "-npp", "0", "-nps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]  # nnU-Net's own behaviour: it does not notice
    warning = proc.stderr[proc.stderr.index("nnunet-lk: warning:"):]
    assert f"1 input file(s) in {cases} are damaged ({damaged.name}: truncated" in warning
    assert "gzip -t" in warning and "predict-onnx" in warning


def test_one_ctrl_c_ends_stock_predict_with_no_worker_left(model, tmp_path):
    """nnU-Net's export pool hangs on Ctrl-C (a worker dies holding the task queue's lock); the start-up hook
    makes the first Ctrl-C end nnUNetv2_predict (default -npp 3 -nps 3), keeping every complete output, and
    --continue_prediction then predicts the rest."""
    from nnunet_lk.file_integrity import damage
    from tests.helpers.realdata import interrupt_after_first_output
    results, _ = model
    cases = _cases(tmp_path / "in", n=12)
    kept = _previous_output(tmp_path / "out")
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(results), nnUNet_preprocessed=str(results),
               nnUNet_compile="f")
    cmd = [PREDICT, "-i", cases, "-o", tmp_path / "out", "-d", "4", "-c", "2d", "-f", "0", "-tr",
           "nnUNetTrainerDLKUNetS", "-device", "cpu", "--disable_progress_bar"]
    ended = interrupt_after_first_output(cmd, env, tmp_path / "out", pattern="hippocampus_*.nii.gz")
    assert not ended["finished_before_interrupt"]
    assert ended["returncode"] == 130, ended["stderr"][-3000:]
    assert ended["seconds"] < 15 and ended["left"] == []
    assert "nnUNetv2_predict interrupted: stopped" in ended["stderr"] and "--continue_prediction" in ended["stderr"]
    written = [tmp_path / "out" / name for name in ended["outputs"]]
    assert 0 < len(written) < 12 and all(damage(str(p)) is None for p in written)
    assert kept.read_bytes() == b"a prediction written before"
    proc = _predict(results, cases, tmp_path / "out", "--continue_prediction", "--disable_tta", "-npp", "0", "-nps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("hippocampus_*.nii.gz"))) == 12


# ---- the diagnoses on their own (no subprocess) -------------------------------------------------------------
class _Predictor:
    def __init__(self, channel_names):
        self.dataset_json = {"channel_names": channel_names, "file_ending": ".nii.gz"}


def test_channel_hint_reads_folder_and_lists(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    two = _Predictor({"0": "T1", "1": "T2"})
    assert channel_hint({"predict_from_files": {"self": two, "list_of_lists_or_source_folder": str(tmp_path)}}) is None
    one = _Predictor({"0": "T1"})
    hint = channel_hint({"predict_from_files": {"self": one, "list_of_lists_or_source_folder": str(tmp_path)}})
    assert "2 of 2 cases differ" in hint and "a has [0, 1]" in hint
    lists = [[str(tmp_path / "a_0000.nii.gz")]]
    hint = channel_hint({"predict_from_files_sequential": {"self": two, "list_of_lists_or_source_folder": lists}})
    assert "1 of 1 cases differ (a has [0])" in hint and "expects channels [0, 1] (0000=T1, 0001=T2)" in hint
    assert channel_hint({"some_other_function": {}}) is None


def test_checkpoint_hint_only_for_bad_checkpoints(model, tmp_path):
    _, folder = model
    frame = {"initialize_from_trained_model_folder": {"model_training_output_dir": str(folder), "f": 0,
                                                      "checkpoint_name": "checkpoint_final.pth"}}
    assert checkpoint_hint(frame) is None  # a good checkpoint: the failure is elsewhere, say nothing
    frame["initialize_from_trained_model_folder"]["checkpoint_name"] = "checkpoint_best.pth"
    hint = checkpoint_hint(frame)
    assert "does not exist" in hint and "checkpoint_final.pth" in hint


def test_no_gpu_hint_names_the_program_and_only_fires_without_a_gpu(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nnUNetv2_train", "4", "2d", "0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hint = no_gpu_hint(RuntimeError("Found no NVIDIA driver on your system. Please check ..."))
    assert "nnUNetv2_train runs on CUDA unless told otherwise. Fix: add -device cpu." in hint
    assert "--disable_tta" not in hint  # prediction tips only for prediction
    assert no_gpu_hint(RuntimeError("something else")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU that fails otherwise: not this hint
    assert no_gpu_hint(RuntimeError("Found no NVIDIA driver on your system.")) is None
