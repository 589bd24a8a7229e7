"""What an interrupted prediction keeps (nnunet_lk/interrupt.py): the real SIGINT runs are in
tests/test_hints.py (stock nnUNetv2_predict) and tests/test_export.py (predict-onnx); here, which files the
clean-up removes."""
import shutil

from nnunet_lk.interrupt import _snapshot, remove_incomplete_outputs
from tests.helpers.realdata import SHARED_DATA

IMAGE = SHARED_DATA / "Dataset004_Hippocampus" / "imagesTr" / "hippocampus_001_0000.nii.gz"


def test_only_files_this_run_left_half_written_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "earlier_case.nii.gz"
    earlier.write_bytes(b"not an image, but written before this run")  # never touched, damaged or not
    before = _snapshot(str(out))
    complete, partial = out / "case_a.nii.gz", out / "case_b.nii.gz"
    shutil.copy(IMAGE, complete)
    data = IMAGE.read_bytes()
    partial.write_bytes(data[: len(data) // 3])
    (out / "plans.json").write_text("{}")  # nnU-Net's copy of the plans: not an output
    kept, removed = remove_incomplete_outputs(str(out), before)
    assert kept == ["case_a.nii.gz"] and removed == ["case_b.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "earlier_case.nii.gz", "plans.json"]
    assert earlier.read_bytes() == b"not an image, but written before this run"


def test_a_file_overwritten_by_this_run_counts_as_written_by_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    case = out / "case_a.nii.gz"
    shutil.copy(IMAGE, case)
    before = _snapshot(str(out))
    data = IMAGE.read_bytes()
    case.write_bytes(data[: len(data) // 2])  # the run started to overwrite it, then was interrupted
    assert remove_incomplete_outputs(str(out), before) == ([], ["case_a.nii.gz"])
    assert remove_incomplete_outputs(str(tmp_path / "missing"), {}) == ([], [])
