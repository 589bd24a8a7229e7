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
from nnunet_lk.hints import channel_hint, checkpoint_hint
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


def _predict(results: Path, cases: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(results), nnUNet_preprocessed=str(results),
               nnUNet_compile="f")
    cmd = [str(PREDICT), "-i", str(cases), "-o", str(out), "-d", "4", "-c", "2d", "-f", "0",
           "-tr", "nnUNetTrainerDLKUNetS", "-device", "cpu", "--disable_progress_bar", *extra]
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
