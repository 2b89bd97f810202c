"""Running independent jobs (trainings, evaluations) side by side in worker processes.

Tiny students train fastest on one thread each (thread synchronisation costs more than it saves at
this size), so a machine with N cores trains N of them at once in N processes. `map_processes`
does that with a ``spawn`` pool whose workers run torch on ``threads`` threads; with ``workers=1``
the jobs run in this process, one after another, with the same results (CPU training is
deterministic for a given seed, and each job sets its own seeds).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Worker processes to use by default: the CPU cores this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class WorkerPool:
    """Worker processes kept for several batches of jobs: ``with WorkerPool(2) as pool: pool.map(fn, items)``.

    Starting a worker costs seconds (it imports torch and transformers), so a run with two phases of
    jobs (the second depending on the first's results) keeps one pool. Workers are started with
    ``spawn``: a script that uses a pool needs the usual ``if __name__ == "__main__":`` guard. ``workers=1``: no processes,
    jobs run here in order. ``threads``: torch threads per worker (and here, for ``workers=1``).
    """

    def __init__(self, workers: int = 1, *, threads: int = 1) -> None:
        for name, v in (("workers", workers), ("threads", threads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.workers, self.threads = workers, threads
        self._pool: Any = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # OpenMP reads its thread count when torch is first imported in a worker: set it before spawning.
            saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=mp.get_context("spawn"),  # never fork a process that holds torch threads
                    initializer=_init_worker,
                    initargs=(self.threads,),
                )
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        """Yield ``(index, fn(item))`` for every item as each finishes (in order when ``workers == 1``).

        ``fn`` must be a module-level function and ``items`` picklable (they cross a process boundary).
        The first job that raises stops the rest (pending ones are cancelled) and its error is raised here."""
        if self._pool is None:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                for i, item in enumerate(items):
                    yield i, fn(item)
            finally:
                torch.set_num_threads(previous)
            return
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        futures = {self._pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        raise RuntimeError(
                            "a worker process died before finishing its job (killed, out of memory, or "
                            "started from a script without `if __name__ == '__main__':` around its entry "
                            "point: workers are started with spawn, which re-imports that script); "
                            "workers=1 runs the jobs in this process"
                        ) from None
                    yield futures[fut], result
        finally:
            for fut in futures:
                fut.cancel()


def map_processes(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int = 1, threads: int = 1
) -> Iterator[tuple[int, R]]:
    """`WorkerPool.map` on a pool of ``workers`` made for these ``items`` alone."""
    with WorkerPool(
        min(workers, max(len(items), 1)) if isinstance(workers, int) else workers, threads=threads
    ) as pool:
        yield from pool.map(fn, items)


__all__ = ["WorkerPool", "map_processes", "default_workers"]
