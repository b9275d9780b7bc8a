"""Pivotal tuning: the token's own embedding learnt beside the LoRA, kept in checkpoints and the file, loaded back."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamlora import SampleSettings, load_config, sample, train
from dreamlora.errors import ConfigError, ModelLoadError
from dreamlora.lora import read_lora_file
from dreamlora.token_embedding import (attach_learned_token, bundle_tensors, detach_learned_token, initial_vectors,
                                       learned_token, set_learned_token_scale, split_bundle, token_ids)

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"
BUNDLE_KEY = "bundle_emb.sks.string_to_param.*"


def pivotal_config(tmp_path, name="ball", **overrides):
    values = {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp_path / f"{name}.safetensors"), "train.steps": 4, "train.learning_rate": 5e-3,
        "train.checkpoint_every": 2, "prior.num_class_images": 2, "prior.steps": 2, "validation.steps": 2,
        "validation.seeds": [0], "validation.prompts": ["a photo of {token} {class}"],
        "lora.train_text_encoder": True, "lora.train_token_embedding": True, "lora.token_embedding_lr": 1e-2,
    }
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pivotal")
    return train(pivotal_config(tmp_path)), tmp_path


def encode(tiny_sd, prompt: str) -> torch.Tensor:
    ids = tiny_sd.tokenizers[0](prompt, padding="max_length", max_length=tiny_sd.tokenizers[0].model_max_length,
                                return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny_sd.text_encoders[0](ids).last_hidden_state[0]  # (77, hidden)


def test_learnt_vectors_change_the_token_and_leave_earlier_positions_and_scale_zero_alone(tiny_sd):
    encoder, tokenizer = tiny_sd.text_encoders[0], tiny_sd.tokenizers[0]
    before = encode(tiny_sd, "a photo of sks ball")
    ids = token_ids(tokenizer, "sks")
    holder = attach_learned_token(encoder, ids)  # starts at the base rows: nothing changes
    try:
        assert torch.equal(encode(tiny_sd, "a photo of sks ball"), before)
        with torch.no_grad():
            holder.vectors.add_(1.0)
        moved = encode(tiny_sd, "a photo of sks ball")
        position = 1 + tokenizer("a photo of", add_special_tokens=False).input_ids.__len__()  # after <bos>
        assert torch.equal(moved[:position], before[:position])  # a causal encoder: earlier tokens cannot see it
        assert not torch.allclose(moved[position], before[position])
        assert torch.equal(encode(tiny_sd, "a photo of a ball"), encode(tiny_sd, "a photo of a ball"))
        set_learned_token_scale([encoder], 0.0)
        assert torch.equal(encode(tiny_sd, "a photo of sks ball"), before)  # scale 0: the base model exactly
    finally:
        detach_learned_token(encoder)
    assert learned_token(encoder) is None and torch.equal(encode(tiny_sd, "a photo of sks ball"), before)


def test_bundle_keys_round_trip_for_one_and_two_text_encoders(tiny_sd):
    encoder = tiny_sd.text_encoders[0]
    ids = token_ids(tiny_sd.tokenizers[0], "sks")
    hidden = encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.arange(len(ids) * hidden, dtype=torch.float32).reshape(len(ids), hidden)
    attach_learned_token(encoder, ids, vectors)
    try:
        one = bundle_tensors([encoder], "sks", torch.float16)
        assert list(one) == [BUNDLE_KEY] and torch.equal(one[BUNDLE_KEY], vectors.half())
        two = bundle_tensors([encoder, encoder], "sks", torch.float32)
        assert sorted(two) == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]
    finally:
        detach_learned_token(encoder)
    lora, bundles = split_bundle({"lora_te_x.lora_down.weight": torch.zeros(1), **one})
    assert list(lora) == ["lora_te_x.lora_down.weight"] and torch.equal(bundles["sks"][0], vectors.half())
    with pytest.raises(ModelLoadError, match="parts"):
        split_bundle({"bundle_emb.sks.clip_l": vectors})  # half of SDXL's pair


def test_token_embedding_needs_a_trained_text_encoder(tmp_path):
    with pytest.raises(ConfigError, match="train_token_embedding.*--train-text-encoder"):
        pivotal_config(tmp_path, **{"lora.train_text_encoder": False})


def test_the_toy_learns_the_token_embedding_unless_the_run_rules_it_out(tmp_path):
    """builtin:toy recommends it; a recommendation gives way to a frozen text encoder or a fine-tune instead of
    failing validation, while the user's own explicit request still does."""
    toy = {"data.instance_dir": str(INSTANCES), "data.class_word": "ball", "output.path": str(tmp_path / "t.safetensors")}
    assert load_config(None, toy).lora.train_token_embedding
    assert not load_config(None, {**toy, "lora.train_text_encoder": False}).lora.train_token_embedding
    finetune = {"data.job": "finetune", "data.instance_dir": str(INSTANCES), "output.path": str(tmp_path / "f.safetensors")}
    assert not load_config(None, finetune).lora.train_token_embedding
    assert not load_config(None, {**toy, "model.name": "builtin:tiny-sd"}).lora.train_token_embedding
    with pytest.raises(ConfigError, match="train_token_embedding"):
        load_config(None, {**toy, "lora.train_text_encoder": False, "lora.train_token_embedding": True})


