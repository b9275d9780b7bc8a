"""How many CPU threads a run uses: all free cores, not the cores another job is already using.

PyTorch's CPU kernels run on an OpenMP team as large as the machine. When two such jobs share the cores,
each parallel region waits for a team member the other job's threads keep off the CPU, and OpenMP's
waiting threads spin while they wait: on 2 cores a toy run beside another 2-thread job took 25 minutes
instead of under 3. A run therefore counts, when it starts, the cores the rest of the machine keeps busy
(/proc/stat minus this process's own time) and takes the others (at least one thread); alone it takes every
core and loses nothing. The count is fixed for the run and stored in its checkpoints, so a resumed run
sums in the same order and writes the same bytes.

`OMP_NUM_THREADS` (or `--threads`) fixes the count; nothing is measured then.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

PROBE_SECONDS = 0.3  # long enough to see a busy core, short beside any run
BUSY_CORE = 0.5  # a core busy this share of the probe counts as taken


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_busy_elsewhere(probe: float = PROBE_SECONDS) -> float:
    """Cores kept busy by other processes during `probe` seconds (this process's own time subtracted)."""
    first, own_first, wall_first = _cpu_jiffies(), os.times(), time.monotonic()
    if first is None:
        return 0.0
    time.sleep(probe)
    second, own_second, wall = _cpu_jiffies(), os.times(), time.monotonic() - wall_first
    if second is None or second[1] == first[1]:
        return 0.0
    machine = os.cpu_count() or 1
    busy = (second[0] - first[0]) / (second[1] - first[1]) * machine  # cores in use, all processes
    own = ((own_second.user - own_first.user) + (own_second.system - own_first.system)) / max(wall, 1e-6)
    return max(0.0, busy - own)


def choose_threads(cores: int, busy_elsewhere: float) -> int:
    """All cores but those other jobs keep busy, at least one: `choose_threads(2, 1.0) == 1`."""
    taken = int(busy_elsewhere + (1 - BUSY_CORE))  # a core busy half the time or more counts as taken
    return max(1, cores - taken)


def run_threads(requested: int | None) -> int:
    """The thread count of a run: `requested` (a --threads value or a resumed run's), else $OMP_NUM_THREADS,
    else the cores other jobs leave free now."""
    if requested:
        return requested
    fixed = os.environ.get("OMP_NUM_THREADS", "").strip()
    if fixed.isdigit() and int(fixed) > 0:
        return int(fixed)
    return choose_threads(available_cores(), cores_busy_elsewhere())


@contextlib.contextmanager
def cpu_threads(requested: int | None) -> Iterator[int]:
    """Run with `run_threads(requested)` intra-op threads; the process's own count is put back after."""
    import torch

    before = torch.get_num_threads()
    threads = run_threads(requested)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
