"""The commands `nnunet-lk ablate --run` starts (nnUNetv2_train, nnUNetv2_find_best_configuration) run in a
process group of their own, killed whole on Ctrl-C, SIGTERM, failure, or when the command's leader exits
(``nnunet_lk/process_group.py``). A stand-in command plays nnUNetv2_train: it starts a worker that sleeps
(as nnU-Net's data-loader workers do), prints the worker's pid, and then sleeps or fails."""
import os
import signal
import subprocess
import sys
import time

import pytest

from nnunet_lk.process_group import run_streaming
from tests.helpers.realdata import REPO, kill_group

# prints "worker PID", then sleeps (or exits with the given status); the worker holds the output pipe
STAND_IN = ("import subprocess, sys, time\n"
            "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            "print('worker', worker.pid, flush=True)\n"
            "if len(sys.argv) > 1: sys.exit(int(sys.argv[1]))\n"
            "time.sleep(300)\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is gone as far as work is concerned
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _worker_pid(line: str) -> int:
    assert line.startswith("worker "), line
    return int(line.split()[1])


def test_failed_command_leaves_no_worker_and_returns_its_status():
    lines = []
    start = time.time()
    returncode = run_streaming([sys.executable, "-c", STAND_IN, "3"], on_line=lines.append)
    assert returncode == 3
    assert time.time() - start < 60  # the worker still held the pipe: it was killed, not waited for
    worker = _worker_pid(lines[0])
    assert _gone(worker), f"worker {worker} outlived its failed command"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_our_process_kills_the_commands_workers(signum):
    # our process (as `nnunet-lk ablate --run` is) runs the stand-in and is interrupted while it works
    ours = ("import sys\n"
            "from nnunet_lk.process_group import run_streaming\n"
            f"sys.exit(run_streaming([sys.executable, '-c', {STAND_IN!r}], "
            "on_line=lambda line: print(line, end='', flush=True)))\n")
    proc = subprocess.Popen([sys.executable, "-c", ours], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    worker = None
    try:
        worker = _worker_pid(proc.stdout.readline())
        assert _alive(worker)
        os.kill(proc.pid, signum)  # our process only: the command runs in a session of its own
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert _gone(worker), f"worker {worker} outlived the interrupted command"
    finally:
        kill_group(proc)
        if worker is not None and _alive(worker):  # never leave them behind, even when the test fails
            group = os.getpgid(worker)  # the stand-in's session (or ours, started above), never pytest's
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)


def test_stop_event_from_another_thread_kills_the_command_and_its_workers():
    # the local executor runs commands from worker threads, which never see Ctrl-C: it sets `stop` instead
    import threading

    from nnunet_lk.process_group import Stopped
    stop, lines, box = threading.Event(), [], {}

    def work():
        try:
            box["returncode"] = run_streaming([sys.executable, "-c", STAND_IN], on_line=lines.append, stop=stop)
        except Stopped as e:
            box["stopped"] = e
    thread = threading.Thread(target=work)
    thread.start()
    worker = None
    try:
        deadline = time.time() + 60
        while not lines and time.time() < deadline:
            time.sleep(0.1)
        worker = _worker_pid(lines[0])
        stop.set()
        thread.join(30)
        assert not thread.is_alive() and "stopped" in box, box
        assert _gone(worker), f"worker {worker} outlived the stopped command"
    finally:
        stop.set()
        thread.join(30)
        if worker is not None and _alive(worker):
            group = os.getpgid(worker)
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)


def test_killing_a_group_reaps_the_leader_even_when_popens_wait_lock_is_held():
    # a Ctrl-C that lands inside Popen.poll() can leave its internal lock held; kill_group must still return
    from nnunet_lk.process_group import kill_group
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    assert proc._waitpid_lock.acquire(False)
    start = time.time()
    kill_group(proc, reap_timeout=0.5)
    assert time.time() - start < 10
    with pytest.raises(ChildProcessError):  # reaped: no child left with that pid
        os.waitpid(proc.pid, os.WNOHANG)
    proc._waitpid_lock.release()
