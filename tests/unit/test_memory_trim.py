"""The operator gives the memory a burst freed back to the system (handlers/memory.py)."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import subprocess
import sys
import threading
from pathlib import Path

from kubetune.handlers import memory


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_freed_chunks_in_the_middle_of_the_heap_go_back_to_the_system() -> None:
    # A burst's bodies (64 KiB each here, under glibc's mmap threshold) with a few survivors
    # between them, as the kept indexes and memories are: freeing the rest leaves holes that
    # glibc keeps resident, and only malloc_trim returns them.
    assert memory.TRIM is not None, "glibc's malloc_trim was not found"
    blocks = [bytearray(b"x" * 64 * 1024) for _ in range(3000)]
    survivors = blocks[::100]
    del blocks
    held = _rss_mib()
    memory.TRIM()
    trimmed = _rss_mib()
    assert held - trimmed > 100, (held, trimmed)
    assert len(survivors) == 30


def test_the_trim_runs_on_its_timer() -> None:
    calls: list[int] = []

    async def main() -> None:
        task = asyncio.create_task(memory.trim_forever(0.01, lambda: calls.append(1) or 1))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(main())
    assert len(calls) >= 3


def test_the_allocator_is_read_from_what_the_process_has_loaded(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert memory.allocator(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert memory.allocator(maps) == "pymalloc"
    assert memory.allocator() == "pymalloc"  # the test process: no preload


def test_a_handler_thread_runs_on_idle_only_when_no_call_is_waiting() -> None:
    idle: list[str] = []
    pool = memory.HandlerThreads(1, on_idle=lambda: idle.append("idle"))
    started = threading.Event()
    release = threading.Event()
    calls = [pool.submit(lambda: (started.set(), release.wait())), pool.submit(lambda: None)]
    started.wait()
    assert idle == []  # the first call runs, the second waits
    release.set()
    for call in calls:
        call.result()
    pool.shutdown()
    assert idle == ["idle"]  # after the second, not between the two


# Blocks freed by handler threads, then how many bytes jemalloc's thread caches hold once the
# pool is idle (a process of its own: jemalloc must be preloaded, as in the operator image).
_HELD_IN_CACHES = """
import ctypes, sys
from kubetune.handlers import memory
libc = ctypes.CDLL(None)
libc.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_size_t]
def cached() -> int:
    epoch, value = ctypes.c_uint64(1), ctypes.c_size_t(0)
    size = ctypes.c_size_t(8)
    libc.mallctl(b"epoch", None, None, ctypes.byref(epoch), 8)
    libc.mallctl(b"stats.arenas.4096.tcache_bytes", ctypes.byref(value), ctypes.byref(size),
                 None, 0)
    return value.value
assert memory.allocator() == "jemalloc"
pool = (memory.handler_threads(8) if sys.argv[1] == "flush" else memory.HandlerThreads(8, None))
def work() -> None:
    junk = [bytearray(n % 4000 + 16) for n in range(20000)]
    del junk
for call in [pool.submit(work) for _ in range(64)]:
    call.result()
print(cached())
"""


def test_idle_handler_threads_give_back_jemallocs_thread_caches() -> None:
    jemalloc = ctypes.util.find_library("jemalloc")
    assert jemalloc, "libjemalloc2 is not installed (make prereqs installs it)"
    env = {**os.environ, "LD_PRELOAD": jemalloc, "PYTHONMALLOC": "malloc"}

    def held(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _HELD_IN_CACHES, mode],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return int(out.stdout.split()[-1])

    kept, flushed = held("keep"), held("flush")
    assert kept > 256 * 1024, kept  # eight idle threads' caches
    assert flushed < kept / 4, (flushed, kept)
