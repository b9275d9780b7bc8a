"""CPU threads: a run takes the cores other jobs leave free, fixed for the run and kept by a resume."""

import subprocess
import sys

import pytest
import torch

from dreamlora import threads
from dreamlora.threads import choose_threads, cores_busy_elsewhere, cpu_threads, run_threads


def test_choose_threads_leaves_the_busy_cores_to_their_jobs():
    assert choose_threads(2, 0.0) == 2  # alone: every core
    assert choose_threads(2, 0.3) == 2  # a light background process takes nothing
    assert choose_threads(2, 0.9) == 1
    assert choose_threads(2, 2.0) == 1  # never fewer than one
    assert choose_threads(16, 4.2) == 12


def test_a_busy_process_is_seen_and_this_processes_own_work_is_not():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        __import__("time").sleep(0.5)
        assert cores_busy_elsewhere(probe=1.0) >= 0.7
    finally:
        busy.kill()
        busy.wait()


def test_this_processes_own_cpu_time_is_not_counted_as_another_jobs(monkeypatch):
    """Two cores fully busy during a 1 s probe, 1.5 CPU-seconds of them this process's: 0.5 core elsewhere."""
    from types import SimpleNamespace

    jiffies = iter([(1000, 4000), (1200, 4200)])  # 200 busy of 200 jiffies: both cores busy
    times = iter([SimpleNamespace(user=10.0, system=1.0), SimpleNamespace(user=11.25, system=1.25)])
    clock = iter([100.0, 101.0])
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda: next(jiffies))
    monkeypatch.setattr(threads.os, "times", lambda: next(times))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert cores_busy_elsewhere(probe=1.0) == pytest.approx(0.5)


def test_an_explicit_count_or_omp_num_threads_is_taken_as_given(monkeypatch):
    monkeypatch.setattr(threads, "cores_busy_elsewhere", lambda probe=0: pytest.fail("measured"))
    assert run_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert run_threads(None) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "cores_busy_elsewhere", lambda probe=0: 1.0)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert run_threads(None) == 1


def test_the_count_holds_inside_and_is_put_back_after():
    before = torch.get_num_threads()
    with cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_a_run_records_its_threads_and_a_resume_keeps_them(tmp_path, monkeypatch):
    from dreamlora import checkpoints, load_config, train

    from test_train import tiny_config

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "cores_busy_elsewhere", lambda probe=0: 0.0)
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    first = train(tiny_config(tmp_path, **{"train.steps": 2, "prior.enabled": False}))
    state = checkpoints.read_state(checkpoints.latest_checkpoint(first.run_dir))
    assert state["run"]["threads"] == 1
    first.output.unlink()
    seen = []
    monkeypatch.setattr(threads, "available_cores", lambda: 2)  # the machine looks free now: the resume keeps 1
    real = threads.run_threads
    monkeypatch.setattr(threads, "run_threads", lambda requested: seen.append(requested) or real(requested))
    train(tiny_config(tmp_path, **{"train.steps": 4, "prior.enabled": False, "train.resume": True}))
    assert seen == [1]
