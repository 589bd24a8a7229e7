"""`nnunet-lk ablate --run --executor {local,slurm}` (issue 14) on real data and, for slurm, a real scheduler: a
single-node SLURM cluster with accounting started on localhost (tests/helpers/slurm.py), to which the CLI
submits through submitit exactly as on a cluster.

Two tiny (trainer, fold) jobs of a 5-case Hippocampus subset (1 epoch x 2 iterations, one validation case):
- slurm: --dry-run prints the sbatch script submitit then writes; --no-wait submits one job array and a second
  call submits nothing; one job is killed with scancel, the other gets SLURM's time-limit signal and is requeued
  by submitit (--requeue); the next call reports the killed one with its log, resubmits it, waits (showing
  progress) and writes the report; the requeued one resumed with --c; a last call submits nothing.
- local: two CPU trainings at once (their logs' time stamps overlap), then a second call trains nothing.
- --dry-run without a scheduler or training (fast): the jobs, commands and sbatch script; nothing submitted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.realdata import BIN, prepared_subset, run
from tests.helpers.slurm import slurm_available, start_local_slurm
from nnunet_lk import settings

STOCK, LGMS = "nnUNetTrainerStockBudget", "nnUNetTrainerLGMSNet"
TRAINERS = [STOCK, LGMS]
DATASET = "Dataset004_Hippocampus"


def ablate(out, *extra):
    return ["nnunet-lk", "ablate", "-d", "4", "-c", "2d", "-p", "nnUNetPlans_cpu", "--run", "--trainers", *TRAINERS,
            "--folds", "0", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu",
            "--latency-repeats", "0", "--no-plots", "-o", out, *extra]


def wait_until(what, check, timeout, interval=0.5, log: Path = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    tail = f"; the job's log ends:\n{read(log)[-3000:]}" if log is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def assert_trained(results: Path, trainers=TRAINERS):
    for t in trainers:
        fold = results / DATASET / f"{t}__nnUNetPlans_cpu__2d" / "fold_0"
        assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file(), fold


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hippocampus_executors")
    env = prepared_subset(root, DATASET, "2d", 5, 0, ["--name", "nnUNetPlans_cpu", "--batch", "4"], seed=1)
    return root, {**env, "nnUNet_n_proc_DA": "1", settings.VAL_MIRRORING: "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local SLURM cluster with accounting, started once for the module. Skipped only where SLURM is not
    installed and NNUNET_LK_REQUIRE_SLURM is unset (CI sets it: there a cluster that cannot start fails)."""
    found = shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None and not os.environ.get("NNUNET_LK_REQUIRE_SLURM"):
        pytest.skip(f"SLURM is not installed ({slurm_available()}); .ci/slurm/install.sh installs it")
    handle = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    yield handle
    handle.stop()


def array_ids(cluster) -> set:
    """The sbatch submissions the cluster has seen (one per job array)."""
    out = cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID", "--starttime", "2000-01-01").stdout
    return {line.split("_")[0] for line in out.split()}


def submit_without_waiting_twice(cluster, out, env, slurm_args, before):
    """A refused sbatch, --dry-run, then --no-wait twice: one job array, the second call submits nothing.
    The partition is down meanwhile (SLURM queues the jobs but starts none), so that no two-iteration training
    can end before the test signals it. Returns {trainer: job id}, {trainer: job log}."""
    refused = run(ablate(out, *slurm_args, "--slurm-partition", "nope", "--no-wait"), env, timeout=300, check=False)
    assert refused.returncode == 2 and "sbatch refused the jobs" in refused.stderr, refused.stderr
    assert "invalid partition" in refused.stderr.lower() and not (out / "ablate_jobs.json").exists()

    dry = run(ablate(out, *slurm_args, "--dry-run"), env, timeout=300)
    script = dry.stdout[dry.stdout.index("#!/bin/bash"):]
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --cpus-per-task=1" in script
    assert not (out / "ablate_jobs.json").exists() and array_ids(cluster) == before  # nothing submitted

    cluster.run("scontrol", "update", f"PartitionName={cluster.partition}", "State=DOWN")
    try:
        return _submit_twice(cluster, out, env, slurm_args, before, script)
    finally:
        cluster.run("scontrol", "update", f"PartitionName={cluster.partition}", "State=UP")


