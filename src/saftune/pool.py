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
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from saftune.record import RunRecord
from saftune.run import RunCache, RunConfig, run_experiment

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One `run_experiment` call: its configuration, run directory and which splits it evaluates."""

    config: RunConfig
    out_dir: Path | None = None
    evaluate_splits: str = "all"


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

    def __enter__(self) -> RunPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def submit(self, jobs: Iterable[Job]) -> list:
        """Queue `jobs`; returns one handle per job whose `.result()` is its record.

        With several workers the jobs start at once, in order, as workers come free; with one, a job
        runs in this process when its result is first asked for.
        """
        jobs = list(jobs)
        if self.workers == 1:
            return [_Deferred(job, self.cache) for job in jobs]
        if self._executor is None:
            # spawn, not fork: a forked child of a process that already ran OpenMP threads can hang.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(self.threads, str(self.cache_dir), logging.getLogger("saftune").getEffectiveLevel()))
        return [self._executor.submit(_run_job, job) for job in jobs]

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

    def result(self) -> RunRecord:
        if self._record is None:
            job = self.job
            self._record = run_experiment(job.config, job.out_dir, evaluate_splits=job.evaluate_splits, cache=self.cache)
        return self._record

    def cancel(self) -> bool:
        return self._record is None


_WORKER_CACHE: RunCache | None = None


def _start_worker(threads: int, cache_dir: str, log_level: int) -> None:
    global _WORKER_CACHE
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("saftune").setLevel(log_level)
    try:  # transformers' weight-loading bars, as quiet as in the parent (`saftune -v` shows them)
        from transformers.utils import logging as hf_logging

        if log_level > logging.INFO:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    _WORKER_CACHE = RunCache.in_directory(Path(cache_dir))


def _run_job(job: Job) -> RunRecord:
    return run_experiment(job.config, job.out_dir, evaluate_splits=job.evaluate_splits, cache=_WORKER_CACHE)
