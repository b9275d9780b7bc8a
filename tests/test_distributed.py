"""Scale-out: `accelerate launch` with 2 CPU processes (gloo) trains with DDP, splits the class images, and
writes one output file from the main process; each class image equals the single-process one.

On a CPU-only machine accelerate needs ACCELERATE_USE_CPU=1 and the multi-process launcher:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m cli train ...
(`--cpu` alone starts a single process). On GPUs: accelerate launch --num_processes N -m cli train ...
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.slow  # each test launches two processes (about 20 s each on 2 cores)

# A launched script that patches the library in each process, then runs the command line as `-m cli` would.
PATCHED_CLI = """
import os, sys, shutil
import dreamlora.training as train_module
from dreamlora.losses import LossParts

rank = os.environ.get("RANK", "0")
if os.environ.get("RMTREE_LOG"):
    real_rmtree = shutil.rmtree
    def recording_rmtree(path, *args, **kwargs):
        if "checkpoints" in str(path):
            with open(os.environ["RMTREE_LOG"], "a") as log:
                log.write(rank + "\\n")
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = recording_rmtree
if os.environ.get("NAN_ON_RANK") == rank:
    real_loss, calls = train_module.prior_preservation_loss, []
    def loss_with_a_nan(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:  # from the second step on, this process alone sees a NaN
            return LossParts(parts.total * float("nan"), parts.instance * float("nan"), parts.prior)
        return parts
    train_module.prior_preservation_loss = loss_with_a_nan
from cli.main import main
sys.argv = ["dreamlora", *sys.argv[1:]]
main()
"""


def launch(args: list[str], cache: Path, timeout: float = 600, script: Path | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes of `python -m cli <args>` (or of `script`), one thread each (2 cores)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "DREAMLORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    target = [str(script)] if script else ["-m", "cli"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "out" / "ball.safetensors"
    settings = tmp / "fast.toml"  # few sampling steps: class images and the validation grid
    settings.write_text('[prior]\nsteps = 2\n[validation]\nsteps = 2\nseeds = [0]\n'
                        'prompts = ["a photo of {token} {class}"]\n')
    result = launch(["train", str(INSTANCES), "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", str(out), "--steps", "2",
                     "--num-class-images", "4", "--checkpoint-every", "0", "--config", str(settings)], tmp / "cache")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return tmp, out, result


def test_two_processes_train_with_ddp_and_write_one_file(two_process_run):
    from dreamlora.lora import read_lora_file

    tmp, out, result = two_process_run
    assert [p.name for p in out.parent.glob("*.safetensors")] == ["ball.safetensors"]
    lora = read_lora_file(out)
    assert lora.rank == 4 and lora.unet_modules == 48
    assert sorted(p.name for p in (out.parent / "ball-run" / "checkpoints").iterdir()) == ["step-000002"]
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines()]
    assert lines.count(f"wrote {out}") == 1  # the save event: only the main process writes the file
    assert "generating 2 class images" in output and "generating 4 class images" not in output  # split in two


def test_class_images_of_two_processes_equal_the_single_process_ones(two_process_run, tiny_sd, tmp_path):
    from dreamlora.config import PriorConfig
    from dreamlora.identity import ModelIdentity
    from dreamlora.priors import cached_prior_dir, generate_priors, prior_spec

    tmp, _, _ = two_process_run
    spec = prior_spec(PriorConfig(steps=2), "a photo of ball", ModelIdentity(tiny_sd.identity, tiny_sd.fingerprint), 64,
                      device="cpu", dtype="fp32")
    os.environ["DREAMLORA_CACHE"], previous = str(tmp / "cache"), os.environ["DREAMLORA_CACHE"]
    try:
        shared = cached_prior_dir(spec)
    finally:
        os.environ["DREAMLORA_CACHE"] = previous
    assert sorted(p.name for p in shared.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process ran; batches of 2, as each process's share was
    try:
        alone = generate_priors(tiny_sd, spec, tmp_path / "alone", 4, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    for path in alone:
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shared / path.name))), path.name


def test_overwrite_deletes_the_old_checkpoints_once_from_the_main_process(two_process_run, tmp_path):
    tmp, out, _ = two_process_run
    script, log = tmp_path / "patched_cli.py", tmp_path / "rmtree.log"
    script.write_text(PATCHED_CLI)
    result = launch(["train", str(INSTANCES), "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", str(out),
                     "--steps", "1", "--no-prior", "--checkpoint-every", "0", "--overwrite", "--validation-steps", "1",
                     "--validation-seeds", "0"], tmp / "cache", script=script, env={"RMTREE_LOG": str(log)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert log.read_text().split() == ["0"]  # rank 0 alone; the other waited for it
    assert sorted(p.name for p in (out.parent / "ball-run" / "checkpoints").iterdir()) == ["step-000001"]


def test_a_nan_on_one_process_stops_both_with_the_same_message(tmp_path):
    script = tmp_path / "patched_cli.py"
    script.write_text(PATCHED_CLI)
    out = tmp_path / "nan" / "ball.safetensors"
    result = launch(["train", str(INSTANCES), "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", str(out),
                     "--steps", "6", "--no-prior", "--log-every", "1", "--checkpoint-every", "0"], tmp_path / "cache",
                    script=script, env={"NAN_ON_RANK": "1"}, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Both processes raise at the same step (the non-finite flag is all-reduced) with the same message; the one
    # that exits first makes the launcher SIGTERM the other, sometimes before it has printed its line (seen in CI).
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, result.stderr[-3000:]
    assert "the loss on process 1 became non-finite (NaN or inf) by step 2" in errors[0]
    # accelerate's launcher prints its own traceback when a process exits 1; the processes themselves print none
    assert "dreamlora/" not in result.stderr and "TrainingError" not in result.stderr and result.returncode != 0
    assert not out.exists()