def _submit_twice(cluster, out, env, slurm_args, before, script):
    first = run(ablate(out, *slurm_args, "--no-wait"), env, timeout=300)
    submitted = dict(re.findall(r"submitted slurm job (\S+): train (\S+) 2d fold 0", first.stdout))
    assert sorted(submitted.values()) == sorted(TRAINERS), first.stdout
    state = json.loads((out / "ablate_jobs.json").read_text())["jobs"]
    assert {r["job_id"] for r in state} == set(submitted)
    wait_until("sacct to list the job array", lambda: array_ids(cluster) - before, timeout=30)
    (array,) = array_ids(cluster) - before
    assert {j.split("_")[0] for j in submitted} == {array}
    written = next((out / "slurm").rglob(f"{array}_submission.sh")).read_text()
    assert written.strip() == script.strip()  # --dry-run printed the script submitit wrote

    second = run(ablate(out, *slurm_args, "--no-wait"), env, timeout=300)
    assert "submitted slurm job" not in second.stdout and second.stdout.count("is still PENDING") == 2, second.stdout
    assert array_ids(cluster) - before == {array}
    return {t: j for j, t in submitted.items()}, {r["trainer"]: Path(r["stdout"]) for r in state}


def kill_one_and_signal_the_other(cluster, ids, logs):
    """As soon as each training starts (the partition is up again): send the stock job SLURM's time-limit warning
    (USR2), on which submitit checkpoints and requeues it; scancel LGMSNet's job. Then hold the requeued job."""
    wait_until("the stock job to start nnUNetv2_train", lambda: "nnunet-lk: start" in read(logs[STOCK]),
               timeout=240, interval=0.1, log=logs[STOCK])
    cluster.run("scancel", "--signal=USR2", ids[STOCK])
    wait_until("the LGMSNet job to start nnUNetv2_train", lambda: "nnunet-lk: start" in read(logs[LGMS]),
               timeout=240, interval=0.1, log=logs[LGMS])
    cluster.run("scancel", ids[LGMS])
    # SLURM's requeue may kill the job before submitit logs "Requeued job": ask the scheduler
    wait_until("submitit to requeue the signalled job", lambda: cluster.restarts(ids[STOCK]) == 1, timeout=120,
               log=logs[STOCK])
    wait_until("the requeued job to be back in the queue",
               lambda: cluster.job_states(ids[STOCK]) in (["PENDING"], ["RUNNING"]), timeout=60)
    # SLURM keeps a requeued job pending for a while; hold it there, so that the next call finds it queued
    # instead of racing a two-iteration training to its end
    cluster.run("scontrol", "hold", ids[STOCK], check=False)


def release_once_resubmitted(cluster, job_id, before):
    """In the background: once the next call has resubmitted the killed job (a second array in the accounting,
    so it has read the queue), let the held requeued job start at once."""
    def release():
        wait_until("the killed job's resubmission", lambda: len(array_ids(cluster) - before) == 2, timeout=300)
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        cluster.run("scontrol", "release", job_id, check=False)
    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_slurm_submits_once_reports_kills_requeues_and_resumes(cluster, hippocampus, tmp_path):
    root, env = hippocampus
    results, out = tmp_path / "results", tmp_path / "ablation"
    env = dict(env, nnUNet_results=str(results), SLURM_CONF=str(cluster.conf))
    slurm_args = ["--executor", "slurm", "--slurm-partition", cluster.partition, "--slurm-time", "30",
                  "--slurm-cpus-per-task", "1", "--slurm-array-parallelism", "2", "--requeue", "--poll-seconds", "2"]
    before = array_ids(cluster)
    ids, logs = submit_without_waiting_twice(cluster, out, env, slurm_args, before)
    kill_one_and_signal_the_other(cluster, ids, logs)
    held = cluster.job_states(ids[STOCK])
    releaser = release_once_resubmitted(cluster, ids[STOCK], before)

    third = run(ablate(out, *slurm_args), env, timeout=600)
    releaser.join(timeout=60)
    assert re.search(rf"slurm job {ids[LGMS]} \(train {LGMS} 2d fold 0\) FAILED: CANCELLED.*log {logs[LGMS]}",
                     third.stderr), third.stderr
    stock = f"slurm job {ids[STOCK]} (train {STOCK} 2d fold 0)"
    if held == ["PENDING"]:  # the usual case: held until the call had looked
        assert f"{stock} is still PENDING: not submitted again" in third.stdout, third.stdout
    else:  # it started before the hold: the call may find it running or already finished
        assert f"{stock} is still" in third.stdout or f"{stock} finished" in third.stderr, (held, third.stdout)
    assert not re.search(rf"submitted slurm job \S+: \w+ {STOCK}", third.stdout)  # requeued, not resubmitted
    (resubmitted,) = re.findall(rf"submitted slurm job (\S+): \w+ {LGMS} 2d fold 0", third.stdout)
    assert re.search(rf"slurm job {resubmitted} .*-> RUNNING", third.stderr)  # progress while waiting
    assert "slurm: 0 running, 0 pending, 2 finished, 0 failed" in third.stderr
    stock_log = read(logs[STOCK])
    assert "Calling checkpoint method" in stock_log and re.findall(r"nnunet-lk: start \S+ (\w+) ", stock_log) == ["train", "resume"]
    assert f"-tr {STOCK} -p nnUNetPlans_cpu -device cpu --npz --c" in stock_log
    assert_trained(results)
    record = json.loads((out / "ablate_results.json").read_text())
    assert set(record["trainers"]) == set(TRAINERS) and (out / "ablate_report.md").is_file()
    assert json.loads((out / "ablate_jobs.json").read_text())["jobs"] == []

    stamps = {p: p.stat().st_mtime for p in results.rglob("checkpoint_final.pth")}
    fourth = run(ablate(out, *slurm_args), env, timeout=300)
    assert "already trained and validated" in fourth.stderr and "submitted" not in fourth.stdout
    assert len(array_ids(cluster) - before) == 2  # the first array and the resubmission, nothing more
    assert {p: p.stat().st_mtime for p in results.rglob("checkpoint_final.pth")} == stamps


