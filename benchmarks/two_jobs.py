"""Two dreamlora runs on one machine: wall time of a toy run alone and beside a second one started a little later.

Each variant runs `python -m cli train` on builtin:toy (sample subject, no prior, no final grid) once alone and
then twice at once, the second started `--stagger` seconds after the first, each in its own process:

- "adaptive": today's default: each run takes the cores other jobs leave free when it starts (dreamlora.threads);
- "all cores": every run takes every core (OMP_NUM_THREADS = cores), as before dreamlora.threads;
- "all cores, passive": the same with OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep instead of spinning).

    python benchmarks/two_jobs.py                  # 150 steps a run
    python benchmarks/two_jobs.py --steps 60 --variants adaptive,all-cores

The figure that matters: the slower of the two side-by-side runs against the run alone (target: at most 2.5x),
and the lone run's time against the "all cores" lone run (target: nothing lost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))
VARIANTS = {
    "adaptive": {},
    "all-cores": {"OMP_NUM_THREADS": str(CORES)},
    "all-cores-passive": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE"},
}


def command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "cli", "train", "--config", str(ROOT / "sample_instances/polkaball/dreamlora.toml"),
            "--out", str(out), "--steps", str(steps), "--no-prior", "--no-final-grid", "--checkpoint-every", "0"]


def start(env_extra: dict, out: Path, steps: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update({"HF_HUB_OFFLINE": "1", **env_extra})
    return subprocess.Popen(command(out, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait(proc: subprocess.Popen, started: float) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a run failed: {err[-500:]}")
    return time.perf_counter() - started


def alone(env_extra: dict, steps: int, folder: Path) -> float:
    started = time.perf_counter()
    return wait(start(env_extra, folder / "alone.safetensors", steps), started)


def side_by_side(env_extra: dict, steps: int, folder: Path, stagger: float) -> tuple[float, float]:
    first_started = time.perf_counter()
    first = start(env_extra, folder / "first.safetensors", steps)
    time.sleep(stagger)
    second_started = time.perf_counter()
    second = start(env_extra, folder / "second.safetensors", steps)
    return wait(first, first_started), wait(second, second_started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--stagger", type=float, default=8.0, help="seconds between the two starts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"{CORES} cores, builtin:toy, {args.steps} steps a run, second run started {args.stagger:g} s after the "
          f"first; load before: {os.getloadavg()[0]:.2f}")
    print("| variant | alone s | side by side: first s | second s | slower / alone |")
    print("|---|---|---|---|---|")
    for name in args.variants.split(","):
        folder = Path(tempfile.mkdtemp(prefix="two-jobs-"))
        try:
            lone = alone(VARIANTS[name], args.steps, folder)
            first, second = side_by_side(VARIANTS[name], args.steps, folder, args.stagger)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"| {name} | {lone:.1f} | {first:.1f} | {second:.1f} | {max(first, second) / lone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
