import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def hippocampus_plans() -> dict:
    """nnU-Net 2.8.1's plans for Dataset004_Hippocampus (2d: 56x40, 3d_fullres: 40x56x40, 4 stages)."""
    return json.loads((FIXTURES / "hippocampus_plans.json").read_text())


@pytest.fixture
def hippocampus_dataset_json() -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "numTraining": 208, "file_ending": ".nii.gz"}


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    """nnU-Net's three folders in a temporary directory (nnU-Net reads them lazily)."""
    dirs = {name: tmp_path / name for name in ("raw", "preprocessed", "results")}
    for name, path in dirs.items():
        path.mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(path))
    monkeypatch.setenv("nnUNet_compile", "f")
    return dirs


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Unit tests run tiny networks: one thread avoids oversubscribing a shared 2-core machine (the
    end-to-end tests run nnU-Net in subprocesses with its own thread settings)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FULL_TESTS = "NNUNET_LK_FULL_TESTS"


def pytest_collection_modifyitems(config, items):
    """Tests marked `full` (too heavy for CI on a 2-core CPU: 3D exports, real-data runs of backbones that
    learn slowly at a CPU budget) run only with NNUNET_LK_FULL_TESTS=1; CI and `pytest` skip them."""
    import os
    if os.environ.get(FULL_TESTS) == "1":
        return
    skip = pytest.mark.skip(reason=f"heavy test: set {FULL_TESTS}=1 to run it")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)
