"""Threads for the chunk loops: read-ahead, write-behind, and how many CPUs this process may use."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .io.sinks import Sink

T = TypeVar("T")


def prefetch(tasks: Iterable[Callable[[], T]], pool: ThreadPoolExecutor, depth: int) -> Iterator[T]:
    """Results of ``tasks`` in order, with up to ``depth`` running ahead in ``pool``."""
    queue: deque[Any] = deque()
    it = iter(tasks)
    for task in it:
        queue.append(pool.submit(task))
        if len(queue) >= depth:
            break
    while queue:
        fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(nxt))
        yield fut.result()


def each(tasks: Iterable[Callable[[], object]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` threads (one: here, in order); the first failure, in task order, is raised."""
    if threads <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ckptavg-work") as pool:
        for _ in prefetch(tasks, pool, 2 * threads):
            pass


class WriteBehind:
    """Hands ``sink.write`` calls to a thread so writing (``pwrite`` into the page cache, as
    costly as the arithmetic) overlaps the next chunk's reads and adds. At most ``depth`` writes
    are in flight; a caller may reuse a buffer once ``depth + 1`` later writes were submitted."""

    def __init__(self, sink: Sink, pool: ThreadPoolExecutor, depth: int = 2) -> None:
        self.sink, self.pool, self.depth = sink, pool, depth
        self._queue: deque[Any] = deque()

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        self._queue.append(self.pool.submit(self.sink.write, name, start, values))
        while len(self._queue) > self.depth:
            self._queue.popleft().result()

    def flush(self) -> None:
        while self._queue:
            self._queue.popleft().result()


def spans(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


__all__ = ["WriteBehind", "available_cpus", "each", "prefetch", "spans"]
