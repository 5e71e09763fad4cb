"""The operator gives the memory a burst freed back to the system (handlers/memory.py)."""

from __future__ import annotations

import asyncio
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
