"""The one table `make bench` prints: each benchmark records its headline rows here as it prints
its own detail, and `python bench/results.py FILE` prints them together with the machine.

A row is kubetune's figure beside its peer's, measured in the same run, and their ratio. Rows go
to the JSON-lines file named by KUBETUNE_BENCH_RESULTS (`make bench` sets it); a benchmark run
by hand, without it, records nothing.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ENV = "KUBETUNE_BENCH_RESULTS"


def record(bench: str, what: str, kubetune: float, peer: float, unit: str, peer_name: str) -> None:
    """One headline row: `what` measured for kubetune and for `peer_name` in the same run."""
    target = os.environ.get(ENV)
    if not target:
        return
    row = {
        "bench": bench,
        "what": what,
        "kubetune": kubetune,
        "peer": peer,
        "unit": unit,
        "peer_name": peer_name,
    }
    with Path(target).open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def table(rows: list[dict[str, object]]) -> str:
    """The rows as one Markdown table, kubetune / peer as the ratio column."""
    lines = [
        "| benchmark | what | kubetune | peer | peer is | kubetune / peer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours, theirs = float(str(row["kubetune"])), float(str(row["peer"]))
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        unit = row["unit"]
        lines.append(
            f"| {row['bench']} | {row['what']} | {ours:.4g} {unit} | {theirs:.4g} {unit} "
            f"| {row['peer_name']} | {ratio} |"
        )
    return "\n".join(lines)


def main(path: str) -> None:
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nkubetune benchmarks, one run: {cpu_model()}, {os.cpu_count()} CPUs, load {load}\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1])
