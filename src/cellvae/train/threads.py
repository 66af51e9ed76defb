"""How many CPU threads torch uses while training and analysing: the idle-core rule (:func:`default_n_threads`), a
context that sets a count and restores the caller's afterwards (:func:`torch_threads`), and the timed choice of a
default training run (:class:`ThreadTrial`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

__all__ = ['default_n_threads', 'torch_threads', 'thread_candidates', 'ThreadTrial', 'cpu_times']

IDLE_SAMPLE_SECONDS = 0.2  # how long default_n_threads watches the CPUs (Linux /proc/stat)
IDLE_REUSE_SECONDS = 10.0  # a measurement is reused by the calls within this time
_last_idle: list = []


def cpu_times() -> tuple[float, float] | None:
    """``(total, idle)`` CPU seconds of the whole machine since boot, summed over its CPUs, from the first line of
    Linux's ``/proc/stat``: total = user + nice + system + idle + iowait + irq + softirq + steal (guest time is
    inside user), idle = idle + iowait. Busy time is ``total - idle``. None where ``/proc/stat`` cannot be read or
    parsed (other systems); raises nothing."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        total, idle = sum(v[:8]), v[3] + (v[4] if len(v) > 4 else 0)
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return total / tick, idle / tick


def _idle_cpus(seconds: float = IDLE_SAMPLE_SECONDS) -> float | None:
    """Idle CPUs (a count, e.g. 1.9 of 2) over ``seconds`` from ``/proc/stat``, or None where it cannot be read."""
    first = cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = cpu_times()
    if second is None:
        return None
    (t0, i0), (t1, i1) = first, second
    if t1 <= t0:
        return None
    return (i1 - i0) / (t1 - t0) * (os.cpu_count() or 1)


def _available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_n_threads() -> int:
    """Threads for analyses (``torch_threads(None)``), and one of the two counts a default training run times against
    each other (:class:`ThreadTrial`): the cores that are idle now, at most torch's default (its count of physical
    cores).

    Rule: ``max(1, min(torch.get_num_threads(), cpus available to this process, floor(idle CPUs + 0.25)))``, with
    the idle CPUs measured over 0.2 s from ``/proc/stat`` (Linux; elsewhere the 1-minute load average stands in
    for the busy ones, and without either half the CPUs are used). Why: the training step's threads (torch's
    matrix products and the native kernels share torch's OpenMP threads) meet at a barrier many times per step, so
    a thread whose core is taken by another process stalls all of them. Measured on a 2-core machine
    (``benchmarks/results/throughput.md``, pbmc4k, ZINB, batch 128): quiet, 2 threads train 1.4x faster than 1;
    with one other busy process, 2 threads are 2-3x slower than 1. On a quiet machine every physical core is used;
    on a busy one only the idle cores. The rule sees only the 0.2 s it samples; a default training run therefore
    times both counts and repeats the trial (:class:`ThreadTrial`).
    """
    available = _available_cpus()
    cap = max(1, min(torch.get_num_threads(), available))
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


THREAD_TRIAL_ROUNDS = 3  # timed steps per candidate thread count in one trial (after one untimed warm-up step each)
THREAD_TRIAL_FIRST_SECONDS = 2.0  # the second trial starts this long after the first ended; the gap then doubles
THREAD_TRIAL_EVERY_SECONDS = 30.0  # ... up to this
THREAD_TRIAL_MARGIN = 0.05  # more threads are chosen only when their median step is this much faster


