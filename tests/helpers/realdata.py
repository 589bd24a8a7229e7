"""Helpers for the real-data end-to-end tests: subsets of ../shared/data linked (never copied) into a
temporary nnU-Net tree, and the stock nnU-Net CLIs run as a user would run them."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

from nnunet_lk import settings

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("NNUNET_LK_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent


def make_subset(source_name: str, target_root: Path, n_train: int, n_test: int, seed: int = 0):
    """Link ``n_train`` cases of a shared raw dataset into ``target_root/raw`` (same dataset name and id)
    and ``n_test`` other cases into ``target_root/new_cases`` (images) and ``target_root/new_cases_gt``."""
    source = SHARED_DATA / source_name
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found; the real-data tests need ../shared/data beside the repo "
                                f"(or NNUNET_LK_SHARED_DATA)")
    meta = json.loads((source / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[:-len(ending)] for p in (source / "labelsTr").iterdir() if p.name.endswith(ending))
    rng = random.Random(seed)
    rng.shuffle(cases)
    train, test = sorted(cases[:n_train]), sorted(cases[n_train:n_train + n_test])
    raw = target_root / "raw" / source_name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)

    def channel_files(case):  # natural images keep all RGB channels in one _0000 file
        return sorted(p.name for p in (source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))

    for case in train:
        (raw / "labelsTr" / f"{case}{ending}").symlink_to(source / "labelsTr" / f"{case}{ending}")
        for name in channel_files(case):
            (raw / "imagesTr" / name).symlink_to(source / "imagesTr" / name)
    (raw / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(train)}, indent=2))
    images, gt = target_root / "new_cases", target_root / "new_cases_gt"
    images.mkdir(exist_ok=True)
    gt.mkdir(exist_ok=True)
    for case in test:
        (gt / f"{case}{ending}").symlink_to(source / "labelsTr" / f"{case}{ending}")
        for name in channel_files(case):
            (images / name).symlink_to(source / "imagesTr" / name)
    return train, test


def nnunet_env(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "f",
        "nnUNet_def_n_proc": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=1800, check=True) -> subprocess.CompletedProcess:
    """Run a CLI in a session of its own; on timeout or failure the whole process group is killed, so
    nnU-Net's data-loader workers and predictor children never outlive a failed test. On failure the
    assertion message carries the end of its output."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # timeout, Ctrl-C, a pytest-timeout interrupt
        kill_group(proc)
        raise
    kill_group(proc)  # the leader has exited; workers it left behind have not
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout ---\n"
                             f"{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session (it was started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def prepared_subset(root: Path, source_name: str, configuration: str, n_train: int, n_test: int, plans_args,
                    seed: int = 0) -> dict:
    """A linked subset, nnUNetv2_plan_and_preprocess for one configuration, then `nnunet-lk plans` with
    ``plans_args`` (a CPU-sized derived plans file). Returns the nnU-Net environment."""
    make_subset(source_name, root, n_train=n_train, n_test=n_test, seed=seed)
    env = nnunet_env(root)
    dataset_id = str(int(source_name[len("Dataset"):len("Dataset") + 3]))
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", configuration, "-np", "2", "-npfp", "2"], env)
    run(["nnunet-lk", "plans", "-d", dataset_id, "-c", configuration, *plans_args], env)
    return env


def train_env(root: Path, epochs: int, iterations: int, val_iterations: int = 2, **extra) -> dict:
    # nnUNet_n_proc_DA only for training: exported during planning it crashes nnU-Net's VRAM estimate.
    # The validation that ends nnUNetv2_train runs without mirroring (the tests evaluate nnUNetv2_predict's
    # output on held-back cases, not that validation): ~18 s a case in 3D here otherwise.
    # Seeded, with one augmentation worker: a given machine and torch train the same net every time, so a
    # floor failure is a change in behaviour, not an unlucky draw. One thread: the other pytest-xdist worker keeps
    # the second core busy, and a thread on a busy core stalls every parallel op (a 3D epoch took 110-166 s at
    # two threads while the other worker ran, 46 s once it was done).
    return nnunet_env(root, nnUNet_n_proc_DA=1, **{settings.EPOCHS: epochs, settings.ITERATIONS: iterations,
                                                   settings.VAL_ITERATIONS: val_iterations, settings.VAL_MIRRORING: 0,
                                                   settings.SEED: 0, settings.THREADS: 1},
                      **extra)


