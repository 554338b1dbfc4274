"""Models trained side by side (`encdec sweep --jobs`, `encdec experiment --jobs`): each task in
a spawned worker process, and no worker outlives the command that started it.

A worker whose parent has gone (killed, or its terminal closed) stops as a user's Ctrl-C would
stop it: the trainer saves a resumable checkpoint after the current step, and the worker exits,
so the same command started again continues every run.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_orphaned = threading.Event()


def _watch_parent(parent: int, every_s: float) -> None:
    """Worker initializer: a thread that, once the parent process has gone, asks this worker
    to stop (SIGTERM, which the trainer turns into a checkpoint and a stop)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        _orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="encdec-parent-watch", daemon=True).start()


def _call(fn, args: tuple):
    """Run one task; an orphaned worker exits when it is done (nobody waits for the result,
    and the pool would otherwise keep the process waiting for the next task forever)."""
    try:
        return fn(*args)
    finally:
        if _orphaned.is_set():
            os._exit(1)


def threads_per_job(raw: dict, jobs: int) -> int:
    """Torch threads for each of ``jobs`` models trained at once: cores / jobs, unless the
    config (``raw``) sets train.num_threads; 0 (all cores) for one job at a time."""
    if jobs > 1 and not raw.get("train", {}).get("num_threads"):
        return max(1, (os.cpu_count() or 1) // jobs)
    return 0


def run_tasks(fn, tasks: list[tuple], jobs: int, started=None, finished=None,
              watch_every_s: float = 1.0) -> list:
    """``fn(*task)`` for every task, ``jobs`` at once in spawned worker processes (one at a time
    in this process when ``jobs`` is 1); ``started(i)`` as task i is submitted and
    ``finished(i, result)`` as it completes. Returns the results in the tasks' order."""
    results: list = [None] * len(tasks)
    if jobs == 1:
        for i, task in enumerate(tasks):
            if started:
                started(i)
            results[i] = fn(*task)
            if finished:
                finished(i, results[i])
        return results
    if not tasks:
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawned workers: a forked copy of a process that has run torch can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_watch_parent,
                             initargs=(os.getpid(), watch_every_s)) as pool:
        futures = {}
        for i, task in enumerate(tasks):
            if started:
                started(i)
            futures[pool.submit(_call, fn, task)] = i
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if finished:
                finished(i, results[i])
    return results