def test_the_file_bundles_the_learnt_row_and_nothing_else_of_the_vocabulary_moves(pivotal, tiny_sd):
    result, _ = pivotal
    tensors = load_file(result.output)
    ids = token_ids(tiny_sd.tokenizers[0], "sks")
    base_rows = tiny_sd.text_encoders[0].get_input_embeddings().weight[ids].float()
    learnt = tensors[BUNDLE_KEY].float()
    assert learnt.shape == base_rows.shape and not torch.allclose(learnt, base_rows, atol=1e-3)
    assert [k for k in tensors if k.startswith("bundle_emb.")] == [BUNDLE_KEY]
    # the training process's own base model is untouched: a fresh load keeps the vocabulary's rows
    from dreamlora.models import load_base_model

    fresh = load_base_model("builtin:tiny-sd").text_encoders[0].get_input_embeddings().weight
    assert torch.equal(fresh, tiny_sd.text_encoders[0].get_input_embeddings().weight)


def test_sampling_loads_the_bundle_and_scale_zero_is_still_the_base_model(pivotal, tmp_path):
    result, _ = pivotal
    settings = SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[0.0, 1.0], steps=2)
    grid = sample(result.output, settings, tmp_path / "grid.png")
    base = sample(None, SampleSettings(prompts=["a photo of sks ball"], seeds=[0], steps=2), tmp_path / "base.png",
                  model="builtin:tiny-sd")
    off, on = (np.asarray(Image.open(p)) for p in grid.images)
    assert np.array_equal(off, np.asarray(Image.open(base.images[0])))
    assert not np.array_equal(off, on)


