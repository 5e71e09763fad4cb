"""Give the memory a burst freed back to the system.

A burst of watch events (1,000 FineTuneJobs applied at once) parses and drops megabytes of JSON
bodies and their dicts. CPython frees those objects, but glibc keeps the freed chunks inside its
heap unless they sit at its very top, so the operator's RSS stays at the burst's high-water mark
long after the objects are gone (tracemalloc at N = 100: 9.8 KiB of live Python objects per
FineTuneJob against 340 KiB of RSS). glibc's `malloc_trim(0)` hands every free page in the middle
of its heaps back to the kernel (madvise); nothing else does that for a Python process (Python's
own `gc` only frees objects into the allocator). The chart's MALLOC_ARENA_MAX=2 keeps the heaps to
two, so the trim has little to walk.

The trim runs on a timer, `KUBETUNE_MEMORY_TRIM_SECONDS` (default 30, 0 turns it off), in the
event loop's default executor: ctypes lets go of the GIL for the call, so the heap's walk does
not stall the watches (the `gc.collect()` before it, which frees unreachable cycles into the
heap first, does hold the GIL for its pass). On a C library other than glibc (musl has no
malloc_trim) it does nothing.

Under jemalloc (the operator image) each handler thread keeps a cache of the blocks it freed, and
jemalloc empties a thread's cache only as that thread allocates again: after a burst the 64
handler threads sit idle, each holding its cache, and the pages those blocks are on stay
resident. `HandlerThreads` has a thread hand its cache back (`thread.tcache.flush`) when it
finishes a handler with none waiting, so the pool's caches go back when the burst ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def call() -> int:
        gc.collect()  # unreachable cycles first, so that their chunks are free to trim
        return int(trim(0))

    return call


TRIM = _malloc_trim()


def allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """'jemalloc' when it is loaded into this process (the operator image), else 'pymalloc'
    (CPython's own small-object allocator over the C library's malloc)."""
    try:
        text = maps.read_text()
    except OSError:
        return "pymalloc"
    return "jemalloc" if "/libjemalloc.so" in text else "pymalloc"


def _tcache_flush() -> Callable[[], None] | None:
    """jemalloc's `thread.tcache.flush` for the calling thread, or None without jemalloc."""
    try:
        mallctl = ctypes.CDLL(None).mallctl  # LD_PRELOAD put jemalloc's symbols in the global scope
    except AttributeError:
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    mallctl.argtypes += [ctypes.c_size_t]
    mallctl.restype = ctypes.c_int

    def flush() -> None:
        mallctl(b"thread.tcache.flush", None, None, None, 0)

    return flush


class HandlerThreads(concurrent.futures.ThreadPoolExecutor):
    """kopf's handler threads (its `settings.execution.executor`): a thread that finishes a
    call with no other call waiting runs `on_idle` (under jemalloc: gives back its cache)."""

    def __init__(self, max_workers: int, on_idle: Callable[[], None] | None) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="handler")
        self._on_idle = on_idle
        self._waiting = 0
        self._count_lock = threading.Lock()

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if self._on_idle is None:
            return super().submit(fn, *args, **kwargs)
        with self._count_lock:
            self._waiting += 1
        return super().submit(self._call, fn, args, kwargs)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._count_lock:
            self._waiting -= 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._count_lock:
                idle = self._waiting == 0
            if idle and self._on_idle is not None:
                self._on_idle()


def handler_threads(workers: int) -> HandlerThreads:
    return HandlerThreads(workers, _tcache_flush() if allocator() == "jemalloc" else None)


def trim_interval() -> float:
    return float(os.environ.get("KUBETUNE_MEMORY_TRIM_SECONDS", "30"))


async def trim_forever(interval: float, trim: Callable[[], int]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        await loop.run_in_executor(None, trim)


_TASKS: set[asyncio.Task[None]] = set()  # kept, so the loop does not drop the running task


@kopf.on.startup()
async def start_trimming(**_: Any) -> None:
    interval = trim_interval()
    which = allocator()
    log.info("memory allocator: %s", which)
    if which == "jemalloc":
        return  # it returns freed pages itself (MALLOC_CONF background_thread)
    if TRIM is None or interval <= 0:
        log.info("freed memory is not trimmed (no malloc_trim here, or turned off)")
        return
    task = asyncio.get_running_loop().create_task(trim_forever(interval, TRIM))
    _TASKS.add(task)


@kopf.on.cleanup()
async def stop_trimming(**_: Any) -> None:
    for task in _TASKS:
        task.cancel()
    _TASKS.clear()
