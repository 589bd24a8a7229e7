"""Smoke check of tests/helpers/slurm.py on this machine (root, after .ci/slurm/install.sh): ~1 min.

    .venv/bin/python .ci/slurm/smoke.py [--no-accounting]

Starts a local cluster in a temp folder and asserts: sbatch runs and completes, a failing job is FAILED
with its exit code, scancel gives CANCELLED, --array=0-3%2 never runs more than 2 tasks at once; then,
if submitit is installed: a function's result comes back, map_array with slurm_array_parallelism=2,
and a job killed by scancel makes job.result() raise UncompletedJobError (needs accounting/sacct).
"""
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.slurm import slurm_available, start_local_slurm  # noqa: E402


def _add(a, b):
    return a + b


def _timed_square(x):
    t = time.time()
    time.sleep(3)
    return x * x, t, time.time()


def _sleep_long():
    time.sleep(600)


def _max_overlap(intervals):
    return max(sum(s <= p < e for s, e in intervals) for p, _ in intervals)


def main() -> None:
    accounting = "--no-accounting" not in sys.argv
    if (why := slurm_available(accounting)) is not None:
        sys.exit(f"cannot start a local SLURM: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="slurm-smoke-"))
    t = time.monotonic()
    cluster = start_local_slurm(tmp / "cluster", accounting=accounting)
    print(f"cluster up in {time.monotonic() - t:.1f}s (accounting={accounting})")
    try:
        out = tmp / "hi.out"
        t = time.monotonic()
        jid = cluster.run("sbatch", "--parsable", "-o", str(out), "--wrap", "echo hi; sleep 2").stdout.strip()
        assert cluster.wait_job(jid) == ["COMPLETED"], cluster.job_states(jid)
        assert out.read_text().strip() == "hi"
        print(f"sbatch 'echo hi; sleep 2': COMPLETED in {time.monotonic() - t:.1f}s")

        jid = cluster.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "exit 3").stdout.strip()
        assert cluster.wait_job(jid) == ["FAILED"]
        assert "ExitCode=3:0" in cluster.run("scontrol", "show", "job", jid).stdout

        jid = cluster.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 600").stdout.strip()
        deadline = time.monotonic() + 60
        while cluster.job_states(jid) != ["RUNNING"] and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.run("scancel", jid)
        assert cluster.wait_job(jid) == ["CANCELLED"]
        print("exit 3 -> FAILED 3:0; scancel -> CANCELLED")

        jid = cluster.run("sbatch", "--parsable", "--array=0-3%2", "-o", str(tmp / "arr_%a.out"),
                          "--wrap", "date +%s.%N; sleep 3; date +%s.%N").stdout.strip()
        assert cluster.wait_job(jid) == ["COMPLETED"] * 4, cluster.job_states(jid)
        iv = [tuple(map(float, (tmp / f"arr_{i}.out").read_text().split())) for i in range(4)]
        assert _max_overlap(iv) == 2, iv
        print("--array=0-3%2: 4 COMPLETED, at most 2 at once")

        if accounting:
            time.sleep(1)
            acct = cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID,State").stdout
            assert "CANCELLED" in acct and "FAILED" in acct, acct
            print("sacct sees the jobs")

        try:
            import submitit
        except ImportError:
            print("submitit not installed: skipped its checks")
            return
        ex = submitit.AutoExecutor(folder=tmp / "submitit" / "%j")
        assert ex.cluster == "slurm", ex.cluster
        ex.update_parameters(timeout_min=10, slurm_partition=cluster.partition, cpus_per_task=1)
        t = time.monotonic()
        assert ex.submit(_add, 2, 3).result() == 5
        print(f"submitit submit().result() == 5 in {time.monotonic() - t:.1f}s")

        ex.update_parameters(slurm_array_parallelism=2)
        res = [j.result() for j in ex.map_array(_timed_square, [1, 2, 3, 4])]
        assert [r[0] for r in res] == [1, 4, 9, 16] and _max_overlap([r[1:] for r in res]) == 2
        print("submitit map_array (parallelism 2): [1, 4, 9, 16], at most 2 at once")

        job = ex.submit(_sleep_long)
        deadline = time.monotonic() + 60
        while cluster.job_states(job.job_id) != ["RUNNING"] and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.run("scancel", job.job_id)
        box = {}

        def wait():
            try:
                box["result"] = job.result()
            except Exception as e:  # noqa: BLE001
                box["error"] = e
        th = threading.Thread(target=wait, daemon=True)
        t = time.monotonic()
        th.start()
        th.join(120)
        if th.is_alive():
            assert not accounting, "submitit still waiting on a cancelled job"
            print(f"submitit on a cancelled job: still waiting after 120s, state {job.state} (no sacct)")
        else:
            assert isinstance(box.get("error"), submitit.core.utils.UncompletedJobError), box
            print(f"submitit on a cancelled job: {type(box['error']).__name__} after {time.monotonic() - t:.1f}s, "
                  f"state {job.state!r}")
    finally:
        cluster.stop()
    shutil.rmtree(tmp, ignore_errors=True)   # kept (with the daemons' logs) when a check failed
    print("OK")


if __name__ == "__main__":
    main()
