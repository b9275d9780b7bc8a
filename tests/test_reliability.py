"""Never lose work, never crash on a user's files: one test per bad input, interruption and failure.

Each bad-input test builds its own folder, runs the command the way a user does (CliRunner, in
process) and checks the outcome: exit code 1 with one `error:` line naming the file, or the file
handled correctly; never a traceback. docs/reliability.md maps each guarantee to its test here.
"""

from __future__ import annotations

import ast
import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dreamlora import load_config, train
from dreamlora import preflight as preflight_module
from dreamlora.errors import ConfigError, DataError, TrainingError
from dreamlora.lora import read_lora_file
from dreamlora.preflight import load_rgb, preflight, token_warnings

train_module = importlib.import_module("dreamlora.training")
ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"
runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# Helpers


def invoke(*args, env=None):
    """Run the CLI in process; a traceback (any exception but SystemExit) fails the test."""
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def error_line(result) -> str:
    """The one `error:` line of a failed command."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def smooth_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A photo-like picture: low-frequency colour blobs (so perceptual hashes are stable)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def photos(tmp_path: Path, name: str = "photos") -> Path:
    """A folder holding one good image, to which a test adds its bad file."""
    folder = tmp_path / name
    folder.mkdir()
    smooth_image(0).save(folder / "good.png")
    return folder


def check(folder: Path, *flags):
    return invoke("check-images", folder, "--resolution", "64", *flags)


# ----------------------------------------------------------------------------------------------
# 1. Image preflight: one test per bad input


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    folder = photos(tmp_path)
    smooth_image(1).save(folder / "cut.jpg", quality=90)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    line = error_line(check(folder))
    assert "'cut.jpg' cannot be read: image file is truncated" in line and "1 of 2 images" in line


def test_zero_byte_file_is_an_error(tmp_path):
    folder = photos(tmp_path)
    (folder / "empty.jpg").touch()
    assert "'empty.jpg' cannot be read: the file is empty (0 bytes)" in error_line(check(folder))


def test_text_file_named_png_is_an_error(tmp_path):
    folder = photos(tmp_path)
    (folder / "notes.png").write_text("not a picture\n")
    assert "'notes.png' cannot be read: its contents are not an image format" in error_line(check(folder))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    folder = photos(tmp_path)
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "print.jpg")
    result = check(folder, "--verbose")
    assert result.exit_code == 0 and "CMYK converted to RGB" in result.output
    assert load_rgb(folder / "print.jpg").getpixel((5, 5)) == pytest.approx((255, 0, 0), abs=3)


def test_16_bit_png_is_reduced_to_8_bit(tmp_path):
    folder = photos(tmp_path)
    Image.fromarray(np.full((64, 64), 0x8000, dtype=np.uint16)).save(folder / "scan.png")
    assert Image.open(folder / "scan.png").mode == "I;16"
    result = check(folder, "--verbose")
    assert result.exit_code == 0 and "16-bit" in result.output
    assert load_rgb(folder / "scan.png").getpixel((0, 0)) == (128, 128, 128)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    folder = photos(tmp_path)
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))  # right half red, left half the transparent index 0 (black)
    image.save(folder / "logo.png", transparency=0)
    result = check(folder, "--verbose")
    assert result.exit_code == 0 and "composited on white" in result.output
    rgb = load_rgb(folder / "logo.png")
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255) and rgb.getpixel((60, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    folder = photos(tmp_path)
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portrait photos
    image.save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    result = check(folder, "--verbose")
    assert result.exit_code == 0 and "EXIF orientation (6)" in result.output
    upright = load_rgb(folder / "phone.jpg")  # what training reads
    assert upright.size == (40, 80)
    assert upright.getpixel((20, 10))[0] > 200 and upright.getpixel((20, 70))[2] > 200  # red on top, blue below


def test_mpo_and_animated_gif_give_their_first_frame(tmp_path):
    folder = photos(tmp_path)
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(folder / "stereo.mpo", format="MPO", save_all=True, append_images=frames[1:2])
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(folder / "stereo.mpo").n_frames == 2 and Image.open(folder / "anim.gif").n_frames == 3
    result = check(folder, "--verbose")
    assert result.exit_code == 0 and "first of 2 frames used (MPO)" in result.output
    assert "first of 3 frames used (GIF)" in result.output
    assert load_rgb(folder / "stereo.mpo").getpixel((5, 5)) == pytest.approx((255, 0, 0), abs=3)
    assert load_rgb(folder / "anim.gif").getpixel((5, 5)) == (255, 0, 0)


def test_tiny_image_is_an_error_and_small_ones_a_warning(tmp_path):
    folder = photos(tmp_path)
    smooth_image(2, (16, 16)).save(folder / "thumb.png")
    assert "'thumb.png' is 16x16: its short side is below the 32 px minimum" in error_line(check(folder))
    (folder / "thumb.png").unlink()
    smooth_image(3, (48, 40)).save(folder / "small.png")
    result = check(folder)
    assert result.exit_code == 0 and "upscaled 1.6x to 64 px" in result.output
    # Relative to the resolution: at 512 px the floor is 512 / 4 = 128 px.
    line = error_line(invoke("check-images", folder, "--resolution", "512"))
    assert "'good.png' is 96x96: its short side is below 128 px" in line and "'small.png'" in line


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    folder = photos(tmp_path)
    smooth_image(4, (200, 100)).save(folder / "huge.png")
    monkeypatch.setattr(preflight_module, "MAX_IMAGE_PIXELS", 15_000)  # stands in for the 64 MP limit
    line = error_line(check(folder))
    assert "'huge.png' is 200x100" in line and "possible decompression bomb" in line
    # PIL's own guard (past twice its limit) is mapped to the same kind of message.
    monkeypatch.setattr(preflight_module, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    assert "'huge.png' is too large to decode safely" in error_line(check(folder))


def test_exact_and_near_duplicates_are_warnings(tmp_path):
    folder = photos(tmp_path)
    smooth_image(0).save(folder / "good2.bmp")  # same pixels, other container
    smooth_image(0, (128, 128)).resize((90, 90)).save(folder / "good3.jpg", quality=80)  # resized, re-encoded
    smooth_image(5).save(folder / "other.png")
    result = check(folder)
    assert result.exit_code == 0
    report = {f.path.name: f for f in preflight(folder, "instance", 64).files}
    assert report["good2.bmp"].notes == ["is an exact duplicate of 'good.png' (same pixels)"]
    assert report["good3.jpg"].status == "warning"
    assert "is a near duplicate of 'good.png'" in report["good3.jpg"].notes[0]
    assert report["other.png"].status == "ok" and report["good.png"].status == "ok"
    # flat pictures of different colours share a difference hash but are not duplicates
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(folder / "blue.png")
    report = {f.path.name: f for f in preflight(folder, "instance", 64).files}
    assert report["red.png"].status == "ok" and report["blue.png"].status == "ok"


def test_hidden_and_non_image_files_are_skipped_with_a_note(tmp_path):
    folder = photos(tmp_path)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._good.png").write_bytes(b"\0\5\26\7")  # macOS resource fork beside the photo
    (folder / "model.pdf").write_bytes(b"%PDF-1.4")
    (folder / "good.txt").write_text("a photo of sks ball\n")  # a caption: passed over silently
    (folder / "raw").mkdir()
    result = check(folder)
    assert result.exit_code == 0
    assert result.output.count("skipped") >= 4 and "hidden file" in result.output
    assert "not an image (.pdf)" in result.output and "sub-folders are not searched" in result.output
    assert "good.txt" not in result.output


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty' has no images" in error_line(check(tmp_path / "empty"))
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    assert "empty' has no images" in error_line(check(tmp_path / "empty"))
    assert "does not exist" in error_line(check(tmp_path / "missing"))


def test_check_images_help_names_its_flags():
    result = invoke("check-images", "--help", env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0 and "--resolution" in result.output and "--verbose" in result.output


def test_training_refuses_bad_images_before_any_model_loads(tmp_path, monkeypatch):
    instance, classes = photos(tmp_path, "photos"), photos(tmp_path, "dogs")
    (instance / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    (classes / "empty.png").touch()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the images were checked")

    monkeypatch.setattr(train_module, "load_base_model", no_model)
    line = error_line(invoke("train", instance, "--class-word", "dog", "--out", tmp_path / "x.safetensors",
                             "--class-dir", classes))
    assert "instance folder" in line and "'cut.jpg' cannot be read" in line
    assert "class folder" in line and "'empty.png' cannot be read" in line  # both folders, one message
    assert not (tmp_path / "x-run").exists()


# ----------------------------------------------------------------------------------------------
# 2. Token and prompt


def test_token_warnings(tiny_sd):
    tokenizer = tiny_sd.tokenizers[0]
    assert token_warnings("sks", "dog", tokenizer) == []
    assert "is a class noun" in token_warnings("cat", "dog", tokenizer)[0]
    assert "is a common English word" in token_warnings("Red", "dog", tokenizer)[0]
    pieces = token_warnings("qzvxkjw", "dog", tokenizer)
    assert len(pieces) == 1 and "splits into" in pieces[0] and "tokenizer pieces" in pieces[0]
    assert any("contains the class word" in w for w in token_warnings("sksdog", "dog", tokenizer))


def test_token_and_prompt_errors_are_reported_together():
    base = {"data.instance_dir": "photos", "output.path": "x.safetensors"}
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base, "data.class_word": "dog", "data.token": ""})
    assert "data.token (flag --token) must not be empty" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base, "data.class_word": "dog", "data.token": "Dog"})
    assert "must differ from the class word" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, {**base, "data.class_word": "dog", "data.token": "my dog",
                           "data.instance_prompt": "a photo of a dog", "data.class_prompt": "a photo of {token}"})
    message = str(info.value)
    assert "data.token (flag --token) must be one word" in message
    assert "data.instance_prompt (flag --instance-prompt) must contain {token}" in message
    assert "data.class_prompt (flag --class-prompt) must not contain the token" in message
    # punctuation next to the token is fine
    assert load_config(None, {**base, "data.class_word": "dog", "data.instance_prompt": "photo of sks, a dog"})


# ----------------------------------------------------------------------------------------------
# 3. Config and flags


def test_type_errors_and_value_errors_are_reported_at_once(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nstep = 5\nlearning_rate = -1\n[output]\nformat = "ckpt"\nsave_dtype = "fp8"\n'
                    '[validation]\nsteps = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(toml, {"data.instance_dir": "photos", "data.class_word": "dog", "output.path": "x.safetensors",
                           "lora.rank": "four"})
    message = str(info.value)
    for expected in ("unknown config key 'train.step'; did you mean 'train.steps'",
                     "train.learning_rate (flag --lr) must be > 0",
                     "output.format (flag --format): must be one of kohya, diffusers (got 'ckpt')",
                     "output.save_dtype (flag --save-dtype): must be one of fp16, bf16, fp32 (got 'fp8')",
                     "validation.steps (flag --validation-steps) must be > 0",
                     "lora.rank (flag --rank): must be a whole number"):
        assert expected in message
    assert "lora.rank (flag --rank) must be > 0" not in message  # the unreadable value is reported once
    assert message.startswith("6 configuration problems")


def test_class_dir_must_not_be_the_instance_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"prior.class_dir \(flag --class-dir\) must not be the instance folder"):
        load_config(None, {"data.instance_dir": str(tmp_path), "prior.class_dir": f"{tmp_path}/.",
                           "data.class_word": "dog", "output.path": "x.safetensors"})


# ----------------------------------------------------------------------------------------------
# Tiny trainings (builtin:tiny-sd, no prior, a 1-step validation grid)


def small_config(tmp_path: Path, name: str = "ball", **overrides):
    values = {"model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "prior.enabled": False,
              "output.path": str(tmp_path / f"{name}.safetensors"), "train.steps": 4, "train.learning_rate": 5e-3,
              "train.checkpoint_every": 2, "validation.steps": 1, "validation.seeds": [0],
              "validation.prompts": ["a photo of {token} {class}"]}
    values.update(overrides)
    return load_config(None, values)


def quick_validation_toml(tmp_path: Path) -> Path:
    """For CLI runs: a one-step, one-image validation grid (flags do not reach these keys)."""
    path = tmp_path / "quick.toml"
    path.write_text('[validation]\nsteps = 1\nseeds = [0]\nprompts = ["a photo of {token} {class}"]\n')
    return path


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (atomic writes name them .<target>.*) anywhere under `folder`."""
    return [str(p) for p in folder.rglob(".*")]


