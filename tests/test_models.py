"""Base models: the built-in tokenizer, built-in models, loading every --model form, single-file export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamlora.errors import ConfigError, ModelLoadError
from dreamlora.models import builtin as builtin_module
from dreamlora.models import builtin_model_dir, export_single_file, load_base_model
from dreamlora.models.builtin import BUILDER_VERSION
from dreamlora.models.tokenizer import (
    DEFAULT_WORDS,
    MODEL_MAX_LENGTH,
    bpe_segment,
    build_merges,
    load_tokenizer,
    write_tokenizer_files,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One DREAMLORA_CACHE for the module, so each built-in is built once."""
    root = tmp_path_factory.mktemp("dreamlora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMLORA_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_sd(cache):
    return load_base_model("builtin:tiny-sd")


@pytest.fixture(scope="module")
def tiny_sd2(cache):
    return load_base_model("builtin:tiny-sd2")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def assert_same_model(a, b) -> None:
    assert_same_weights(a.unet, b.unet)
    assert_same_weights(a.vae, b.vae)
    assert_same_weights(a.text_encoders[0], b.text_encoders[0])


# --- tokenizer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(folder)
    return load_tokenizer(folder)


def test_tokenizer_prompt_is_one_token_a_word(tokenizer):
    ids = tokenizer("a photo of sks dog").input_ids
    assert len(ids) == 7
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]


def test_every_listed_word_is_one_token(tokenizer):
    for word in DEFAULT_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_unknown_words_fall_back_to_pieces_and_round_trip(tokenizer):
    text = "a xylophone, 3 émojis"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.eos_token_id not in ids  # nothing fell through to unk (unk is eos)
    assert tokenizer.decode(ids) == "a xylophone , 3 émojis"  # CLIP's decode spaces punctuation


def test_padding_to_model_max_length_and_decode(tokenizer):
    enc = tokenizer("a red cube on the beach", padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True)
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == len(enc.input_ids)
    assert enc.input_ids[-1] == tokenizer.pad_token_id
    assert tokenizer.decode(enc.input_ids, skip_special_tokens=True) == "a red cube on the beach"


def test_reference_bpe_matches_the_loaded_tokenizer(tokenizer):
    merges = build_merges(DEFAULT_WORDS)
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in ["photo", "sks", "photograph", "dogs", "zebra", "background"]:
        expected = bpe_segment(word, ranks)
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == expected


def test_vocab_files_are_clip_layout(tmp_path):
    size = write_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == size
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes + </w>
    assert vocab["<|startoftext|>"] == size - 2 and vocab["<|endoftext|>"] == size - 1
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version")


# --- built-in models -----------------------------------------------------------------------------


def test_builtin_is_built_once_and_reused(cache, tiny_sd, monkeypatch):
    folder = builtin_model_dir("tiny-sd")
    assert folder == cache / "builtin" / f"tiny-sd-{BUILDER_VERSION}"
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert list((folder / "unet").glob("*.safetensors"))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(builtin_module, "_build_pipeline", no_rebuild)
    assert builtin_model_dir("tiny-sd") == folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_builtin_weights_are_bit_identical_across_builds(cache, tmp_path, monkeypatch):
    first = builtin_model_dir("tiny-sd")
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path))
    second = builtin_model_dir("tiny-sd")
    assert second.is_relative_to(tmp_path) and second != first
    for part in ("unet", "vae", "text_encoder"):
        (a,) = (first / part).glob("*.safetensors")
        (b,) = (second / part).glob("*.safetensors")
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{part}/{key}"


def test_concurrent_builder_that_finished_first_wins(cache, tmp_path, monkeypatch):
    finished = builtin_model_dir("tiny-sd")
    monkeypatch.setenv("DREAMLORA_CACHE", str(tmp_path))
    target = tmp_path / "builtin" / finished.name
    real_build = builtin_module._build_pipeline

    def build_while_another_finishes(*args, **kwargs):
        shutil.copytree(finished, target)  # the other process renames its folder into place meanwhile
        return real_build(*args, **kwargs)

    monkeypatch.setattr(builtin_module, "_build_pipeline", build_while_another_finishes)
    assert builtin_model_dir("tiny-sd") == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # our temp folder is gone


def test_unknown_builtin_lists_known_names(cache):
    with pytest.raises(ModelLoadError, match=r"builtin:nope.*builtin:tiny-sd, builtin:tiny-sd2"):
        load_base_model("builtin:nope")


# --- loading -------------------------------------------------------------------------------------


def test_tiny_sd_is_sd1_epsilon(tiny_sd):
    assert tiny_sd.family.name == "sd1" and not tiny_sd.family.v2 and not tiny_sd.family.v_prediction
    assert tiny_sd.noise_scheduler.config.prediction_type == "epsilon"
    assert tiny_sd.scheduler_config["_class_name"] == "PNDMScheduler"
    assert (tiny_sd.vae_scale_factor, tiny_sd.default_resolution) == (2, 64)
    assert tiny_sd.identity == "builtin:tiny-sd"
    text = tiny_sd.text_encoders[0]
    assert text.config.vocab_size >= len(tiny_sd.tokenizers[0])
    assert text.config.eos_token_id == tiny_sd.tokenizers[0].eos_token_id
    assert not any(m.training for m in (tiny_sd.unet, tiny_sd.vae, text))


def test_tiny_sd2_is_sd2_v_prediction(tiny_sd2):
    assert tiny_sd2.family.name == "sd2" and tiny_sd2.family.v2 and tiny_sd2.family.v_prediction
    assert tiny_sd2.noise_scheduler.config.prediction_type == "v_prediction"
    assert tiny_sd2.unet.config.use_linear_projection
    assert tiny_sd2.text_encoders[0].config.hidden_act == "gelu"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2"])
