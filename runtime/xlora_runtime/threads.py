"""How many CPU threads a session may be given: `threads` is None (the backend's default) or an int from 1 to
`thread_limit()`, twice the CPUs this process may run on.

ONNX Runtime starts `threads - 1` intra-op threads per session (main and frozen graph: two pools) and they spin
while a step runs, so more threads than CPUs only compete for the same cores; twice the CPUs leaves room for a
setting written for another machine (`--threads 2` on one CPU) and refuses the counts that would start thousands
of threads (`--threads 99999`). The CPUs are those the process may run on (its affinity mask, as `taskset` or a
container's cpuset leaves it), not every CPU of the machine. Standard library only: the commands import it
before numpy.
"""

from __future__ import annotations

import numbers
import os

from .errors import XLoraError, brief

__all__ = ["available_cpus", "check_threads", "thread_limit"]


def available_cpus() -> int:
    """The CPUs this process may run on: `len(os.sched_getaffinity(0))` where the platform has it (Linux),
    else `os.cpu_count()` (1 when unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_limit() -> int:
    """The most CPU threads a session may be given: twice `available_cpus()`."""
    return 2 * available_cpus()


def check_threads(threads: object, option: str = "threads") -> int | None:
    """`threads` as a session takes it: None, or an int in 1..`thread_limit()`.

    Args:
        threads: the caller's value.
        option: how the message names it: a command-line option ("--threads": `--threads 0: ...`) or a keyword
            argument ("threads": `threads=0: ...`).
    Raises:
        XLoraError: not None or an int, below 1, or above the limit (one line naming the value and the limit).
    """
    if threads is None:
        return None
    shown = f"{option} {brief(threads)}" if option.startswith("--") else f"{option}={brief(threads)}"
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise XLoraError(f"{shown}: expected None or an int >= 1")
    if threads < 1:
        raise XLoraError(f"{shown}: expected >= 1")
    limit = thread_limit()
    if threads > limit:
        raise XLoraError(f"{shown}: expected at most {limit} (twice the {available_cpus()} CPUs this process may "
                         f"run on)")
    return int(threads)