def test_preflight_notes_and_token_warnings_reach_the_progress_callback(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(INSTANCES, folder, ignore=shutil.ignore_patterns("*.toml", "*.md"))
    shutil.copy(folder / "01.png", folder / "06.png")
    (folder / ".DS_Store").write_bytes(b"x")
    smooth_image(6, (48, 48)).save(folder / "07.png")
    events = []
    train(small_config(tmp_path, **{"data.instance_dir": str(folder), "data.token": "red", "train.steps": 1}),
          progress=events.append)
    notes = [e.message for e in events if e.stage == "note"]
    assert any(".DS_Store" in n and "hidden file" in n for n in notes)
    assert any("'06.png' is an exact duplicate of '01.png'" in n for n in notes)
    assert any("'07.png' is 48x48: upscaled 1.3x to 64 px" in n for n in notes)
    assert any("--token 'red' is a common English word" in n for n in notes)


# ----------------------------------------------------------------------------------------------
# 4. Exact resume: Ctrl-C in process, SIGKILL from outside


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_ctrl_c_saves_the_step_the_weights_hold_and_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    settings = {"train.checkpoint_every": 2, "validation.every": 3}
    straight = train(small_config(tmp_path / "a", **settings))

    def press_ctrl_c(event):
        if event.stage == "validate" and event.step == 0:  # the grid after step 3: weights hold 3 steps
            raise KeyboardInterrupt

    with pytest.raises(TrainingError, match=r"interrupted \(Ctrl-C\) after step 3; .*--resume"):
        train(small_config(tmp_path / "b", **settings), progress=press_ctrl_c)
    run_dir = tmp_path / "b" / "ball-run"
    assert checkpoint_names(run_dir) == ["step-000002", "step-000003"]
    assert not (tmp_path / "b" / "ball.safetensors").exists()
    started = json.loads((run_dir / "run.json").read_text())["started"]
    resumed = train(small_config(tmp_path / "b", **settings, **{"train.resume": True}))
    a, b = read_lora_file(straight.output), read_lora_file(resumed.output)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert b.metadata["modelspec.date"] == started  # the run's start, kept across the resume
    assert json.loads(b.metadata["dreamlora.config"])["train"].get("resume") is None  # run control is not stored


class KillWhenReady:
    """Start `python -m cli ARGS` and SIGKILL it from a watcher thread once `ready()` holds.

    SIGKILL leaves no chance to clean up (no finally, no atexit): what remains on disk is what a
    power cut or the OOM killer would leave. The test meanwhile runs the uninterrupted reference.
    """

    def __init__(self, args: list[str], ready, env: dict, timeout: float = 300.0):
        self.ready, self.killed, self.deadline = ready, False, time.monotonic() + timeout
        self.process = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while self.process.poll() is None and time.monotonic() < self.deadline:
            if self.ready():
                os.kill(self.process.pid, signal.SIGKILL)
                self.killed = True
                return
            time.sleep(0.02)

    def wait(self) -> None:
        self.watcher.join()
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait()
        stderr = self.process.stderr.read().decode(errors="replace")[-2000:]
        self.process.stderr.close()
        assert self.killed and code == -signal.SIGKILL, f"not killed mid-way (exit {code}): {stderr}"


def subprocess_env() -> dict:
    # The same torch thread count as this process: CPU kernels may sum in another order with another count.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "SOURCE_DATE_EPOCH": "1700000000",
            "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_sigkill_during_training_then_resume_is_byte_identical(tmp_path):
    config = quick_validation_toml(tmp_path)
    env = subprocess_env()

    def args(out):
        return ["train", str(INSTANCES), "--class-word", "ball", "--out", str(out), "--config", str(config),
                "--no-prior", "--steps", "10", "--checkpoint-every", "2", "--lr", "5e-3", "--seed", "7"]

    out = tmp_path / "b" / "ball.safetensors"
    run_dir = tmp_path / "b" / "ball-run"
    killer = KillWhenReady(args(out), lambda: any((run_dir / "checkpoints").glob("step-*/state.json")), env)
    straight = invoke(*args(tmp_path / "a" / "ball.safetensors"), env=env)  # the reference, meanwhile
    assert straight.exit_code == 0, straight.output
    killer.wait()

    assert not out.exists()
    for folder in (run_dir / "checkpoints").glob("step-*"):  # every visible checkpoint is whole
        assert {p.name for p in folder.iterdir()} == {"adapter.safetensors", "optimizer.safetensors", "state.json"}
    killed_at = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert 2 <= killed_at < 10

    resumed = invoke(*args(out), "--resume", env=env)
    assert resumed.exit_code == 0, resumed.output
    assert out.read_bytes() == (tmp_path / "a" / "ball.safetensors").read_bytes()


@pytest.mark.slow
def test_sigkill_during_priors_then_rerun_matches_an_uninterrupted_run(tmp_path):
    env = subprocess_env()
    count = 10

    def args(out):
        return ["priors", "--class-prompt", "a photo of a ball", "--out", str(out), "--num-images", str(count),
                "--steps", "2", "--batch-size", "1", "--seed", "3"]

    folder = tmp_path / "b"
    killer = KillWhenReady(args(folder), lambda: len(list(folder.glob("[0-9]*.png"))) >= 2, env)
    assert invoke(*args(tmp_path / "a"), env=env).exit_code == 0  # the reference, meanwhile
    killer.wait()
    made = sorted(folder.glob("[0-9]*.png"))
    assert 2 <= len(made) < count
    for path in made:  # no partial image: each visible file decodes fully
        with Image.open(path) as image:
            image.load()

    assert invoke(*args(folder), env=env).exit_code == 0
    expected = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert sorted(p.name for p in folder.glob("*.png")) == expected == [f"{i:05d}.png" for i in range(count)]
    for name in expected:  # none missing, none duplicated, each the same bytes as the uninterrupted run's
        assert (folder / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert (folder / "manifest.json").read_bytes() == (tmp_path / "a" / "manifest.json").read_bytes()


# ----------------------------------------------------------------------------------------------
# 5. Atomic outputs, disk full, interrupted saves


def write_half_then(exc: BaseException):
    """A safetensors writer that leaves half a file behind, then fails like a full disk or a Ctrl-C."""

    def save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise exc

    return save_file


def test_disk_full_while_writing_the_file_is_one_clear_line_and_resume_writes_it(tmp_path, monkeypatch):
    out = tmp_path / "out" / "ball.safetensors"
    flags = ["train", INSTANCES, "--model", "builtin:tiny-sd", "--class-word", "ball", "--out", out, "--no-prior", "--steps", "2",
             "--config", quick_validation_toml(tmp_path)]
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", write_half_then(OSError(errno.ENOSPC, "No space left on device")))
        line = error_line(invoke(*flags))
    assert f"disk full while writing '{out}'" in line and "--resume" in line
    assert not out.exists() and leftovers(tmp_path) == []
    assert checkpoint_names(tmp_path / "out" / "ball-run") == ["step-000002"]  # the trained weights are kept
    assert invoke(*flags, "--resume").exit_code == 0  # ...and --resume writes the file without training again
    assert read_lora_file(out).unet_modules == 48


def test_disk_full_while_writing_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the second checkpoint's adapter
            raise OSError(errno.ENOSPC, "No space left on device")
        safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("dreamlora.checkpoints.save_file", save_file)
    with pytest.raises(TrainingError, match=r"disk full while writing '.*checkpoints' \(No space left on device\). Free "):
        train(small_config(tmp_path, **{"train.checkpoint_every": 1, "train.steps": 3}))
    assert checkpoint_names(tmp_path / "ball-run") == ["step-000001"]  # the good one stays, no partial one
    assert leftovers(tmp_path) == [] and not (tmp_path / "ball.safetensors").exists()


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_an_interrupted_save_leaves_no_partial_file_and_no_temp_files(tmp_path, monkeypatch):
    config = small_config(tmp_path, **{"train.steps": 2})
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", write_half_then(KeyboardInterrupt()))
        with pytest.raises(TrainingError, match=r"interrupted \(Ctrl-C\) after the last step.*--resume to write"):
            train(config)
    assert not Path(config.output.path).exists()
    assert leftovers(tmp_path) == []
    resumed = train(small_config(tmp_path, **{"train.steps": 2, "train.resume": True}))
    assert read_lora_file(resumed.output).unet_modules == 48


def test_priors_never_take_over_a_folder_of_other_images(tmp_path):
    from dreamlora.config import PriorConfig
    from dreamlora.identity import ModelIdentity
    from dreamlora.priors import prepare_prior_dir, prior_spec

    spec = prior_spec(PriorConfig(), "a photo of a ball", ModelIdentity("builtin:tiny-sd", "f"), 64, device="cpu",
                      dtype="fp32")
    smooth_image(0).save(tmp_path / "mine.png")
    with pytest.raises(DataError, match="already holds images that dreamlora did not make"):
        prepare_prior_dir(tmp_path, spec)
    assert (tmp_path / "mine.png").is_file()


# ----------------------------------------------------------------------------------------------
# 6. Numerics


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dreamlora.losses import LossParts, prior_preservation_loss

    calls = []

    def loss_that_explodes(*args, **kwargs):
        parts = prior_preservation_loss(*args, **kwargs)
        calls.append(1)
        return LossParts(parts.total * float("nan"), parts.instance, parts.prior) if len(calls) >= 3 else parts

    monkeypatch.setattr(train_module, "prior_preservation_loss", loss_that_explodes)
    with pytest.raises(TrainingError) as info:
        train(small_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 2}))
    message = str(info.value)
    assert "non-finite (NaN or inf) by step 4" in message and "a high learning rate (--lr 0.005): lower it" in message
    assert "last good checkpoint is" in message and "step-000002" in message
    assert checkpoint_names(tmp_path / "ball-run") == ["step-000002"]  # step 4 was never saved
    assert not (tmp_path / "ball.safetensors").exists() and leftovers(tmp_path) == []


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(train_module, "adapter_state_dict",
                        lambda unet, text_encoders: {"w": torch.tensor([1.0, float("inf")])})
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    config = small_config(tmp_path)
    with pytest.raises(TrainingError, match="the LoRA weights became non-finite"):
        train_module.save_step(tmp_path / "run", 3, SimpleNamespace(unet=None, text_encoders=[]), None, None,
                               config, {}, accelerator)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# 7. Safe loading


