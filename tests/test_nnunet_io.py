"""nnunet_io: the case files of an input folder, grouped as nnU-Net groups them."""
from nnunet_lk.nnunet_io import cases_in_folder, channel_files


def test_channel_files_groups_cases_and_orders_channels(tmp_path):
    for name in ("b_0000.nii.gz", "a_0001.nii.gz", "a_0000.nii.gz", "a_0002.png", "notes.txt", "c_000.nii.gz",
                 "with_underscore_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    found = channel_files(str(tmp_path), ".nii.gz")
    assert list(found) == ["a", "b", "with_underscore"]
    assert [channel for channel, _ in found["a"]] == [0, 1]
    assert found["a"][1][1] == str(tmp_path / "a_0001.nii.gz")
    assert cases_in_folder(str(tmp_path), ".nii.gz")["a"] == [str(tmp_path / "a_0000.nii.gz"),
                                                              str(tmp_path / "a_0001.nii.gz")]
