"""Truncated and corrupt input images (nnunet_lk.file_integrity.py), on real Hippocampus files: SimpleITK
reads each of these damaged files without an error, so nnU-Net would segment them."""
import gzip
import shutil

import pytest

from nnunet_lk.file_integrity import damage, damaged_cases, damaged_files
from tests.helpers.realdata import SHARED_DATA

IMAGES = SHARED_DATA / "Dataset004_Hippocampus" / "imagesTr"


@pytest.fixture
def folder(tmp_path):
    for case in ("hippocampus_001", "hippocampus_003", "hippocampus_007"):
        shutil.copy(IMAGES / f"{case}_0000.nii.gz", tmp_path / f"{case}_0000.nii.gz")
    return tmp_path


def _truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_intact_files_pass_both_checks(folder):
    assert damaged_files(str(folder), full=False) == {}
    assert damaged_files(str(folder), full=True) == {}
    (folder / "hippocampus_001_0000.nii").write_bytes(gzip.decompress((folder / "hippocampus_001_0000.nii.gz")
                                                                      .read_bytes()))
    assert damage(str(folder / "hippocampus_001_0000.nii")) is None


def test_a_truncated_nifti_gz_is_found_by_the_structural_check(folder):
    import SimpleITK as sitk
    path = folder / "hippocampus_003_0000.nii.gz"
    _truncate(path)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # what nnU-Net's reader does: no error
    assert (image == 0).mean() > 0.4
    for full in (False, True):
        found = damaged_files(str(folder), full=full)
        assert list(found) == [path.name]
        assert found[path.name].startswith("truncated: its gzip stream ends before the end-of-stream marker")


def test_a_truncated_uncompressed_nifti_names_its_bytes(folder):
    path = folder / "hippocampus_001_0000.nii"
    data = gzip.decompress((folder / "hippocampus_001_0000.nii.gz").read_bytes())
    path.write_bytes(data[:-1000])
    assert damage(str(path), full=False) == f"truncated: {len(data) - 1000:,} of the {len(data):,} bytes its header " \
                                            f"declares"


def test_a_flipped_byte_is_found_by_the_full_check_only(folder):
    path = folder / "hippocampus_007_0000.nii.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert damage(str(path), full=False) is None  # header and trailer intact
    assert damage(str(path), full=True).startswith("corrupt:")


def test_a_file_of_several_gzip_members_is_not_reported(folder):
    """Concatenated members are valid gzip (the trailer holds only the last member's length): the structural
    check's suspicion is confirmed or dismissed by decompressing."""
    path = folder / "hippocampus_001_0000.nii.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert damage(str(path), full=False) is None and damage(str(path), full=True) is None


def test_a_cut_header_and_cases_by_channel(folder):
    _truncate(folder / "hippocampus_001_0000.nii.gz", 0.001)
    (folder / "hippocampus_001_0001.nii.gz").write_bytes((folder / "hippocampus_003_0000.nii.gz").read_bytes())
    found = damaged_cases(str(folder), ".nii.gz")
    assert list(found) == ["hippocampus_001"] and list(found["hippocampus_001"]) == ["hippocampus_001_0000.nii.gz"]
    assert "header cannot be read" in found["hippocampus_001"]["hippocampus_001_0000.nii.gz"]
