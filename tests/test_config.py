from pathlib import Path

import pytest

from dreamlora.config import DreamLoraConfig, load_config, to_portable_json
from dreamlora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"model.name": "builtin:tiny-sd", "data.instance_dir": "photos", "data.class_word": "dog",
            "output.path": "out.safetensors"}


def test_defaults_with_required_values():
    config = load_config(None, REQUIRED)
    assert config.lora.rank == 4 and config.lora.resolved_alpha == 4.0
    assert config.prior.enabled and config.prior.num_class_images == 100
    assert config.output.format == "kohya" and config.output.save_dtype == "fp16"


def test_toml_then_flags_and_paths_relative_to_the_file(tmp_path):
    toml = tmp_path / "sub" / "run.toml"
    toml.parent.mkdir()
    toml.write_text('[model]\nname = "builtin:tiny-sd"\n[data]\ninstance_dir = "photos"\nclass_word = "cat"\n[train]\nsteps = 7\nlearning_rate = 2e-4\n')
    config = load_config(toml, {"train.steps": 9, "output.path": "x.safetensors", "lora.rank": None})
    assert config.train.steps == 9  # flag wins
    assert config.train.learning_rate == 2e-4  # TOML wins over default
    assert config.lora.rank == 4  # a flag left out (None) changes nothing
    assert Path(config.data.instance_dir) == (toml.parent / "photos").resolve()


def test_unknown_key_suggests_the_right_one(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nstep = 5\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'; did you mean 'train.steps'"):
        load_config(toml, REQUIRED)


def test_every_problem_is_reported_at_once_with_its_flag():
    with pytest.raises(ConfigError) as info:
        load_config(None, {**REQUIRED, "train.steps": -5, "lora.rank": 0, "output.format": "ckpt"})
    message = str(info.value)
    assert "output.format (flag --format): must be one of kohya, diffusers (got 'ckpt')" in message
    with pytest.raises(ConfigError) as info:
        load_config(None, {**REQUIRED, "train.steps": -5, "lora.rank": 0, "data.token": "dog"})
    message = str(info.value)
    assert "train.steps (flag --steps) must be > 0 (got -5)" in message
    assert "lora.rank (flag --rank) must be > 0 (got 0)" in message
    assert "data.token (flag --token) must differ from the class word" in message
    assert message.startswith("3 configuration problems")


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"train.steps \(flag --steps\): must be a whole number \(got 'many'\)"):
        load_config(None, {**REQUIRED, "train.steps": "many"})


def test_instance_prompt_must_name_the_token():
    with pytest.raises(ConfigError, match="instance_prompt.*must contain"):
        load_config(None, {**REQUIRED, "data.instance_prompt": "a photo of a dog"})


def test_missing_required_values():
    with pytest.raises(ConfigError) as info:
        load_config(None, {})
    assert "data.class_word (flag --class-word) is required" in str(info.value)
    assert "output.path (flag --out) is required" in str(info.value)


def test_portable_json_has_no_absolute_paths(tmp_path):
    config = load_config(None, {**REQUIRED, "data.instance_dir": str(tmp_path / "photos")})
    assert str(tmp_path) not in to_portable_json(config)


@pytest.mark.parametrize("toml", sorted(ROOT.glob("sample_instances/*/dreamlora.toml")), ids=lambda p: p.parent.name)
def test_shipped_tomls_are_valid(toml):
    config = load_config(toml, {"output.path": "x.safetensors"})
    assert Path(config.data.instance_dir).is_dir()
    assert isinstance(config, DreamLoraConfig)


def test_the_toy_model_fills_the_settings_left_unset_and_flags_still_win(tmp_path):
    # builtin:toy-dots (the default model) needs more rank, a higher rate and the text encoder to learn a subject.
    toml = tmp_path / "run.toml"
    toml.write_text('[lora]\nrank = 8\n')
    config = load_config(toml, {**REQUIRED, "model.name": None, "train.steps": 30})
    assert config.model.name == "builtin:toy-dots"
    assert config.lora.rank == 8 and config.train.steps == 30  # the TOML file and the flag win
    assert config.train.learning_rate == 3e-4 and config.lora.train_text_encoder is True  # unset: recommended
    assert config.train.lr_scheduler == "cosine" and config.validation.eval_seeds == [0, 1, 2, 3]
    assert config.prior.loss_weight == 0.5
    plain = load_config(None, REQUIRED)  # builtin:tiny-sd recommends nothing: the SD 1.5-sized defaults
    assert (plain.train.learning_rate, plain.lora.rank, plain.train.steps) == (1e-4, 4, 500)
    assert plain.lora.train_text_encoder is False and plain.prior.loss_weight == 1.0


def test_bad_snr_gamma_and_noise_offset_name_their_flags():
    with pytest.raises(ConfigError) as error:
        load_config(None, {**REQUIRED, "train.snr_gamma": 0, "train.noise_offset": 2})
    message = str(error.value)
    assert "train.snr_gamma (flag --snr-gamma) must be > 0" in message
    assert "train.noise_offset (flag --noise-offset) must be in [0, 1] (got 2.0)" in message
