"""Experiments run in this process, or side by side in worker processes that split the CPU's threads.

A grid's trials and runs are independent of one another. On a small CPU, two processes with one
thread each get more work out of two cores than one process with two threads (the demo's MiniLM
batches are too small for two threads to halve a matmul: benchmarks/grid_workers.py measures it). The
workers share what `RunCache` keeps through files in `cache_dir` (evaluations and trained states),
so a WiSE-FT trial still finds the `ft` trial that another worker trained.

Results come back in the order of the jobs, whichever worker finishes first; a worker's exception is
raised in the caller when its job's turn comes.

Example:
    >>> from saftune.run import RunConfig
    >>> pool = RunPool(workers=1)
    >>> jobs = [Job(RunConfig(model="tiny-sentence", dataset="toy-text", method="zeroshot"))]
    >>> [r.method for r in pool.map(jobs)]                    # doctest: +SKIP
    ['zeroshot']
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch

from saftune._quiet import quiet_torchao_logs
from saftune.record import RunRecord
from saftune.run import RunCache, RunConfig, run_experiment

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One `run_experiment` call: its configuration, run directory and which splits it evaluates.

    `same_work`: jobs with equal keys do the same work (an untrained method's seeds evaluate the same
    weights on the same sets): a pool never runs two of them at once, so the later finds the first's
    evaluations in the shared cache instead of repeating them beside it; another job takes the free worker.
    """

    config: RunConfig
    out_dir: Path | None = None
    evaluate_splits: str = "all"
    same_work: str | None = None


class RunPool:
    """Runs `Job`s with `workers` processes (1: in this process), sharing a `RunCache`.

    Args:
        workers: processes; each gets `threads` torch threads (default: the CPUs divided among them).
        cache_dir: where the workers share evaluations and trained states (None: in memory, one process).
    """

    def __init__(self, workers: int = 1, *, cache_dir: str | Path | None = None, threads: int | None = None):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer; got {workers!r}")
        if workers > 1 and cache_dir is None:
            raise ValueError("several workers share their caches through files: give a cache_dir")
        self.workers = workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.cache = RunCache.in_directory(self.cache_dir) if self.cache_dir is not None else RunCache()
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.RLock()  # a done-callback may run at once, inside `_dispatch`
        self._urgent: deque = deque()  # (job, handle) waiting for a worker, before those of `_queued`
        self._queued: deque = deque()
        self._running = 0
        self._busy: set[str] = set()  # `Job.same_work` keys of the running jobs

    def __enter__(self) -> RunPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:  # jobs not yet started never start
            for _, handle in [*self._urgent, *self._queued]:
                handle.cancel()
            self._urgent.clear()
            self._queued.clear()
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def submit(self, jobs: Iterable[Job], *, urgent: bool = False) -> list:
        """Queue `jobs`; returns one handle per job whose `.result()` is its record.

        With several workers, jobs start in order as workers come free, `urgent` ones (a row's edge
        extensions, the runs of a row just chosen) before every job queued without it. With one
        worker a job runs in this process when its result is first asked for.
        """
        jobs = list(jobs)
        if self.workers == 1:
            return [_Deferred(job, self.cache) for job in jobs]
        handles = [Future() for _ in jobs]
        with self._lock:
            (self._urgent if urgent else self._queued).extend(zip(jobs, handles))
            self._dispatch()
        return handles

    def _dispatch(self) -> None:
        """Hand queued jobs to free workers (called holding the lock)."""
        # The executor gets no more jobs than it has workers, so that a later urgent job goes next.
        while self._running < self.workers:
            picked = self._next_job()
            if picked is None:
                return  # nothing queued, or only work a running job is doing
            job, handle = picked
            if not handle.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            if self._executor is None:
                # spawn, not fork: a forked child of a process that already ran OpenMP threads can hang.
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                    initargs=(self.threads, str(self.cache_dir), logging.getLogger("saftune").getEffectiveLevel()))
            self._running += 1
            if job.same_work is not None:
                self._busy.add(job.same_work)
            self._executor.submit(_run_job, job).add_done_callback(partial(self._finished, handle, job.same_work))

    def _next_job(self):
        """The first waiting (job, handle), urgent ones first, that no running job duplicates; removed."""
        for queue in (self._urgent, self._queued):
            for i, (job, handle) in enumerate(queue):
                if job.same_work is None or job.same_work not in self._busy:
                    del queue[i]
                    return job, handle
        return None

    def _finished(self, handle: Future, same_work: str | None, done: Future) -> None:
        with self._lock:
            self._running -= 1
            self._busy.discard(same_work)
            error = done.exception()
            if error is None:
                handle.set_result(done.result())
            else:
                handle.set_exception(error)
            self._dispatch()

    def map(self, jobs: Iterable[Job]) -> Iterator[RunRecord]:
        """The record of each job, in the jobs' order."""
        handles = self.submit(jobs)
        try:
            for handle in handles:
                yield handle.result()
        finally:
            for handle in handles:
                handle.cancel()


class _Deferred:
    """A job of a single-worker pool: run in this process when its result is first asked for."""

    def __init__(self, job: Job, cache: RunCache):
        self.job, self.cache, self._record = job, cache, None
        self._callbacks = []

    def result(self) -> RunRecord:
        if self._record is None:
            job = self.job
            self._record = run_experiment(job.config, job.out_dir, evaluate_splits=job.evaluate_splits, cache=self.cache)
            for callback in self._callbacks:
                callback(self)
        return self._record

    def add_done_callback(self, callback) -> None:
        """Call `callback(self)` once the job has run (as `concurrent.futures.Future` does)."""
        if self._record is not None:
            callback(self)
        else:
            self._callbacks.append(callback)

    def cancel(self) -> bool:
        return self._record is None


_WORKER_CACHE: RunCache | None = None


def _start_worker(threads: int, cache_dir: str, log_level: int) -> None:
    global _WORKER_CACHE
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("saftune").setLevel(log_level)
    quiet_torchao_logs()
    try:  # transformers' weight-loading bars, as quiet as in the parent (`saftune -v` shows them)
        from transformers.utils import logging as hf_logging

        if log_level > logging.INFO:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    _WORKER_CACHE = RunCache.in_directory(Path(cache_dir))


def _run_job(job: Job) -> RunRecord:
    return run_experiment(job.config, job.out_dir, evaluate_splits=job.evaluate_splits, cache=_WORKER_CACHE)
