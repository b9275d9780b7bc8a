"""Reliability, round two: faults a user's machine causes and misuse, each through the real mechanism.

A full disk and a file-size limit (RLIMIT_FSIZE, a small tmpfs where the machine lets us mount one), a second
process holding the run's lock, SIGTERM/SIGHUP sent to the process, a FIFO named like a photo, captions in
the wrong encoding, malformed LoRA files, outputs in read-only folders. docs/reliability.md maps each
guarantee to its test; the generated bad inputs are in tests/test_reliability_fuzz.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from PIL import Image

from dreamlora import checkpoints, load_config, train
from dreamlora.atomic import atomic_path
from dreamlora.config import SampleSettings, to_portable_json
from dreamlora.errors import ConfigError, DataError, DreamLoraError, ModelLoadError, TrainingError
from dreamlora.lora import read_lora_file
from dreamlora.preflight import preflight, preflight_training_data
from test_reliability import (INSTANCES, ROOT, checkpoint_names, error_line, invoke, leftovers, quick_validation_toml,
                              smooth_image, small_config, subprocess_env, train_module)


# ----------------------------------------------------------------------------------------------
# Mechanisms


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE on this process: a write past `limit` bytes fails with EFBIG, as on a full quota.

    SIGXFSZ (which would kill the process) is ignored meanwhile, as `ulimit -f` users see it: the write fails.
    Only the soft limit is lowered, so it can be raised back.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def limited(function, limit: int):
    """`function` run under a file-size limit of `limit` bytes."""

    def call(*args, **kwargs):
        with file_size_limit(limit):
            return function(*args, **kwargs)

    return call


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only, where the container allows mounts); skips the test otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nothing can be written to: mode 0555, or for root (whom modes do not stop) a read-only tmpfs."""
    if os.geteuid() == 0:
        with tmpfs(path, "ro,size=64k"):
            yield path
        return
    path.mkdir(parents=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


def kohya_file(path: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    """A small valid kohya LoRA file for tiny-sd (or the given tensors and metadata)."""
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = tensors if tensors is not None else {
        f"{module}.lora_down.weight": torch.full((4, 64), 0.01), f"{module}.lora_up.weight": torch.full((64, 4), 0.01),
        f"{module}.alpha": torch.tensor(4.0)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {})
    return path


# ----------------------------------------------------------------------------------------------
# 1. Full disks and file-size limits (safetensors raises its own SafetensorError)


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_file_size_limit_while_writing_the_file_is_one_line_and_resume_writes_it(tmp_path, monkeypatch):
    out = tmp_path / "out" / "ball.safetensors"
    flags = ["train", INSTANCES, "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", out, "--no-prior",
             "--steps", "2", "--config", quick_validation_toml(tmp_path)]
    with monkeypatch.context() as patch:  # the limit holds while the LoRA file is written, and only then
        patch.setattr(train_module, "save_lora_file", limited(train_module.save_lora_file, 4096))
        line = error_line(invoke(*flags))
    assert f"cannot write '{out}': File too large" in line and "--resume" in line
    assert not out.exists() and leftovers(tmp_path) == []  # nothing partial, no temporary file
    assert checkpoint_names(tmp_path / "out" / "ball-run") == ["step-000002"]
    assert invoke(*flags, "--resume").exit_code == 0
    assert read_lora_file(out).unet_modules == 48


def test_file_size_limit_while_writing_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    calls = []
    real = checkpoints.save_checkpoint

    def save_checkpoint(run_dir, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            with file_size_limit(1024):
                return real(run_dir, step, *args, **kwargs)
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    with pytest.raises(TrainingError, match=r"cannot write '.*checkpoints': File too large: .*file-size limit"):
        train(small_config(tmp_path, **{"train.checkpoint_every": 1, "train.steps": 3}))
    assert checkpoint_names(tmp_path / "ball-run") == ["step-000001"]  # the good one stays, no partial one
    assert leftovers(tmp_path) == [] and not (tmp_path / "ball.safetensors").exists()


def test_full_tmpfs_gives_one_clear_error_and_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        (disk / "filler").write_bytes(b"\0" * 60_000)
        target = disk / "lora.safetensors"
        with pytest.raises(DreamLoraError, match=r"disk full while writing '.*lora.safetensors' \(No space left"):
            with atomic_path(target) as tmp:
                safetensors.torch.save_file({"w": torch.zeros(4096)}, str(tmp))  # 16 KiB: more than is left
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4096))])
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)
        with pytest.raises(TrainingError, match=r"disk full while writing '.*checkpoints'"):
            with train_module.disk_errors(checkpoints.checkpoint_dir(disk / "run")):
                checkpoints.save_checkpoint(disk / "run", 1, {"w": torch.zeros(4096)}, optimizer, scheduler, "{}", 2)
        assert list((disk / "run" / "checkpoints").iterdir()) == []


