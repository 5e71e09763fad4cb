"""The operator under tracemalloc, for bench_scale.py's memory profile (BENCH_TRACEMALLOC=1).

Each SIGUSR1 takes a snapshot; from the second on, the growth since the first, by the line that
allocated it (8 frames deep, grouped by the innermost frame outside the standard library), is
written to $BENCH_TRACEMALLOC_OUT. The allocations are Python's only (not the allocator's held
arenas), so the figure is lower than RSS. The tracing slows the operator: its timings are not
the benchmark's.

    BENCH_TRACEMALLOC=/tmp/growth.txt python bench/bench_scale.py 200 --no-peer
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from kubetune.cli import main

FRAMES = 8
snapshots: list[tracemalloc.Snapshot] = []


def _outside_stdlib(tb: tracemalloc.Traceback) -> str:
    for frame in reversed(tb):  # innermost last in tracemalloc's order: walk from the inside
        if "/lib/python3" in frame.filename and "site-packages" not in frame.filename:
            continue
        return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
    return f"{tb[-1].filename}:{tb[-1].lineno}"


def _dump(_signum: int, _frame: FrameType | None) -> None:
    gc.collect()
    snapshots.append(tracemalloc.take_snapshot())
    if len(snapshots) < 2:
        return
    grown: dict[str, list[int]] = {}
    for stat in snapshots[-1].compare_to(snapshots[0], "traceback"):
        where = _outside_stdlib(stat.traceback)
        entry = grown.setdefault(where, [0, 0])
        entry[0] += stat.size_diff
        entry[1] += stat.count_diff
    total = sum(size for size, _ in grown.values())
    lines = [f"total growth {total / 1024:.0f} KiB"]
    for where, (size, count) in sorted(grown.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"{size / 1024:10.1f} KiB {count:8d} blocks  {where}")
    Path(os.environ["BENCH_TRACEMALLOC_OUT"]).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, _dump)
    sys.argv = ["kubetune", "run"]
    raise SystemExit(main())