def test_pipeline_makes_a_64px_image(name, tiny_sd, tiny_sd2):
    model = {"tiny-sd": tiny_sd, "tiny-sd2": tiny_sd2}[name]
    pipe = model.pipeline()
    out = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "sampler, scheduler_class",
    [(None, "PNDMScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler"),
     ("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
     ("ddpm", "DDPMScheduler"), ("unipc", "UniPCMultistepScheduler")],
)
def test_pipeline_shares_modules_and_picks_the_sampler(tiny_sd, sampler, scheduler_class):
    pipe = tiny_sd.pipeline(sampler)
    assert pipe.unet is tiny_sd.unet and pipe.vae is tiny_sd.vae and pipe.text_encoder is tiny_sd.text_encoders[0]
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == scheduler_class
    assert pipe.scheduler.config.prediction_type == "epsilon"  # the model's own setting carries over
    assert pipe.scheduler is not tiny_sd.pipeline(sampler).scheduler  # fresh state for every pipeline
    if sampler == "dpm++2m":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
    if sampler not in (None, "pndm", "ddpm"):  # the solvers start at the top of the schedule at any step count
        for steps in (10, 20, 200):
            pipe.scheduler.set_timesteps(steps)
            assert int(pipe.scheduler.timesteps[0]) == 999


def test_sd2_samplers_keep_v_prediction(tiny_sd2):
    assert tiny_sd2.pipeline("dpm++2m").scheduler.config.prediction_type == "v_prediction"


def test_unknown_sampler_names_the_flag(tiny_sd):
    with pytest.raises(ConfigError, match=r"'plms'.*--sampler"):
        tiny_sd.pipeline("plms")


def test_local_folder_identity_and_fingerprint(tiny_sd, tiny_sd2):
    folder = builtin_model_dir("tiny-sd")
    model = load_base_model(str(folder))
    assert model.identity == folder.name and not os.path.isabs(model.identity)
    assert model.fingerprint == load_base_model(str(folder)).fingerprint
    assert model.fingerprint != load_base_model(str(builtin_model_dir("tiny-sd2"))).fingerprint
    assert_same_model(model, tiny_sd)


def test_dtype_is_applied(cache):
    model = load_base_model("builtin:tiny-sd", dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16 and model.text_encoders[0].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["/no/such/model", "not a model", "./relative/missing"])
def test_bad_model_value_is_named(bad):
    with pytest.raises(ModelLoadError, match="accepted|Accepted") as err:
        load_base_model(bad)
    assert bad in str(err.value)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json") as err:
        load_base_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'dreamlora-test/not-cached'.*local Hugging Face cache.*cannot be reached.*local folder"):
        load_base_model("dreamlora-test/not-cached")


# --- single-file export and loading --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2"])
def test_single_file_round_trip(name, tiny_sd, tiny_sd2, tmp_path):
    model = {"tiny-sd": tiny_sd, "tiny-sd2": tiny_sd2}[name]
    path = export_single_file(model, tmp_path / f"{name}.safetensors")
    keys = load_file(path).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    text_prefix = "cond_stage_model.model.transformer.resblocks." if model.family.v2 else \
        "cond_stage_model.transformer.text_model.encoder.layers."
    assert any(k.startswith(text_prefix) for k in keys)

    loaded = load_base_model(str(path), single_file_config=str(builtin_model_dir(name)))
    assert_same_model(loaded, model)
    assert loaded.family == model.family
    assert loaded.identity == f"{name}.safetensors"


def test_ckpt_round_trip_with_weights_only(tiny_sd, tmp_path):
    state = load_file(export_single_file(tiny_sd, tmp_path / "m.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    loaded = load_base_model(str(tmp_path / "m.ckpt"), single_file_config=str(builtin_model_dir("tiny-sd")))
    assert_same_model(loaded, tiny_sd)
    assert loaded.identity == "m.ckpt"


@dataclass
class _PickledObject:  # stands in for the code objects old .ckpt files carry
    value: int = 1


def test_ckpt_with_pickled_objects_is_refused(tiny_sd, tmp_path):
    state = load_file(export_single_file(tiny_sd, tmp_path / "m.safetensors"))
    torch.save({"state_dict": state, "callbacks": _PickledObject()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ModelLoadError, match=r"unsafe\.ckpt.*pickled objects.*safetensors"):
        load_base_model(str(tmp_path / "unsafe.ckpt"), single_file_config=str(builtin_model_dir("tiny-sd")))


def test_export_from_a_folder_path(tiny_sd, tmp_path):
    path = export_single_file(builtin_model_dir("tiny-sd"), tmp_path / "f.safetensors", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in load_file(path).values())


def test_export_refuses_other_suffixes(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="out.ckpt"):
        export_single_file(tiny_sd, tmp_path / "out.ckpt")


def test_single_file_without_config_offline_says_model_config(tiny_sd, tmp_path, monkeypatch):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 at import: diffusers retries online when the configs are not cached")
    path = export_single_file(tiny_sd, tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"m\.safetensors.*--model-config"):
        load_base_model(str(path))


def test_lora_like_file_is_not_a_base_model(tmp_path):
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelLoadError, match=r"lora\.safetensors. is a LoRA file, not a base model"):
        load_base_model(str(tmp_path / "lora.safetensors"))


def test_bad_model_config_is_named(tiny_sd, tmp_path):
    path = export_single_file(tiny_sd, tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"--model-config '/no/such/folder'"):
        load_base_model(str(path), single_file_config="/no/such/folder")
