"""End-to-end training on the built-in tiny models (random weights): files, formats, resume, sampling."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamlora import SampleSettings, load_config, sample, train
from dreamlora.errors import ConfigError, TrainingError
from dreamlora.lora import read_lora_file

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def tiny_config(tmp_path, name="ball", **overrides):
    values = {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp_path / f"{name}.safetensors"), "train.steps": 4, "train.learning_rate": 5e-3, "train.checkpoint_every": 2, "prior.num_class_images": 2,
        "prior.steps": 2, "validation.steps": 2, "validation.seeds": [0], "validation.prompts": ["a photo of {token} {class}"],
    }
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp_path)
    events = []
    result = train(config, progress=events.append)
    return config, result, events, tmp_path


def test_training_writes_one_kohya_file_with_metadata(trained):
    config, result, events, tmp_path = trained
    lora = read_lora_file(result.output)
    assert lora.format == "kohya" and lora.rank == 4 and lora.alpha == 4.0 and lora.dtype == torch.float16
    assert lora.unet_modules == 48 and lora.text_modules == 0  # 12 attention blocks' q, k, v, out
    meta = lora.metadata
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "ss_output_name", "ss_resolution", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.trigger_phrase",
                "modelspec.prediction_type", "modelspec.date", "dreamlora.config"):
        assert meta.get(key), key
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.trigger_phrase"] == "sks ball"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.prediction_type"] == "epsilon"
    text = " ".join(meta.values())
    assert str(tmp_path) not in text and str(ROOT) not in text and "/tmp" not in text  # no local paths


def test_progress_reports_instance_and_prior_loss_separately(trained):
    _, result, events, _ = trained
    logged = [e.metrics for e in events if e.stage == "train" and e.metrics]
    assert logged and {"loss", "instance_loss", "prior_loss", "lr"} <= set(logged[-1])
    last = logged[-1]
    assert last["loss"] == pytest.approx(last["instance_loss"] + 1.0 * last["prior_loss"], rel=1e-5)
    assert result.prior_loss is not None and result.prior_loss > 0
    assert [e.step for e in events if e.stage == "train"] == [1, 2, 3, 4]


def test_run_folder_has_checkpoints_and_a_validation_grid(trained):
    _, result, _, _ = trained
    steps = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]
    assert result.validation_grid.is_file()


def test_sampling_scale_zero_is_the_base_model_and_scale_one_is_not(trained, tmp_path):
    _, result, _, _ = trained
    settings = SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0, 1], scales=[0.0, 1.0], steps=2)
    with_lora = sample(result.output, settings, tmp_path / "grid.png")
    base_only = sample(None, SampleSettings(prompts=["a photo of sks ball"], seeds=[0, 1], steps=2), tmp_path / "base.png",
                       model="builtin:tiny-sd")
    images = [np.asarray(__import__("PIL.Image").Image.open(p)) for p in with_lora.images]
    base = [np.asarray(__import__("PIL.Image").Image.open(p)) for p in base_only.images]
    assert np.array_equal(images[0], base[0]) and np.array_equal(images[1], base[1])  # scale 0, seeds 0 and 1
    assert not np.array_equal(images[2], base[0])  # scale 1 changes the picture
    assert with_lora.sidecar.is_file() and with_lora.grid.is_file()
    from dreamlora.grid import grid_layout  # noqa: F401  (layout maths is tested in test_grid)
    from PIL import Image
    assert Image.open(with_lora.grid).size[0] > 2 * 128  # two seed columns of at least 128 px each


# slow: three trainings (21 s measured beside another job); kept out of the README's 4-minute test command
@pytest.mark.slow
def test_resume_continues_steps_and_randomness_exactly(tmp_path):
    straight = train(tiny_config(tmp_path / "a", "ball"))
    first = train(tiny_config(tmp_path / "b", "ball", **{"train.steps": 2}))
    Path(first.output).unlink()  # the 2-step file; the run folder keeps its checkpoint
    resumed = train(tiny_config(tmp_path / "b", "ball", **{"train.resume": True}))
    assert resumed.steps == 4
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_other_settings_is_refused(tmp_path):
    train(tiny_config(tmp_path, "ball", **{"train.steps": 2}))
    Path(tmp_path / "ball.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"other settings \(train.learning_rate"):
        train(tiny_config(tmp_path, "ball", **{"train.resume": True, "train.learning_rate": 1e-3}))


def test_existing_output_is_not_overwritten(trained):
    config, _, _, _ = trained
    with pytest.raises(ConfigError, match="already exists. Pass --overwrite"):
        train(config)


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_sd2_v_prediction_model_trains_and_records_its_family(tmp_path):
    result = train(tiny_config(tmp_path, "v", **{"model.name": "builtin:tiny-sd2", "train.steps": 2}))
    meta = read_lora_file(result.output).metadata
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"
    # The tiny SD 1.x model has the same widths, so the file loads there: only a note can say it is the wrong base.
    events = []
    settings = SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], steps=1)
    sample(result.output, settings, tmp_path / "grid.png", model="builtin:tiny-sd", progress=events.append)
    notes = [e.message for e in events if e.stage == "note"]
    assert notes == ["'v.safetensors' was trained on an sd_v2_v model and 'builtin:tiny-sd' is sd_v1: its pictures "
                     "may be off. Pass the --model it was trained on."]
    events.clear()
    sample(result.output, settings, tmp_path / "grid2.png", progress=events.append)  # its own model: no note
    assert not [e for e in events if e.stage == "note"]


def test_diffusers_format_text_encoder_and_8bit_adam(tmp_path):
    result = train(tiny_config(tmp_path, "te", **{"output.format": "diffusers", "lora.train_text_encoder": True,
                                                  "train.optimizer": "adamw8bit", "train.steps": 2,
                                                  "output.save_dtype": "fp32"}))
    lora = read_lora_file(result.output)
    assert lora.format == "diffusers" and lora.text_modules > 0 and lora.dtype == torch.float32
    settings = SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[0.0, 1.0], steps=2)
    grid = sample(result.output, settings, tmp_path / "grid.png")  # loads through diffusers' load_lora_weights
    from PIL import Image
    off, on = (np.asarray(Image.open(p)) for p in grid.images)
    assert not np.array_equal(off, on)


def test_bf16_on_a_cpu_without_bf16_kernels_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("dreamlora.training")
    monkeypatch.setattr(train_module, "cpu_runs_bf16_natively", lambda: False)
    monkeypatch.setattr(train_module, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"train.mixed_precision \(flag --mixed-precision\): bf16 on this CPU"):
        train(tiny_config(tmp_path, **{"train.mixed_precision": "bf16"}))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(tiny_config(tmp_path, **{"train.mixed_precision": "fp16"}))


def test_the_bf16_probe_agrees_with_the_cpu_flags():
    import platform

    from dreamlora.training import cpu_runs_bf16_natively

    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        pytest.skip("reads x86 Linux CPU flags")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert cpu_runs_bf16_natively() == ("avx512bw" in flags and "avx512vl" in flags)


def test_training_leaves_the_callers_random_state_as_it_was(tmp_path):
    """LoRA dropout draws from the global generator, seeded per step: the caller's stream must continue unchanged."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train(tiny_config(tmp_path, **{"train.steps": 2, "lora.dropout": 0.1, "prior.enabled": False}))
    assert torch.equal(torch.rand(3), expected)