def python_sources() -> list[Path]:
    return sorted([*ROOT.glob("dreamlora/**/*.py"), *ROOT.glob("cli/**/*.py")])


def test_every_torch_load_is_weights_only_and_no_remote_code_is_trusted():
    for path in python_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            name = ast.unparse(node.func)
            if name == "torch.load":
                value = keywords.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"
            value = keywords.get("trust_remote_code")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{path}:{node.lineno}"


def test_malformed_lora_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b'{"__metadata__":')  # header longer than the file
    line = error_line(invoke("sample", "--lora", bad, "--prompt", "a photo", "--out", tmp_path / "grid.png"))
    assert "broken.safetensors" in line and "not a readable safetensors file" in line


def test_lora_that_does_not_fit_the_base_model_is_one_clear_line(tmp_path):
    # A kohya file for a model whose cross-attention is 64 wide: tiny-sd's to_k takes 32 inputs.
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{module}.lora_down.weight": torch.zeros(4, 64, dtype=torch.float16),
               f"{module}.lora_up.weight": torch.zeros(64, 4, dtype=torch.float16),
               f"{module}.alpha": torch.tensor(4.0)}
    lora = tmp_path / "other-model.safetensors"
    safetensors.torch.save_file(tensors, str(lora), metadata={"ss_network_dim": "4"})
    line = error_line(invoke("sample", "--lora", lora, "--model", "builtin:tiny-sd", "--prompt", "a photo", "--out",
                             tmp_path / "grid.png", "--steps", "1", "--seeds", "0"))
    assert "other-model.safetensors' does not fit the model 'builtin:tiny-sd'" in line and "--model" in line
    assert not (tmp_path / "grid.png").exists()
