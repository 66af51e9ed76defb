"""How many CPU threads torch uses while training and analysing, and a context that sets them and restores the caller's
setting afterwards.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ['default_n_threads', 'torch_threads']



IDLE_SAMPLE_SECONDS = 0.2  # how long default_n_threads watches the CPUs (Linux /proc/stat)
IDLE_REUSE_SECONDS = 10.0  # a measurement is reused by the calls within this time
_last_idle: list = []


def _idle_cpus(seconds: float = IDLE_SAMPLE_SECONDS) -> float | None:
    """Idle CPUs (a count, e.g. 1.9 of 2) over ``seconds`` from ``/proc/stat``, or None where it cannot be read."""
    import time

    def sample():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v[:8]), v[3] + (v[4] if len(v) > 4 else 0)  # total (without guest time), idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (i1 - i0) / (t1 - t0) * (os.cpu_count() or 1)


def default_n_threads() -> int:
    """Threads for training: the cores that are idle now, at most torch's default (its count of physical cores).

    Rule: ``max(1, min(torch.get_num_threads(), cpus available to this process, floor(idle CPUs + 0.25)))``, with
    the idle CPUs measured over 0.2 s from ``/proc/stat`` (Linux; elsewhere the 1-minute load average stands in
    for the busy ones, and without either half the CPUs are used). Why: the training step's threads (torch's
    matrix products and the native kernels share torch's OpenMP threads) meet at a barrier many times per step, so
    a thread whose core is taken by another process stalls all of them. Measured on a 2-core machine
    (``benchmarks/results/throughput.md``, pbmc4k, ZINB, batch 128): quiet, 2 threads train 1.4x faster than 1;
    with one other busy process, 2 threads are 2-3x slower than 1. On a quiet machine every physical core is used;
    on a busy one only the idle cores. Load that starts after training has begun is not followed: pass
    ``n_threads`` to fix the count.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    cap = max(1, min(torch.get_num_threads(), available))
    import time

    now = time.monotonic()
    if _last_idle and now - _last_idle[0] < IDLE_REUSE_SECONDS:  # (calls in a row: one measurement)
        idle = _last_idle[1]
    else:
        idle = _idle_cpus()
        _last_idle[:] = [now, idle]
    if idle is None:
        try:
            idle = available - os.getloadavg()[0]
        except (AttributeError, OSError):
            return max(1, min(cap, available // 2))
    return max(1, min(cap, int(idle + 0.25)))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (None: :func:`default_n_threads`), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n) if n else default_n_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