def foreground_dice(summary_json: Path) -> float:
    """Mean Dice over foreground classes from nnUNetv2_evaluate_folder's summary.json."""
    summary = json.loads(summary_json.read_text())
    return float(summary["foreground_mean"]["Dice"])


LOSS_LINE = re.compile(r"Loss weights \((\w+) schedule, epoch (\d+) of (\d+)\): dice ([0-9.]+), ce ([0-9.]+)")


def logged_loss_weights(fold_dir: Path) -> dict:
    """epoch -> (dice, ce) from every training log in a fold folder (later logs win)."""
    weights = {}
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        for m in LOSS_LINE.finditer(log.read_text()):
            weights[int(m.group(2))] = (float(m.group(4)), float(m.group(5)), int(m.group(3)))
    return weights


def interrupt_after_first_output(cmd, env, out: Path, pattern: str = "*.nii.gz", timeout: float = 300,
                                 grace: float = 30) -> dict:
    """Run a prediction in a session of its own, send SIGINT to the whole session (as a terminal's Ctrl-C
    reaches every process of the foreground group) once the first output file appears, and report how it
    ended: return code (None: still running after ``grace`` s), seconds to exit, processes left in the
    session, outputs, stderr."""
    import time
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not list(out.glob(pattern)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        finished_first = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGINT)
        start = time.time()
        try:
            _, stderr = proc.communicate(timeout=grace)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode, stderr = None, ""
        seconds = time.time() - start
        for _ in range(50):  # multiprocessing's resource tracker exits once the last of us has closed its pipe
            left = subprocess.run(["pgrep", "-a", "-s", str(proc.pid)], capture_output=True, text=True).stdout
            left = left.strip().splitlines()
            if not left:
                break
            time.sleep(0.1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return {"returncode": returncode, "seconds": seconds, "left": left, "stderr": stderr,
            "finished_before_interrupt": finished_first, "outputs": sorted(p.name for p in out.glob(pattern))}


def assert_predictor_uses_fused_kernels(model: Path, cases: Path, env: dict) -> None:
    """nnUNetv2_predict's own predictor (built statically, strict load, .eval()): every re-parameterisable
    block must run on its single fused kernel, and the state dict must be the checkpoint's."""
    code = (
        "import sys, torch\n"
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
        "from nnunet_lk.blocks.reparam import ReparamDepthwise\n"
        "p = nnUNetPredictor(device=torch.device('cpu'), use_mirroring=False, verbose=False)\n"
        "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,), checkpoint_name='checkpoint_final.pth')\n"
        "blocks = [m for m in p.network.modules() if isinstance(m, ReparamDepthwise)]\n"
        "import glob, os\n"
        "case = sorted(glob.glob(os.path.join(sys.argv[2], '*_0000.*')))[0]\n"
        "import tempfile\n"
        "p.predict_from_files_sequential([[case]], tempfile.mkdtemp(), False, True, None)\n"
        "ck = torch.load(os.path.join(sys.argv[1], 'fold_0', 'checkpoint_final.pth'), weights_only=False)\n"
        "assert set(p.network.state_dict()) == set(ck['network_weights'])\n"
        "print('REPARAM', len(blocks), sum(b.is_fused for b in blocks))\n")
    proc = run([sys.executable, "-c", code, model, cases], env)
    n_blocks, n_fused = map(int, re.search(r"REPARAM (\d+) (\d+)", proc.stdout).groups())
    assert n_blocks > 0 and n_fused == n_blocks
