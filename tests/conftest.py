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


# The longest test files (minutes each), run first: with `-n 2 --dist loadfile` one worker takes the longest file
# while the other works through the rest, instead of the longest starting last. xdist keeps this order only
# with --no-loadscope-reorder (setup.cfg): by default it sorts the files by their number of tests.
LONGEST_FIRST = ("test_e2e_realdata.py", "test_e2e_realdata_3d.py", "test_e2e_ablate.py", "test_ablate_executors.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every `full` test is also `slow`, so the quick check (`-m "not slow"`) never runs a heavy one. Runs
    before pytest's own -m selection (tryfirst). `full` tests are left out by the default `-m "not full"`
    (setup.cfg) and chosen with `-m full`. The longest files go first (a stable sort keeps each file's order)."""
    for item in items:
        if "full" in item.keywords and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def trained_fold(tmp_path_factory):
    """``trained_fold(run)`` → TrainedFold: each real-data subset is prepared once and each Run (a fold of one
    trainer on it) trained, predicted and evaluated once per session, whichever tests ask for it."""
    from tests.helpers.trained import SUBSETS, prepare, train_and_evaluate
    subsets, folds = {}, {}

    def once(cache, key, make):  # a failure is cached too: every test that needs it fails, none redoes it
        if key not in cache:
            try:
                cache[key] = make()
            except Exception as error:
                cache[key] = error
        if isinstance(cache[key], Exception):
            raise cache[key]
        return cache[key]

    def get(run):
        def prepared():
            root = tmp_path_factory.mktemp(run.subset)
            return root, prepare(SUBSETS[run.subset], root)
        root, env = once(subsets, run.subset, prepared)
        return once(folds, run, lambda: train_and_evaluate(run, root, env))
    return get
