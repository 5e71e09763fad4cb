"""Entry point: `python -m kubetune.trainer [train|preflight] [--config PATH]`.

Turns every outcome into an exit code and, on failure, into the pod's termination message, so the
operator learns why a pod failed without reading its logs. Exit codes: see errors.ExitCode.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

from kubetune.trainer import events
from kubetune.trainer.config import config_path, load_config, parse_args
from kubetune.trainer.errors import (
    Reason,
    TrainerError,
    classify,
    exit_code,
    write_termination_message,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(config_path(args.config))
        if args.command == "preflight":
            from kubetune.trainer.preflight import preflight  # no torch: a small CPU pod

            preflight(config)
            return 0
        from kubetune.trainer.run import run  # torch loads after the config parses

        run(config)
    except (Exception, KeyboardInterrupt) as exc:
        return fail(exc)
    return 0


def fail(exc: BaseException) -> int:
    """Reports a failure (or a preemption) on stdout and in the termination message."""
    reason, message = classify(exc)
    rank = int(os.environ.get("RANK", "0"))
    if reason == Reason.PREEMPTED:
        events.emit("preempted", rank=rank, message=message)
    else:
        if not isinstance(exc, TrainerError):
            traceback.print_exception(exc, file=sys.stderr)
        events.emit("failed", rank=rank, reason=str(reason), message=message)
    write_termination_message(reason, message)
    return exit_code(reason)


if __name__ == "__main__":
    sys.exit(main())