@pytest.mark.slow
def test_local_runs_two_cpu_trainings_at_once(hippocampus, tmp_path):
    root, env = hippocampus
    results, out = tmp_path / "results", tmp_path / "ablation"
    env = dict(env, nnUNet_results=str(results))
    first = run(ablate(out, "--executor", "local", "--jobs", "2", "--threads-per-job", "1"), env, timeout=600)
    assert "slot 0: 1 threads; slot 1: 1 threads" in first.stderr
    spans = []
    for t in TRAINERS:
        log = read(out / f"run_{t}_fold0.log")
        (start,) = re.findall(r"nnunet-lk: start (\S+) train ", log)
        (end,) = re.findall(r"nnunet-lk: exit 0 at (\S+) ", log)
        spans.append((float(start), float(end)))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # both ran at the same time
    assert_trained(results)
    assert set(json.loads((out / "ablate_results.json").read_text())["trainers"]) == set(TRAINERS)

    second = run(ablate(out, "--executor", "local", "--jobs", "2"), env, timeout=300)
    assert "already trained and validated" in second.stderr and "[local] start" not in second.stderr


def test_dry_run_lists_jobs_commands_and_sbatch_script_without_submitting(nnunet_dirs, tmp_path):
    """No scheduler and no training: a results tree with fold 0 done, fold 1 resumable, folds 2-4 missing."""
    model = nnunet_dirs["results"] / DATASET / f"{LGMS}__nnUNetPlans__2d"
    (model / "fold_0" / "validation").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "fold_0" / "validation" / "summary.json").write_text("{}")
    (model / "fold_1").mkdir()
    (model / "fold_1" / "checkpoint_latest.pth").write_bytes(b"")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               **{f"nnUNet_{k}": str(v) for k, v in nnunet_dirs.items()})
    out = tmp_path / "ablation"
    base = ["nnunet-lk", "ablate", "-d", DATASET, "-c", "2d", "--run", "--trainers", LGMS, "--epochs", "3",
            "--device", "cpu", "--dry-run", "-o", out]
    slurm_run = run(base + ["--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "90",
                            "--slurm-mem-gb", "16", "--slurm-account", "lab", "--slurm-extra", "mail-type=END",
                            "--slurm-setup", "module load cuda", "--slurm-array-parallelism", "3"], env, timeout=120)
    text = slurm_run.stdout
    jobs = re.findall(rf"^  (\w+) {LGMS} 2d fold (\d)", text, flags=re.M)
    assert jobs == [("resume", "1"), ("train", "2"), ("train", "3"), ("train", "4")], text
    assert re.search(rf"NNUNET_LK_EPOCHS=3 .*nnUNetv2_train {DATASET} 2d 1 -tr {LGMS} -p nnUNetPlans -device cpu "
                     rf"--npz --c$", text, flags=re.M), text
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --mem=16GB",
                 "#SBATCH --account=lab", "#SBATCH --mail-type=END", "module load cuda", "submitit.core._submit"):
        assert line in text, line
    assert not out.exists()  # no state file, no job folder: nothing was submitted

    local_run = run(base + ["--executor", "local", "--jobs", "2", "--threads-per-job", "3"], env, timeout=120)
    assert "2 at a time: slot 0: 3 threads; slot 1: 3 threads" in local_run.stdout
    assert local_run.stdout.count("nnUNetv2_train") == 4 and "#SBATCH" not in local_run.stdout
    assert not out.exists()
