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
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
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
