"""For the toy world's training scripts: OpenMP threads that yield the CPU while they wait."""

from __future__ import annotations

import os
import sys


def restart_with_passive_openmp(module: str) -> None:
    """Re-execute `python -m module` with OMP_WAIT_POLICY=PASSIVE unless it is set already.

    OpenMP threads spin while they wait; on a CPU shared with other jobs that made steps ~10x slower
    (measured: 30 s instead of 2.9 s). The policy is read when torch loads, hence the restart.
    """
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])