def test_the_bundle_changes_the_renders_beyond_the_adapters(pivotal, tmp_path):
    """The same file without its bundle renders differently: the embedding is really loaded and used."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    result, _ = pivotal
    with safe_open(str(result.output), "pt") as f:
        metadata = f.metadata()
    stripped = tmp_path / "adapters-only.safetensors"
    save_file({k: v for k, v in load_file(result.output).items() if not k.startswith("bundle_emb.")}, str(stripped),
              metadata=metadata)
    settings = SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[1.0], steps=2)
    with_bundle = sample(result.output, settings, tmp_path / "with.png")
    without = sample(stripped, settings, tmp_path / "without.png")
    assert not np.array_equal(np.asarray(Image.open(with_bundle.images[0])), np.asarray(Image.open(without.images[0])))


# slow: three trainings (25 s measured beside another job); kept out of the README's 4-minute test command
@pytest.mark.slow
def test_resume_restores_the_learnt_row_exactly(tmp_path):
    straight = train(pivotal_config(tmp_path / "a"))
    first = train(pivotal_config(tmp_path / "b", **{"train.steps": 2}))
    Path(first.output).unlink()
    resumed = train(pivotal_config(tmp_path / "b", **{"train.resume": True}))
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys() and BUNDLE_KEY in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_of_a_checkpoint_carries_the_bundle(pivotal, tmp_path):
    from dreamlora.selection import export

    result, _ = pivotal
    exported = export(result.run_dir, tmp_path / "step2.safetensors", step=2)
    tensors = load_file(exported.output)
    assert BUNDLE_KEY in tensors
    assert not torch.equal(tensors[BUNDLE_KEY], load_file(result.output)[BUNDLE_KEY])  # step 2, not step 4


def test_the_readmes_diffusers_recipe_gives_what_dreamlora_loads(pivotal):
    """README, "Loading the file": the adapters through load_lora_weights, the vectors put in by hand."""
    from safetensors import safe_open

    from dreamlora.models import load_base_model
    from dreamlora.sampling import attach_lora

    result, _ = pivotal
    prompt_ids = None
    outputs = []
    for by_hand in (False, True):
        base = load_base_model("builtin:tiny-sd")
        pipe = base.pipeline()
        if by_hand:
            tensors = load_file(result.output)
            vectors = tensors.pop("bundle_emb.sks.string_to_param.*")
            pipe.load_lora_weights({k: v for k, v in tensors.items()}, adapter_name="dog")
            ids = pipe.tokenizer("sks", add_special_tokens=False).input_ids
            pipe.text_encoder.get_input_embeddings().weight.data[ids] = vectors.to(pipe.text_encoder.dtype)
        else:
            with safe_open(str(result.output), "pt") as f:
                attach_lora(pipe, base, result.output, f.metadata(), "dog")
        prompt_ids = pipe.tokenizer("a photo of sks ball", return_tensors="pt").input_ids
        with torch.no_grad():
            outputs.append(pipe.text_encoder(prompt_ids).last_hidden_state)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_detach_lora_gives_the_base_text_encoder_back(pivotal):
    """unload_lora_weights alone leaves the learnt token in the encoder; detach_lora takes it out too."""
    from safetensors import safe_open

    from dreamlora.models import load_base_model
    from dreamlora.sampling import attach_lora, detach_lora

    result, _ = pivotal
    base = load_base_model("builtin:tiny-sd")
    pipe = base.pipeline()
    prompt_ids = pipe.tokenizer("a photo of sks ball", return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    with torch.no_grad():
        before = encoder(prompt_ids).last_hidden_state
        with safe_open(str(result.output), "pt") as f:
            attach_lora(pipe, base, result.output, f.metadata(), "dog")
        pipe.unload_lora_weights()
        assert learned_token(encoder) is not None
        assert not torch.allclose(encoder(prompt_ids).last_hidden_state, before)
        detach_lora(pipe, base)
        assert learned_token(encoder) is None
        assert torch.equal(encoder(prompt_ids).last_hidden_state, before)


def test_token_init_starts_every_piece_at_the_mean_of_the_words_rows(tiny_sd):
    encoder, tokenizer = tiny_sd.text_encoders[0], tiny_sd.tokenizers[0]
    rows = encoder.get_input_embeddings().weight.detach()
    pieces = len(token_ids(tokenizer, "sks"))
    assert initial_vectors(encoder, tokenizer, pieces, None) is None  # the token's own rows
    start = initial_vectors(encoder, tokenizer, pieces, "red  dots")
    red, dots = token_ids(tokenizer, "red"), token_ids(tokenizer, "dots")
    assert start.shape == (pieces, rows.shape[1])
    assert torch.allclose(start[0], (rows[red[0]] + rows[dots[0]]) / 2)
    with pytest.raises(ConfigError, match=r"--token-init.*'qqzx' is not a word.*splits into 4 pieces"):
        initial_vectors(encoder, tokenizer, pieces, "red qqzx")


def test_token_init_needs_the_learnt_embedding_and_some_words(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.token_init.*--train-token-embedding"):
        pivotal_config(tmp_path, **{"lora.train_token_embedding": False, "lora.token_init": "red"})
    with pytest.raises(ConfigError, match=r"lora.token_init.*is empty"):
        pivotal_config(tmp_path, **{"lora.token_init": "  "})


def test_training_starts_the_token_from_the_init_words(tmp_path, tiny_sd):
    """At a vanishing embedding rate the file's vectors are still the init words' mean: training began there."""
    config = pivotal_config(tmp_path, **{"lora.token_init": "red dots", "lora.token_embedding_lr": 1e-12,
                                         "train.steps": 1, "prior.enabled": False, "validation.final": False})
    learnt = load_file(train(config).output)[BUNDLE_KEY].float()
    expected = initial_vectors(tiny_sd.text_encoders[0], tiny_sd.tokenizers[0],
                               len(token_ids(tiny_sd.tokenizers[0], "sks")), "red dots")
    assert torch.allclose(learnt, expected.half().float(), atol=1e-6)
    assert read_lora_file(config.output.path).config["lora"]["token_init"] == "red dots"  # the file says how
