"""The memory planner against measured peaks of real CPU training steps, beside the usual rule
of thumb (accelerate's `estimate-memory`: Adam training takes 4x the model's fp32 size, i.e. 16
bytes per parameter, activations ignored).

    PYTHONPATH=operator:. python bench/bench_planner.py

Prints one row per case of tests/unit/test_planner.py (same models, batches and probe).
"""

from __future__ import annotations

import warnings

from tests.unit.test_planner import CASES, measure_case

from results import record  # bench/results.py: run as a script, this folder is on sys.path

MIB = 1024**2


def main() -> None:
    warnings.filterwarnings("ignore")
    print(
        f"{'model':7} {'method':6} {'batch x seq':>11} {'ckpt':>4} {'measured':>10} "
        f"{'planner':>10} {'error':>7} {'16 B/param':>11} {'error':>7}"
    )
    for kind, method, batch, seq, checkpointing in CASES:
        peak, estimate = measure_case(kind, method, batch, seq, checkpointing)
        thumb = 16 * estimate.parameters
        print(
            f"{kind:7} {method:6} {f'{batch} x {seq}':>11} {'yes' if checkpointing else 'no':>4} "
            f"{peak / MIB:>8.1f}Mi {estimate.peak / MIB:>8.1f}Mi {estimate.peak / peak - 1:>+7.1%} "
            f"{thumb / MIB:>9.1f}Mi {thumb / peak - 1:>+7.1%}"
        )
        record(
            "planner",
            f"peak memory, {kind} {method} {batch}x{seq}{' ckpt' if checkpointing else ''}",
            estimate.peak / MIB,
            peak / MIB,
            "MiB",
            "measured peak",
        )


if __name__ == "__main__":
    main()
