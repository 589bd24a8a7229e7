"""The pieces behind `nnunet-lk ablate --run --executor ...` (issue 14) that need neither a scheduler nor a
training: the --slurm-* options as submitit's parameters, flag checks, the job list, the jobs' state file, how a
job's SLURM state is read, the local executor's GPU/thread slots, and the requeue checkpoint."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import submitit
from submitit.helpers import Checkpointable

from nnunet_lk import settings
from nnunet_lk.ablate import executors, jobs, slurm, state
from nnunet_lk.cli.main import build_parser

DATASET, LGMS = "Dataset004_Hippocampus", "nnUNetTrainerLGMSNet"


def test_slurm_options_map_one_to_one_onto_submitit_parameters(tmp_path):
    params = slurm.parameters(partition="gpu", time_min=600, cpus_per_task=8, gpus_per_node=1, mem_gb=32,
                              account="lab", qos="high", constraint="a100", array_parallelism=4,
                              setup=["module load cuda"], extra=["mail-type=END", "--exclusive", "gres=gpu:a100:1"])
    assert params == {"job_name": "nnunet-lk", "time": 600, "stderr_to_stdout": True, "partition": "gpu",
                      "cpus_per_task": 8, "gpus_per_node": 1, "mem": "32GB", "account": "lab", "qos": "high",
                      "constraint": "a100", "array_parallelism": 4, "setup": ["module load cuda"],
                      "additional_parameters": {"mail_type": "END", "exclusive": True, "gres": "gpu:a100:1"}}
    assert set(params) <= submitit.SlurmExecutor._valid_parameters()  # names submitit accepts
    script = slurm.sbatch_script(tmp_path, params, 3)
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --mem=32GB",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-node=1", "#SBATCH --mail-type=END",
                 "#SBATCH --exclusive", "#SBATCH --gres=gpu:a100:1", "module load cuda",
                 f"-m submitit.core._submit {tmp_path.absolute()}/slurm/%j"):
        assert line in script, line
    assert "--array" not in slurm.sbatch_script(tmp_path, params, 1)  # a single job is not an array
    defaults = slurm.parameters()
    assert defaults == {"job_name": "nnunet-lk", "time": slurm.DEFAULT_TIME_MIN, "stderr_to_stdout": True}


def test_dry_run_sbatch_script_without_the_slurm_extra_names_it(tmp_path, monkeypatch):
    import importlib.util
    from nnunet_lk.errors import MissingExtraError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"--dry-run .*pip install 'nnunet-lk\[slurm\]'"):
        slurm.sbatch_script(tmp_path, slurm.parameters(), 2)


@pytest.mark.parametrize("extra, message", [
    (["partition=gpu"], "use --slurm-partition"), (["mem=4G"], "use --slurm-mem-gb"),
    (["array=0-3"], "use --slurm-array-parallelism"), (["=x"], "KEY=VALUE"), (["bad key=1"], "KEY=VALUE")])
def test_slurm_extra_rejects_what_it_cannot_mean(extra, message):
    with pytest.raises(slurm.SlurmError, match=message):
        slurm.parameters(extra=extra)


def test_slurm_numbers_must_be_positive():
    with pytest.raises(slurm.SlurmError, match="--slurm-time must be a positive number, got 0"):
        slurm.parameters(time_min=0)
    with pytest.raises(slurm.SlurmError, match="--slurm-mem-gb"):
        slurm.parameters(mem_gb=-1)


def _options(*flags):
    from nnunet_lk.cli.ablate import run_options
    return run_options(build_parser().parse_args(["ablate", "-d", "4", "-c", "2d", *flags]))


@pytest.mark.parametrize("flags, message", [
    (["--executor", "slurm"], "add --run"), (["--dry-run"], "add --run"), (["--slurm-time", "5"], "add --run"),
    (["--run", "--no-wait"], "only apply to --executor slurm"),
    (["--run", "--executor", "local", "--slurm-partition", "x"], "only apply to --executor slurm"),
    (["--run", "--executor", "slurm", "--jobs", "2"], "only apply to --executor local"),
    (["--run", "--poll-seconds", "0"], "--poll-seconds must be positive")])
def test_flags_that_do_nothing_are_errors_naming_the_fix(flags, message):
    with pytest.raises(ValueError, match=message):
        _options(*flags)


def test_cli_options_become_run_options():
    o = _options("--run", "--executor", "slurm", "--device", "cuda", "--no-wait", "--requeue", "--slurm-time", "60")
    assert (o.executor, o.wait, o.requeue, o.slurm["time"], o.slurm["gpus_per_node"]) == ("slurm", False, True, 60, 1)
    local = _options("--run", "--executor", "local", "--jobs", "3", "--threads-per-job", "2")
    assert (local.jobs, local.threads_per_job, local.slurm) == (3, 2, {})


@pytest.fixture
def results_tree(nnunet_dirs):
    """LGMSNet fold 0 trained and validated, fold 1 with a checkpoint to resume, fold 2 trained, not validated."""
    model = nnunet_dirs["results"] / DATASET / f"{LGMS}__nnUNetPlans__2d"
    for fold, files in ((0, ["checkpoint_final.pth", "validation/summary.json"]), (1, ["checkpoint_latest.pth"]),
                        (2, ["checkpoint_final.pth"])):
        for name in files:
            (model / f"fold_{fold}" / name).parent.mkdir(parents=True, exist_ok=True)
            (model / f"fold_{fold}" / name).write_text("{}")
    return nnunet_dirs["results"], model


def test_job_list_comes_from_the_results_folders(results_tree, monkeypatch):
    results, model = results_tree
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setenv("UNRELATED", "x")
    todo = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [0, 1, 2, 3], device="cuda", results_root=results,
                          epochs=5, iterations=None, val_iterations=2, extra_env=jobs.thread_env(4))
    assert [(j.action, j.fold, j.key) for j in todo] == [("resume", 1, f"{LGMS}__2d__fold1"),
                                                         ("validate", 2, f"{LGMS}__2d__fold2"),
                                                         ("train", 3, f"{LGMS}__2d__fold3")]
    env = todo[0].env
    assert env[settings.EPOCHS] == "5" and env[settings.VAL_ITERATIONS] == "2"
    assert settings.ITERATIONS not in env and "UNRELATED" not in env
    assert env["nnUNet_results"] == str(results) and env["OMP_NUM_THREADS"] == "4"
    assert env["nnUNet_n_proc_DA"] == "2"  # set by the user: kept
    assert todo[0].command()[-2:] == ["--npz", "--c"] and todo[1].command()[-1] == "--val"
    assert "OMP_NUM_THREADS=4" in todo[2].shell_line() and todo[2].shell_line().endswith("-device cuda --npz")

    # a job re-checks its fold when it starts: fold 3 trained meanwhile only needs validating
    (model / "fold_3").mkdir()
    (model / "fold_3" / "checkpoint_final.pth").write_text("")
    assert todo[2].current_action() == "validate"
    (model / "fold_2" / "validation").mkdir()
    (model / "fold_2" / "validation" / "summary.json").write_text("{}")
    assert todo[1].current_action() is None


def test_repeats_are_planned_with_their_seeds_and_results_folders(results_tree, monkeypatch):
    """Repeat 0 is nnU-Net's own folder; repeat k trains in a results folder of its own, with seed + k; a repeat
    already trained and validated is not planned again."""
    results, model = results_tree
    monkeypatch.delenv(settings.SEED, raising=False)
    todo = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [0, 3], device="cpu", results_root=results,
                          repeats=3, seed=10)
    assert [(j.repeat, j.fold, j.seed, j.action) for j in todo] == [
        (0, 3, 10, "train"), (1, 0, 11, "train"), (1, 3, 11, "train"), (2, 0, 12, "train"), (2, 3, 12, "train")]
    repeat_1 = results / "nnunet_lk_repeats" / "repeat_1"
    first = todo[1]
    assert first.env["nnUNet_results"] == str(repeat_1) and first.env[settings.SEED] == "11"
    assert first.path == str(repeat_1 / DATASET / f"{LGMS}__nnUNetPlans__2d" / "fold_0")
    assert first.key == f"{LGMS}__2d__fold0__repeat1" and first.label.endswith("fold 0 repeat 1")
    assert first.log_name == f"run_{LGMS}_fold0_repeat1.log" and todo[0].log_name == f"run_{LGMS}_fold3.log"
    assert todo[0].env.get("nnUNet_results") == os.environ.get("nnUNet_results")  # repeat 0: nnU-Net's own
    assert f"{settings.SEED}=11" in first.shell_line()
    # repeat 1 of fold 0 finished meanwhile: planned no more
    done = Path(first.path)
    (done / "validation").mkdir(parents=True)
    (done / "validation" / "summary.json").write_text("{}")
    (done / "checkpoint_final.pth").write_text("")
    again = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [0, 3], device="cpu", results_root=results,
                           repeats=3, seed=10)
    assert [(j.repeat, j.fold) for j in again] == [(0, 3), (1, 3), (2, 0), (2, 3)]
    # one repeat without a seed: nnU-Net's behaviour, unseeded
    (plain,) = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [3], device="cpu", results_root=results)
    assert plain.seed is None and settings.SEED not in plain.env


def test_requeue_checkpoint_resumes_with_c(results_tree):
    results, model = results_tree
    (job,) = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [4], device="cpu", results_root=results)
    assert job.action == "train"
    assert not hasattr(jobs.TrainFold(job), "checkpoint")  # submitit requeues only Checkpointables at time limit
    from nnunet_lk.ablate.requeue import RequeueableTrainFold
    call = RequeueableTrainFold(job)
    assert isinstance(call, Checkpointable)
    resubmitted = call.checkpoint()
    assert isinstance(resubmitted, submitit.helpers.DelayedSubmission)
    again = resubmitted.function.job
    # no checkpoint yet: still --c (nnUNetv2_train then starts afresh itself); once there is one, --c resumes it
    assert again.current_action() == "resume" and again.command()[-1] == "--c"


def test_a_failing_training_raises_so_submitit_records_a_failure(results_tree, tmp_path):
    """A real nnUNetv2_train that fails (unknown dataset) in a job: TrainFold raises; a job whose fold was
    finished meanwhile runs nothing."""
    results, _ = results_tree
    (job,) = jobs.plan_runs("Dataset999_Missing", "2d", "nnUNetPlans", [LGMS], [0], device="cpu",
                            results_root=results)
    with pytest.raises(jobs.TrainingFailed, match=f"nnUNetv2_train exited 1: train {LGMS} 2d fold 0"):
        jobs.TrainFold(job)()
    (done,) = jobs.plan_runs(DATASET, "2d", "nnUNetPlans", [LGMS], [1], device="cpu", results_root=results)
    fold = results / DATASET / f"{LGMS}__nnUNetPlans__2d" / "fold_1"
    (fold / "checkpoint_final.pth").write_text("")
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        assert jobs.execute(done, handle) == 0  # finished meanwhile: nothing runs
    assert "already trained and validated" in log.read_text()


def _record(job_id="7_0", trainer=LGMS, fold=0):
    return state.JobRecord(executor="slurm", job_id=job_id, dataset="4", plans="p", configuration="2d",
                           trainer=trainer, fold=fold, action="train", path="/r/fold_0", folder="/o/slurm/%j",
                           stdout=f"/o/slurm/{job_id}/{job_id}_0_log.out", stderr="", submitted=1.0)


def test_state_file_round_trip_scope_and_errors(tmp_path):
    assert state.load(tmp_path) == []
    records = [_record("7_0"), _record("7_1", fold=1)]
    state.save(tmp_path, records)
    assert state.load(tmp_path) == records
    assert records[1].key == f"{LGMS}__2d__fold1" and records[0].belongs_to("4", "p", "2d")
    assert not records[0].belongs_to("4", "p", "3d_fullres")
    state.state_path(tmp_path).write_text("{not json")
    with pytest.raises(state.StateFileError, match="Check with squeue .* then delete it"):
        state.load(tmp_path)
    state.state_path(tmp_path).write_text('{"version": 99, "jobs": []}')
    with pytest.raises(state.StateFileError, match="version 99"):
        state.load(tmp_path)


def test_state_lock_lets_one_call_at_a_time_submit(tmp_path):
    held, release = threading.Event(), threading.Event()

    def holder():
        with state.locked(tmp_path):
            held.set()
            release.wait(30)
    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    try:
        with pytest.raises(state.StateFileError, match="another `nnunet-lk ablate --run`"):
            with state.locked(tmp_path, timeout=1):
                pass
    finally:
        release.set()
        thread.join(30)
    with state.locked(tmp_path, timeout=1):
        pass


@pytest.mark.parametrize("queue, outcome, sacct, expected", [
    ("PENDING", None, None, ("active", "PENDING")),
    ("RUNNING", ("success", 0), None, ("done", "COMPLETED")),       # result written before it left the queue
    (None, ("error", "Traceback\n  ...\nTrainingFailed: nnUNetv2_train exited 1\n"), "FAILED",
     ("failed", "FAILED", "TrainingFailed: nnUNetv2_train exited 1")),
    (None, None, "CANCELLED by 0", ("failed", "CANCELLED by 0")),
    (None, None, "TIMEOUT", ("failed", "TIMEOUT")),
    (None, None, "RUNNING", ("active", "RUNNING")),                  # sacct lags behind squeue
    (None, None, "UNKNOWN", ("failed", "GONE"))])
def test_job_status_from_squeue_result_and_sacct(queue, outcome, sacct, expected):
    status = slurm.classify(queue, outcome, sacct)
    assert (status.phase, status.state, status.detail)[:len(expected)] == expected


def test_local_slots_one_gpu_each_and_a_thread_budget():
    slots = executors.local_slots("cuda", environ={"CUDA_VISIBLE_DEVICES": "2,5"}, cores=16)
    assert [(s["CUDA_VISIBLE_DEVICES"], s["OMP_NUM_THREADS"], s["nnUNet_n_proc_DA"]) for s in slots] == [
        ("2", "8", "8"), ("5", "8", "8")]
    with pytest.raises(ValueError, match="only 2 GPU\\(s\\) visible .* --jobs 2 or fewer"):
        executors.local_slots("cuda", jobs=3, environ={"CUDA_VISIBLE_DEVICES": "2,5"}, cores=16)
    with pytest.raises(ValueError, match="no GPU is visible"):
        executors.local_slots("cuda", environ={"CUDA_VISIBLE_DEVICES": ""}, cores=16)
    cpu = executors.local_slots("cpu", jobs=3, environ={"nnUNet_n_proc_DA": "1"}, cores=8)
    assert [(s["OMP_NUM_THREADS"], s["MKL_NUM_THREADS"], "nnUNet_n_proc_DA" in s) for s in cpu] == [
        ("2", "2", False)] * 3
    assert executors.local_slots("cpu", jobs=4, cores=2)[0]["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        executors.local_slots("cpu", jobs=0)


def test_failures_of_folds_finished_later_are_not_reported(results_tree):
    results, model = results_tree
    outcome = executors.RunOutcome(records=[
        {"trainer": LGMS, "fold": 0, "action": "train", "returncode": 1, "path": str(model / "fold_0")},
        {"trainer": LGMS, "fold": 1, "action": "resume", "returncode": 1, "path": str(model / "fold_1")}])
    assert [r["fold"] for r in outcome.failed] == [1]  # fold 0 was trained and validated by a later job