def test_damaged_checkpoint_on_resume_is_one_line(tmp_path):
    out = tmp_path / "ball.safetensors"
    flags = ["train", INSTANCES, "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", out, "--no-prior",
             "--steps", "2", "--checkpoint-every", "1", "--config", quick_validation_toml(tmp_path)]
    assert invoke(*flags).exit_code == 0
    adapter = tmp_path / "ball-run" / "checkpoints" / "step-000002" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # a disk error or a copy cut short
    out.unlink()
    line = error_line(invoke(*flags, "--resume"))
    assert "checkpoint" in line and "step-000002' is damaged" in line and "delete that folder" in line
    # Valid JSON, but not a checkpoint record:
    for record in ("[1, 2]", '{"run": null, "config": {"model": ["builtin:tiny-sd"]}}'):
        (adapter.parent / "state.json").write_text(record)
        assert "step-000002' is damaged" in error_line(invoke(*flags, "--resume"))


# ----------------------------------------------------------------------------------------------
# 2. Runs sharing an output or a run folder exclude each other


LOCK_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
print("locked", flush=True)
time.sleep(120)
"""  # a dreamlora run's lock, taken as dreamlora.atomic.RunLock takes it


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock at `path`, as a running dreamlora train does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    return holder


@pytest.mark.parametrize("shared", ["out", "run-dir"])
def test_a_second_run_on_the_same_output_or_run_folder_is_refused_naming_the_first(tmp_path, monkeypatch, shared):
    monkeypatch.setattr(train_module, "load_base_model", no_model)  # refused before any model loads
    out = tmp_path / "ball.safetensors"
    lock = tmp_path / ".ball.safetensors.lock" if shared == "out" else tmp_path / "ball-run" / ".lock"
    holder = hold_lock(lock)
    try:
        line = error_line(invoke("train", INSTANCES, "--class-word", "ball", "--out", out, "--model",
                                 "builtin:tiny-sd"))
        what = f"output '{out}'" if shared == "out" else f"run folder '{tmp_path / 'ball-run'}'"
        assert f"{what} is in use by another dreamlora run (PID {holder.pid} on host {socket.gethostname()}" in line
        assert "--out" in line or "--run-dir" in line
        assert lock.is_file()  # the holder's lock file is left alone
    finally:
        holder.kill()
        holder.wait()
    # The lock died with its holder (SIGKILL: no clean-up ran): the next run takes it.
    from dreamlora.atomic import RunLock

    taken = RunLock.acquire(lock, "x", "y")
    assert taken is not None
    taken.release()
    assert not lock.exists()


@pytest.mark.slow
def test_two_real_training_runs_on_one_output(tmp_path):
    """Two `dreamlora train` processes, the first paused while it holds the output: the second is refused
    with the first's PID, and the first then finishes and writes its file."""
    env = subprocess_env()
    out = tmp_path / "ball.safetensors"
    args = ["train", str(INSTANCES), "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", str(out),
            "--no-prior", "--steps", "6", "--checkpoint-every", "2", "--config", str(quick_validation_toml(tmp_path))]
    first = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    lock = tmp_path / ".ball.safetensors.lock"
    deadline = time.monotonic() + 300
    while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read().decode(errors="replace")
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        line = error_line(invoke(*args))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert f"is in use by another dreamlora run (PID {first.pid} on host" in line
    assert first.wait(timeout=300) == 0, first.stderr.read().decode(errors="replace")
    first.stderr.close()
    assert read_lora_file(out).unet_modules == 48 and not lock.exists()