def thread_candidates() -> list[int]:
    """The thread counts a default run (``n_threads=None``) times against each other: the idle-core count of
    :func:`default_n_threads` and the cap (torch's count of physical cores, at most the CPUs available to this
    process); when they agree, the cap and half of it. One count (a single core) means no trial."""
    cap = max(1, min(torch.get_num_threads(), _available_cpus()))
    idle = min(default_n_threads(), cap)
    return sorted({idle, cap} if idle != cap else {max(1, cap // 2), cap})


class ThreadTrial:
    """Chooses the training thread count by timing training steps (for ``n_threads=None``).

    A trial runs each candidate count for one untimed warm-up step, then for ``rounds`` timed steps each, in
    alternating order (``2 1 1 2 2 1`` after the warm-up ``1 2``, for two candidates), and keeps the count with the
    shortest median step; more threads win only when they are at least ``margin`` faster, because an idle core
    taken by another process later stalls a larger thread team. The next trial starts ``first_seconds`` after the
    first one ended, and the gap doubles up to ``every_seconds``, so a trial spoiled by a burst of other work is
    soon redone and load that starts or stops during training is followed. Why timing and not a rule: on the shared
    2-core machine of ``benchmarks/results/throughput.md``, with about 0.3 cores taken by other processes, the
    idle-core rule chose 1 thread where 2 trained 1.6x faster (kang2018), while with a whole core taken 2 threads
    are 2-3x slower than 1.

    Usage (the training loop, :mod:`cellvae.train.loop`): ``before_step()`` sets the count for the next step,
    ``after_step()`` records its time. Results are bit-identical only for a fixed thread count: pass
    ``n_threads`` for reproducible runs (another count agrees within about 1e-5 after one epoch,
    ``tests/test_threads.py``).

    Args:
        candidates: thread counts to compare (each >= 1; duplicates dropped; one count: no trial).
        rounds: timed steps per count in one trial.
        every_seconds: the longest gap (wall seconds) between the end of a trial and the start of the next.
        margin: the fraction by which more threads must shorten the median step to be chosen.
        clock: a function returning seconds (default :func:`time.perf_counter`; tests pass a fake one).
        first_seconds: the gap before the second trial (then doubled up to ``every_seconds``).

    Raises:
        ValueError: no candidate, or a count below 1.

    Attributes:
        candidates: the counts compared (ascending).
        chosen: the count in use after the last trial (the largest candidate before the first trial ends).
        trials: one dict per finished trial, ``{count: median step seconds}``.
    """

    def __init__(self, candidates, rounds: int = THREAD_TRIAL_ROUNDS, every_seconds: float = THREAD_TRIAL_EVERY_SECONDS,
                 margin: float = THREAD_TRIAL_MARGIN, clock=None, first_seconds: float = THREAD_TRIAL_FIRST_SECONDS):
        self.candidates = sorted({int(c) for c in candidates})
        if not self.candidates or self.candidates[0] < 1:
            raise ValueError(f"thread counts must be >= 1, got {candidates!r}")
        self.rounds, self.every, self.margin = int(rounds), float(every_seconds), float(margin)
        self.gap = min(float(first_seconds), self.every)
        self.clock = clock or time.perf_counter
        self.chosen = self.candidates[-1]
        self.trials: list[dict] = []
        self._queue: list[tuple[int, bool]] = []
        self._times: dict[int, list[float]] = {}
        self._ended = None
        self._t0 = 0.0
        if len(self.candidates) > 1:
            self._start()

    def _start(self) -> None:
        c = self.candidates
        timed = [n for r in range(self.rounds) for n in (c if r % 2 else c[::-1])]
        self._queue = [(n, False) for n in c] + [(n, True) for n in timed]
        self._times = {n: [] for n in c}

    @property
    def active(self) -> bool:
        """Whether a trial is running."""
        return bool(self._queue)

    def before_step(self) -> int:
        """Set torch's thread count for the next step and start its clock; returns the count."""
        if not self._queue and self._ended is not None and self.clock() - self._ended >= self.gap:
            self.gap = min(2.0 * self.gap, self.every)
            self._start()
        n = self._queue[0][0] if self._queue else self.chosen
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self._t0 = self.clock()
        return n

    def after_step(self) -> None:
        """Record the step's time (during a trial); at the end of a trial, choose and set the count."""
        if not self._queue:
            return
        n, timed = self._queue.pop(0)
        if timed:
            self._times[n].append(self.clock() - self._t0)
        if self._queue:
            return
        med = {k: statistics.median(v) for k, v in self._times.items()}
        best = self.candidates[0]
        for k in self.candidates[1:]:
            if med[k] < med[best] * (1.0 - self.margin):
                best = k
        self.chosen = best
        self.trials.append({k: round(v, 6) for k, v in med.items()})
        torch.set_num_threads(best)
        self._ended = self.clock()