def copy_of_tiny_sd(folder: Path) -> Path:
    import shutil

    from dreamlora.models import builtin_model_dir

    shutil.copytree(builtin_model_dir("tiny-sd"), folder)
    return folder


def test_resume_on_changed_weights_or_photos_is_refused_naming_what_changed(tmp_path):
    from safetensors.torch import load_file as load, save_file

    model = copy_of_tiny_sd(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(INSTANCES.glob("*.png")):
        (photos / p.name).write_bytes(p.read_bytes())
    config = {"model.name": str(model), "data.instance_dir": str(photos), "train.steps": 2,
              "prior.enabled": False}
    train(tiny_config(tmp_path, **config))
    (tmp_path / "ball.safetensors").unlink()
    resume = {**config, "train.steps": 4, "train.resume": True}

    weights = next(model.glob("unet/*.safetensors"))
    state = load(weights)
    key = sorted(state)[len(state) // 2]  # a tensor in the middle of the file
    state[key] = state[key] + 1e-3
    save_file(state, str(weights))
    with pytest.raises(TrainingError, match=r"cannot be continued: the base model's weights differ \(model.name "
                                            r"\(flag --model\)\).*--overwrite"):
        train(tiny_config(tmp_path, **resume))

    copy_of_tiny_sd(tmp_path / "model2")
    image = photos / "03.png"
    image.write_bytes(image.read_bytes()[:-12] + bytes(12))  # same name, other bytes (the PNG end chunk)
    with pytest.raises(TrainingError, match=r"the instance photos or their captions differ") as error:
        train(tiny_config(tmp_path, **{**resume, "model.name": str(tmp_path / "model2")}))
    assert "weights differ" not in str(error.value)  # an unchanged copy of the model is the same model


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_a_longer_cosine_schedule_is_refused_and_a_longer_constant_one_continues(tmp_path):
    base = {"train.steps": 2, "prior.enabled": False, "train.checkpoint_every": 2}
    train(tiny_config(tmp_path / "cos", **base, **{"train.lr_scheduler": "cosine"}))
    (tmp_path / "cos" / "ball.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"train.steps \(flag --steps\) changed from 2 to 4, which reshapes the "
                                            r"cosine learning-rate schedule"):
        train(tiny_config(tmp_path / "cos", **{**base, "train.lr_scheduler": "cosine", "train.steps": 4,
                                               "train.resume": True}))
    train(tiny_config(tmp_path / "const", **base))
    (tmp_path / "const" / "ball.safetensors").unlink()
    assert train(tiny_config(tmp_path / "const", **{**base, "train.steps": 4, "train.resume": True})).steps == 4


def test_no_final_grid_skips_the_end_of_run_rendering(tmp_path):
    result = train(tiny_config(tmp_path, **{"train.steps": 1, "prior.enabled": False, "validation.final": False}))
    assert result.validation_grid is None and result.output.is_file()
    assert not (result.run_dir / "validation").exists()


def test_a_diffusers_file_on_another_family_gets_the_same_note(tmp_path):
    result = train(tiny_config(tmp_path, "v", **{"model.name": "builtin:tiny-sd2", "train.steps": 1,
                                                 "output.format": "diffusers", "prior.enabled": False}))
    events = []
    sample(result.output, SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[1.0], steps=1),
           tmp_path / "grid.png", model="builtin:tiny-sd", progress=events.append)
    notes = [e.message for e in events if e.stage == "note"]
    assert any("trained on an stable-diffusion-v2-768-v/lora model" in n and "stable-diffusion-v1/lora" in n
               for n in notes), notes