# ----------------------------------------------------------------------------------------------
# 3. SIGTERM and SIGHUP are Ctrl-C; Ctrl-C during the final grid says the weights are kept


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_last_step(tmp_path, signum):
    def unhandled(number, frame):  # the default action would end pytest itself
        raise AssertionError(f"{signal.Signals(number).name} reached the caller's handler: train() left it alone")

    def send_signal(event):
        if event.stage == "train" and event.step == 3:
            os.kill(os.getpid(), signum)  # delivered to the main thread at its next bytecode, as from outside

    previous = signal.signal(signum, unhandled)
    try:
        with pytest.raises(TrainingError, match=rf"stopped by {signal.Signals(signum).name} after step 3; .*--resume"):
            train(small_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 2}), progress=send_signal)
        assert signal.getsignal(signum) is unhandled  # the caller's own handler is back
    finally:
        signal.signal(signum, previous)
    assert checkpoint_names(tmp_path / "ball-run") == ["step-000002", "step-000003"]


@pytest.mark.slow
def test_sigterm_to_a_training_process_saves_the_step_and_resume_is_byte_identical(tmp_path):
    env = subprocess_env()
    config = quick_validation_toml(tmp_path)

    def args(out):
        return ["train", str(INSTANCES), "--class-word", "ball", "--out", str(out), "--config", str(config),
                "--no-prior", "--steps", "10", "--checkpoint-every", "2", "--lr", "5e-3", "--seed", "7"]

    out = tmp_path / "b" / "ball.safetensors"
    run_dir = tmp_path / "b" / "ball-run"
    child = subprocess.Popen([sys.executable, "-m", "cli", *args(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any((run_dir / "checkpoints").glob("step-*/state.json")) and time.monotonic() < deadline:
        assert child.poll() is None
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)  # what docker stop, Slurm and Kubernetes send first
    straight = invoke(*args(tmp_path / "a" / "ball.safetensors"), env=env)  # the reference, meanwhile
    code = child.wait(timeout=300)
    stderr = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    assert straight.exit_code == 0, straight.output
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by SIGTERM after step" in errors[0] and "--resume" in errors[0]
    stopped_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert f"after step {stopped_at};" in errors[0] and 2 <= stopped_at < 10  # the step it was on was saved
    resumed = invoke(*args(out), "--resume", env=env)
    assert resumed.exit_code == 0, resumed.output
    assert out.read_bytes() == (tmp_path / "a" / "ball.safetensors").read_bytes()


def test_ctrl_c_during_the_final_grid_says_the_weights_are_kept_and_resume_writes_the_file(tmp_path):
    def press_ctrl_c(event):
        if event.stage == "validate" and event.step == 0:  # only the final grid: validation.every is 0
            raise KeyboardInterrupt

    config = small_config(tmp_path, **{"train.steps": 3})
    with pytest.raises(TrainingError, match=r"interrupted \(Ctrl-C\) after the last step, before '.*ball.safetensors' "
                                            r"was written\. The trained weights are kept .*--resume to write the file"):
        try:
            train(config, progress=press_ctrl_c)
        except KeyboardInterrupt:  # escaping, it would end the pytest session rather than fail this test
            pytest.fail("the KeyboardInterrupt escaped train() without a message")
    assert checkpoint_names(tmp_path / "ball-run") == ["step-000002", "step-000003"]
    assert not Path(config.output.path).exists()
    stages = []
    train(small_config(tmp_path, **{"train.steps": 3, "train.resume": True}), progress=lambda e: stages.append(e.stage))
    assert "train" not in stages and read_lora_file(config.output.path).unet_modules == 48  # written, not retrained


# ----------------------------------------------------------------------------------------------
# 4. Special files named like images


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    smooth_image(0).save(folder / "good.png")
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    os.mkfifo(folder / "good.txt")  # a FIFO where a caption would be: not read either
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    results = []
    worker = threading.Thread(target=lambda: results.append(invoke("check-images", folder, "--resolution", "64")),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # let the stuck reader go (a writer that closes at once), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("check-images waited on a FIFO")
    result = results[0]
    assert result.exit_code == 0 and "not a regular file (a pipe, socket or device)" in result.output
    assert "a broken link" in result.output
    images = preflight_training_data(load_config(None, {"data.instance_dir": str(folder), "data.class_word": "ball",
                                                        "output.path": "x.safetensors", "prior.enabled": False}).data,
                                     SimpleNamespace(enabled=False, class_dir=None))
    assert images.instance.usable == [folder / "good.png"]


# ----------------------------------------------------------------------------------------------
# 5. Text is checked where it enters


def test_braces_in_a_caption_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    smooth_image(0).save(folder / "01.png")
    (folder / "01.txt").write_text("a {cute} ball")
    monkeypatch.setattr(train_module, "load_base_model", no_model)
    line = error_line(invoke("train", folder, "--class-word", "ball", "--out", tmp_path / "x.safetensors"))
    assert "caption" in line and "01.txt" in line and "unknown placeholder '{cute}'" in line
    assert not (tmp_path / "x-run").exists()
    assert "01.txt" in error_line(invoke("train", folder, "--class-word", "ball", "--out", tmp_path / "x.safetensors",
                                         "--dry-run"))
    (folder / "01.txt").write_text("a {{cute}} {token} {class}")  # literal braces and the placeholders are fine
    from dreamlora.data import instance_set

    assert instance_set(load_config(None, {"data.instance_dir": str(folder), "data.class_word": "ball",
                                           "output.path": "x.safetensors"}).data).prompts == ["a {cute} sks ball"]


@pytest.mark.parametrize("encoding, expected", [
    ("utf-16", "is UTF-16 text"),
    ("utf-16-le", "holds NUL bytes"),
    ("latin-1", "is not UTF-8 text (byte 0xe9 at offset 5"),
    ("cp1252", "is not UTF-8 text (byte 0xe9 at offset 5"),
])
def test_captions_in_other_encodings_are_errors_naming_the_file(tmp_path, encoding, expected):
    folder = tmp_path / "photos"
    folder.mkdir()
    smooth_image(0).save(folder / "01.png")
    (folder / "01.txt").write_bytes("a caf\u00e9 sks ball".encode(encoding))
    line = error_line(invoke("check-images", folder, "--resolution", "64"))
    assert "01.txt" in line and expected in line and "Save it as UTF-8" in line


def test_utf8_captions_with_a_byte_order_mark_are_read(tmp_path):
    from dreamlora.data import caption_for

    (tmp_path / "01.txt").write_bytes("\ufeffa caf\u00e9 sks ball\n".encode("utf-8"))
    assert caption_for(tmp_path / "01.png") == "a caf\u00e9 sks ball"


def test_a_config_built_in_python_is_checked_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_base_model", no_model)
    config = small_config(tmp_path)
    config.lora.alpha = float("inf")
    config.validation.prompts = ["a photo of {token} {cute}"]  # found before training, not after its last step
    with pytest.raises(ConfigError) as info:
        train(config)
    assert "lora.alpha (flag --alpha) must be a finite number" in str(info.value)
    assert "unknown placeholder '{cute}'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_attribute_and_index_placeholders_are_one_line_errors(tmp_path):
    for prompt in ("a {token.upper} ball", "a {class[0]} ball", "a {token!r}", "a {} ball", "a } ball"):
        line = error_line(invoke("sample", "--prompt", prompt, "--out", tmp_path / "grid.png"))
        assert prompt in line
        line = error_line(invoke("train", INSTANCES, "--class-word", "ball", "--out", tmp_path / "x.safetensors",
                                 "--validation-prompt", prompt, "--dry-run"))
        assert "validation.prompts" in line and prompt in line
    assert list(tmp_path.iterdir()) == []


def test_prompts_longer_than_the_text_encoder_reads_are_warned_about(tmp_path, tiny_sd):
    from dreamlora.preflight import prompt_length_warnings

    long = "a photo of sks ball " + "on a bright green meadow under a clear blue sky " * 8
    warnings = prompt_length_warnings({"--prompt": long, "short": "a photo of sks ball"}, tiny_sd.tokenizers[0])
    count = len(tiny_sd.tokenizers[0](long)["input_ids"])
    assert len(warnings) == 1 and f"--prompt is {count} tokens long and the text encoder reads 77" in warnings[0]
    result = invoke("sample", "--model", "builtin:tiny-sd", "--prompt", long, "--steps", "1", "--seeds", "0",
                    "--out", tmp_path / "grid.png")
    assert result.exit_code == 0 and f"is {count} tokens long" in result.stderr


# ----------------------------------------------------------------------------------------------
# 6. Malformed LoRA files (the table of generated ones is in test_reliability_fuzz.py)


def test_malformed_lora_structure_is_one_line_naming_the_key(tmp_path):
    module = "lora_unet_x_to_q"
    cases = {
        "scalar-down": ({f"{module}.lora_down.weight": torch.tensor(1.0), f"{module}.lora_up.weight": torch.ones(8, 4)},
                        f"'{module}.lora_down.weight' has shape ()"),
        "two-alphas": ({f"{module}.lora_down.weight": torch.ones(4, 8), f"{module}.lora_up.weight": torch.ones(8, 4),
                        f"{module}.alpha": torch.tensor([1.0, 2.0])}, f"'{module}.alpha' has shape (2,)"),
        "nan": ({f"{module}.lora_down.weight": torch.full((4, 8), float("nan")),
                 f"{module}.lora_up.weight": torch.ones(8, 4)}, f"'{module}.lora_down.weight' holds NaN or inf values"),
    }
    for name, (tensors, expected) in cases.items():
        path = kohya_file(tmp_path / f"{name}.safetensors", tensors)
        for args in (["inspect", path], ["sample", "--lora", path, "--prompt", "x", "--out", tmp_path / "g.png"]):
            line = error_line(invoke(*args))
            assert f"{name}.safetensors' is malformed: {expected}" in line, line
    for config, expected in (("[1, 2]", "is a JSON array"), ('"text"', "is a JSON string"),
                             ('{"data": ["sks"]}', "section 'data' is a JSON array")):
        path = kohya_file(tmp_path / "meta.safetensors", metadata={"dreamlora.config": config})
        assert expected in error_line(invoke("inspect", path))
    assert not (tmp_path / "g.png").exists()


# ----------------------------------------------------------------------------------------------
# 7. sample checks its flags, its output and the file before rendering


def test_sample_refuses_a_read_only_out_before_loading_the_model(tmp_path, monkeypatch):
    import dreamlora.models

    monkeypatch.setattr(dreamlora.models, "load_base_model", no_model)
    with read_only_folder(tmp_path / "ro") as folder:
        line = error_line(invoke("sample", "--prompt", "a ball", "--out", folder / "grids" / "grid.png"))
        assert f"cannot write '{folder / 'grids' / 'grid.png'}'" in line and "--out" in line
    (tmp_path / "file").write_text("x")
    line = error_line(invoke("sample", "--prompt", "a", "--out", tmp_path / "file" / "g.png"))
    assert "is a file, not a folder" in line
    assert "is a folder" in error_line(invoke("sample", "--prompt", "a", "--out", tmp_path))


def test_sample_refuses_a_nan_lora_before_loading_the_model(tmp_path, monkeypatch):
    import dreamlora.models

    monkeypatch.setattr(dreamlora.models, "load_base_model", no_model)
    module = "lora_unet_x_to_q"
    path = kohya_file(tmp_path / "nan.safetensors", {f"{module}.lora_down.weight": torch.zeros(4, 8),
                                                      f"{module}.lora_up.weight": torch.full((8, 4), float("inf"))})
    line = error_line(invoke("sample", "--lora", path, "--prompt", "a", "--out", tmp_path / "g.png"))
    assert "nan.safetensors' is malformed" in line and f"'{module}.lora_up.weight' holds NaN or inf" in line


def test_sample_from_python_checks_values_as_the_flags_are_checked(tmp_path):
    from dreamlora import sample

    for settings, expected in ((SampleSettings(prompts=["a"], scales=[float("nan")]), "--scales: must be a finite"),
                               (SampleSettings(prompts=["a"], seeds=[2**64]), "--seeds must be <="),
                               (SampleSettings(prompts=["a"], guidance=float("inf")), "--guidance: must be a finite")):
        with pytest.raises(ConfigError, match=expected):
            sample(None, settings, tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == []


def test_eval_refuses_a_read_only_grid_before_rendering(tmp_path, monkeypatch):
    import dreamlora.models

    monkeypatch.setattr(dreamlora.models, "load_base_model", no_model)
    lora = kohya_file(tmp_path / "x.safetensors", metadata={"dreamlora.config": json.dumps(
        {"data": {"token": "sks", "class_word": "ball"}, "model": {"name": "builtin:tiny-sd"}})})
    with read_only_folder(tmp_path / "ro") as folder:
        line = error_line(invoke("eval", lora, "--grid", folder / "grid.png", "--no-oracle"))
    assert "cannot write" in line and "--grid" in line


# ----------------------------------------------------------------------------------------------
# 8. Advice that fits the run


def test_nan_message_names_the_alpha_when_alpha_over_rank_is_extreme(tmp_path, monkeypatch):
    from dreamlora.losses import LossParts, prior_preservation_loss

    def loss_that_explodes(*args, **kwargs):
        parts = prior_preservation_loss(*args, **kwargs)
        return LossParts(parts.total * float("nan"), parts.instance, parts.prior)

    monkeypatch.setattr(train_module, "prior_preservation_loss", loss_that_explodes)
    with pytest.raises(TrainingError) as info:
        train(small_config(tmp_path, **{"lora.alpha": 1e6, "lora.rank": 4, "train.learning_rate": 1e-4,
                                        "train.steps": 2}))
    message = str(info.value)
    assert "--alpha 1e+06 at --rank 4 multiplies the adapters' output by 250000: lower --alpha" in message
    assert "--lr" not in message  # the rate is the default's: blaming it would mislead


def test_priors_refuses_non_finite_and_negative_numbers(tmp_path):
    for flag, value in (("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-1"), ("--seed", "-1"),
                        ("--resolution", "-64")):
        line = error_line(invoke("priors", "--class-prompt", "a ball", "--out", tmp_path / "p", flag, value))
        assert flag in line
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------
# 9. --overwrite deletes only what runs wrote


def test_overwrite_keeps_files_dreamlora_did_not_write(tmp_path):
    run_dir = tmp_path / "mine"
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-000002").mkdir(parents=True)
    for name in ("adapter.safetensors", "optimizer.safetensors", "state.json"):
        (ckpt / "step-000002" / name).write_text("{}")
    (ckpt / "step-000004").mkdir()
    (ckpt / "step-000004" / "state.json").write_text("{}")
    (ckpt / "step-000004" / "why.txt").write_text("the user's note on this checkpoint")
    (ckpt / ".step-000006.abc").mkdir()  # a half-written checkpoint a SIGKILL left
    (ckpt / "notes.txt").write_text("the user's notes")
    (run_dir / "validation").mkdir()
    (run_dir / "validation" / "step-000002.png").write_bytes(b"png")
    (run_dir / "validation" / "favourite.png").write_bytes(b"png")
    (run_dir / "plan.md").write_text("my plan")
    config = small_config(tmp_path, **{"train.run_dir": str(run_dir), "output.overwrite": True})
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    assert train_module.prepare_run_dir(config, run_dir, accelerator) == 0
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert left == ["checkpoints", "checkpoints/notes.txt", "checkpoints/step-000004",
                    "checkpoints/step-000004/why.txt", "plan.md", "validation", "validation/favourite.png"]
    assert checkpoints.latest_checkpoint(run_dir) is None  # nothing of the earlier run is resumed


# ----------------------------------------------------------------------------------------------
# 10. Outputs honour the umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_the_umask_gives_new_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        result = train(small_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 1}))
        from dreamlora.sampling import save_png

        save_png(Image.new("RGB", (8, 8)), tmp_path / "class" / "00000.png")  # how class images and grids are saved
    finally:
        os.umask(previous)
    files = [result.output, result.validation_grid, result.run_dir / "run.json", tmp_path / "class" / "00000.png",
             *(result.run_dir / "checkpoints" / "step-000002").iterdir()]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((result.run_dir / "checkpoints" / "step-000002").stat().st_mode) == 0o777 & ~umask


# ----------------------------------------------------------------------------------------------
# 11. No local path in the stored config


def test_stored_config_holds_file_names_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"data.instance_dir": "clients/acme/photos", "data.class_word": "dog",
                                "output.path": "fk/ref.safetensors", "train.run_dir": "runs/acme/",
                                "prior.class_dir": "../shared/dogs", "model.vae": "local/vaes/fixed-vae",
                                "model.name": "stabilityai/sd-x"})
    stored = json.loads(to_portable_json(config))
    assert stored["output"]["path"] == "ref.safetensors" and stored["data"]["instance_dir"] == "photos"
    assert stored["train"]["run_dir"] == "acme" and stored["prior"]["class_dir"] == "dogs"
    assert stored["model"]["vae"] == "fixed-vae"  # a relative path, not a hub id (two slashes)
    assert stored["model"]["name"] == "stabilityai/sd-x"  # a hub id stays
    assert "clients" not in to_portable_json(config) and "fk/" not in to_portable_json(config)


# ----------------------------------------------------------------------------------------------
# 12. Every photo format the installed Pillow reads


def test_avif_photos_are_images_and_missing_plugins_are_named(tmp_path):
    from PIL import features

    folder = tmp_path / "photos"
    folder.mkdir()
    if not features.check("avif"):
        pytest.skip("this Pillow was built without AVIF")
    smooth_image(0).save(folder / "phone.avif")
    report = preflight(folder, "instance", 64)
    assert [f.path.name for f in report.files if f.status == "ok"] == ["phone.avif"]
    try:  # pillow-heif is not a dependency; where it is installed, a real HEIC file would be decoded instead
        import pillow_heif  # noqa: F401
    except ImportError:
        (folder / "iphone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)  # a HEIC header
        line = error_line(invoke("check-images", folder, "--resolution", "64"))
        assert "'iphone.heic' cannot be read: it is a HEIC image" in line and "install pillow-heif" in line


# ----------------------------------------------------------------------------------------------
# The documentation names only tests that exist


def test_every_test_docs_reliability_names_exists():
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    files = {"faults": "tests/test_reliability_faults.py", "fuzz": "tests/test_reliability_fuzz.py",
             None: "tests/test_reliability.py"}
    named = re.findall(r"`(?:(faults|fuzz|tests/[\w/]+\.py)::)?(test_\w+)`", doc)
    assert len(named) > 50
    for where, name in named:
        source = (ROOT / files.get(where or None, where)).read_text(encoding="utf-8")
        assert f"def {name}(" in source, f"docs/reliability.md names {where or 'test_reliability'}::{name}"
