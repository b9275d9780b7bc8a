from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamlora import load_config, train
from dreamlora.errors import ConfigError
from dreamlora.position_jitter import draw_shifts, jittered_positions, shifted_position_ids

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def ids_of(base, prompts: list[str]) -> torch.Tensor:
    tokenizer = base.tokenizers[0]
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def test_shifted_positions_keep_the_start_token_and_stay_inside_the_table():
    positions = shifted_position_ids(torch.tensor([-2, 0, 3]), 6, 8)
    assert positions.tolist() == [[0, 1, 1, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 4, 5, 6, 7, 7]]


def test_shifts_are_drawn_from_the_seed_within_the_jitter():
    shifts = draw_shifts(2000, 3, seed=0)
    assert set(shifts.tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    assert torch.equal(shifts, draw_shifts(2000, 3, seed=0))
    assert not torch.equal(shifts, draw_shifts(2000, 3, seed=1))
    assert draw_shifts(2000, 0, seed=0) is None  # no jitter: nothing drawn


def test_jittered_prompts_read_as_explicit_position_ids_would_and_the_hook_goes_away(tiny_sd):
    encoder = tiny_sd.text_encoders[0]
    ids = ids_of(tiny_sd, ["a photo of sks ball", "sks ball on a pink background"])
    shifts = torch.tensor([0, 2])
    with torch.no_grad():
        plain = encoder(ids).last_hidden_state
        with jittered_positions([encoder], shifts):
            jittered = encoder(ids).last_hidden_state
        explicit = encoder(ids[1:], position_ids=shifted_position_ids(shifts[1:], ids.shape[1], 77)).last_hidden_state
        after = encoder(ids).last_hidden_state
    assert torch.equal(jittered[0], plain[0])  # a zero shift is the plain reading
    assert torch.allclose(jittered[1], explicit[0], atol=1e-6)
    assert not torch.allclose(jittered[1], plain[1], atol=1e-3)
    assert torch.equal(after, plain)
    with torch.no_grad(), jittered_positions([encoder], None):
        assert torch.equal(encoder(ids).last_hidden_state, plain)


def jitter_config(tmp_path, name: str, jitter: int):
    return load_config(None, {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp_path / f"{name}.safetensors"), "train.steps": 3, "train.learning_rate": 5e-3,
        "prior.enabled": False, "validation.final": False, "lora.train_text_encoder": True,
        "lora.position_jitter": jitter})


def test_training_with_jitter_is_reproducible_and_learns_other_text_adapters(tmp_path):
    first = load_file(train(jitter_config(tmp_path, "a", 3)).output)
    again = load_file(train(jitter_config(tmp_path, "b", 3)).output)
    plain = load_file(train(jitter_config(tmp_path, "c", 0)).output)
    assert first.keys() == plain.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # shifts come from (seed, step)
    text_weights = [k for k in first if k.startswith("lora_te") and not k.endswith(".alpha")]
    assert text_weights and any(not torch.equal(first[k], plain[k]) for k in text_weights)


def test_jitter_is_off_unless_asked_and_needs_a_trained_text_encoder(tmp_path):
    toy = {"data.instance_dir": str(INSTANCES), "data.class_word": "ball", "output.path": str(tmp_path / "t.safetensors")}
    assert load_config(None, toy).lora.position_jitter == 0  # builtin:toy-dots' recipe does not jitter (docs)
    assert load_config(None, {**toy, "lora.position_jitter": 4}).lora.position_jitter == 4
    with pytest.raises(ConfigError, match=r"lora.position_jitter \(flag --position-jitter\).*--train-text-encoder"):
        load_config(None, {**toy, "lora.train_text_encoder": False, "lora.position_jitter": 2})
