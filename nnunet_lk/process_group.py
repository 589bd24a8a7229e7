"""Running nnU-Net's CLIs from our tools without leaving orphans.

``nnUNetv2_train`` starts data-augmentation workers and ``nnUNetv2_find_best_configuration`` a pool of its
own. Each command is started in a session (process group) of its own; on Ctrl-C, SIGTERM, any error, or once
its leader has exited, the whole group is killed, so no worker outlives the command or our process.
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
from typing import Callable, Optional, Sequence


def kill_group(proc: subprocess.Popen, reap_timeout: float = 5.0) -> None:
    """SIGKILL every process of ``proc``'s session (started with start_new_session=True) and reap the leader."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=reap_timeout)
    except subprocess.TimeoutExpired:
        # Ctrl-C that lands inside Popen.poll() can leave Popen's wait lock held, and a plain wait() then blocks
        # forever: reap the killed leader directly
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)


def _pump(stream, lines: "queue.Queue") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class _Terminated(BaseException):
    """SIGTERM while a command runs: handled like Ctrl-C (the group is killed), then re-raised as exit 143."""


class Stopped(RuntimeError):
    """``stop`` was set while the command ran (another thread asked for it): its process group was killed."""


def run_streaming(cmd: Sequence[str], env: Optional[dict] = None,
                  on_line: Callable[[str], None] = lambda line: None,
                  stop: Optional[threading.Event] = None) -> int:
    """Run ``cmd`` in its own session, passing each output line (stdout and stderr merged) to ``on_line``;
    returns its exit status. Whatever happens, the command's process group is gone when this returns.
    ``stop``: an event another thread sets to end the command early (then :class:`Stopped` is raised); only
    the main thread receives Ctrl-C and SIGTERM, so commands run from worker threads are stopped this way."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: "queue.Queue" = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    previous = _catch_sigterm()
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
                if proc.poll() is not None:
                    break  # the leader has exited; workers that still hold the pipe are killed below
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped: {' '.join(str(c) for c in cmd)}")
            if line is None:
                break
            if line:
                on_line(line)
        returncode = proc.wait()
    except _Terminated:
        kill_group(proc)
        raise SystemExit(128 + signal.SIGTERM) from None
    except BaseException:  # Ctrl-C, an error in on_line, Stopped
        kill_group(proc)
        raise
    finally:
        _restore_sigterm(previous)
    kill_group(proc)  # workers the leader left behind
    reader.join(timeout=10)
    while not lines.empty():
        line = lines.get()
        if line is not None:
            on_line(line)
    return returncode


def _catch_sigterm():
    """Turn SIGTERM into an exception while a command runs (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_exits():
    """While inside (main thread only): SIGTERM raises SystemExit(143), so that ``except``/``finally`` blocks
    stop what they started, e.g. commands run from worker threads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
