"""Work split into byte ranges of a file and run on a pool of spawned processes, results in file order.
Used by packing (pack_workers.py) and cleaning (clean.py): `for r in ordered_map(Worker, plan, jobs, 2): ...`."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from minimind import MiniMindError

_WORKER: Callable[[Any], Any] | None = None  # set in pool processes only, by _init


def cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count, where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def byte_ranges(path: Path, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of about chunk_bytes, each ending just after a newline (or at the end of the
    file), so no line is split between two ranges."""
    ranges, start = [], 0
    with path.open("rb") as fh:
        while start < size:
            end = start + chunk_bytes
            if end >= size:
                end = size
            else:
                fh.seek(end - 1)
                fh.readline()  # through the newline of the line holding byte end-1
                end = fh.tell()
            ranges.append((start, end))
            start = end
    return ranges


def _init(make_worker: Callable[[Any], Callable[[Any], Any]], plan: Any) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; threads would oversubscribe
    _WORKER = make_worker(plan)


def _run(job: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(job)


def ordered_map(make_worker: Callable[[Any], Callable[[Any], Any]], plan: Any, jobs: Sequence[Any], workers: int,
                what: str) -> Iterator[Any]:
    """`make_worker(plan)(job)` for each job, yielded in job order: in this process for one worker, else from
    spawned processes (safe with torch and threads) that each build the worker once. `make_worker` and `plan`
    must pickle (a module-level class and a dataclass). A worker that dies (killed for memory, or a script
    that starts the work again when imported) stops the run with an error naming `what` instead of a hang."""
    if workers == 1:
        yield from map(make_worker(plan), jobs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(make_worker, plan)) as pool:
        futures = [pool.submit(_run, job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        except BrokenProcessPool:
            raise MiniMindError(f"{what}: a worker process died; if a script starts this work, put the call "
                                "under `if __name__ == '__main__':`, or pass workers=1") from None
        finally:
            for future in futures:  # on an error, start no more jobs (running ones finish)
                future.cancel()
