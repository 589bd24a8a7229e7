"""One Ctrl-C ends a prediction, with no worker process left and no half-written output.

nnU-Net's predictor runs preprocessing processes, a multiprocessing Manager and a spawn Pool of export
workers. A terminal's Ctrl-C reaches all of them; a pool worker that dies while it holds the pool's task
queue lock leaves ``Pool.terminate()`` (run by the ``with`` block as the KeyboardInterrupt unwinds) waiting
on that lock forever, so the main process hangs until a second Ctrl-C (measured: nnUNetv2_predict, 2D,
-npp 3 -nps 3; with -npp 0 -nps 0 there are no workers and one Ctrl-C ends it).

``install(output_folder)`` replaces the SIGINT handler: pass the interrupt on to every child, give them a
moment to stop between Python statements (an export in C code, such as SimpleITK writing a file, finishes
first), kill those that remain, remove the outputs of this run that are incomplete (so that
``--continue_prediction`` predicts them again), say what is kept, and exit 130. Files this run did not write are
never touched."""
from __future__ import annotations

import os
import signal
import sys
import time

GRACE_SECONDS = 3.0
EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports an interrupted command


def stop_pool_maintenance() -> None:
    """Stop every multiprocessing Pool of this process from replacing workers that exit (its handler thread
    otherwise starts new ones within 0.1 s). ``Pool.terminate()`` cannot be used: it waits for the task queue
    lock that a worker killed by the interrupt may hold. The handler thread's state is private to
    multiprocessing (stable since Python 3.8); without it, replacements outlive us by a moment and exit when
    they find the pool's pipes closed."""
    import gc
    from multiprocessing import pool
    for obj in gc.get_objects():
        if isinstance(obj, pool.Pool):
            try:
                obj._worker_handler._state = pool.TERMINATE
                obj._change_notifier.put(None)
            except Exception:
                pass


def stop_children(grace: float = GRACE_SECONDS) -> int:
    """Interrupt, then kill, every child process this process started through multiprocessing; returns how
    many there were."""
    import multiprocessing
    stop_pool_maintenance()
    children = multiprocessing.active_children()
    for child in children:
        try:
            os.kill(child.pid, signal.SIGINT)
        except (ProcessLookupError, TypeError):
            pass
    deadline = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)
    return len(children)


def _snapshot(folder) -> dict:
    """file name -> (modification time, size) of the files in ``folder`` now."""
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for entry in os.scandir(folder):
        if entry.is_file():
            stat = entry.stat()
            found[entry.name] = (stat.st_mtime_ns, stat.st_size)
    return found


def remove_incomplete_outputs(folder: str, before: dict) -> tuple:
    """(kept, removed): the output files of ``folder`` (not nnU-Net's .json copies of plans and arguments)
    that this run wrote (new or changed since the snapshot ``before``) and that are complete, and those that
    are not (deleted)."""
    from .file_integrity import damage
    kept, removed = [], []
    for name, state in sorted(_snapshot(folder).items()):
        if before.get(name) == state or name.endswith(".json"):
            continue
        if name.endswith((".nii.gz", ".nii", ".npz")) and damage(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
        else:
            kept.append(name)
    return kept, removed


def install(output_folder: str | None, program: str = "the prediction") -> None:
    """From now on, SIGINT ends this process as described above (main thread only)."""
    before = _snapshot(output_folder)

    def on_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            workers = stop_children()
            kept, removed = remove_incomplete_outputs(output_folder, before)
            print(f"\nnnunet-lk: {program} interrupted: stopped {workers} worker process(es); {len(kept)} output "
                  f"file(s) written by this run are complete and kept"
                  + (f", {len(removed)} partly written removed ({', '.join(removed)})" if removed else "")
                  + ". Run the same command with --continue_prediction to predict the rest.", file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(EXIT_STATUS)

    signal.signal(signal.SIGINT, on_interrupt)

