"""SD3 end to end on the CPU through builtin:tiny-sd3: detection, prompt encoding as the pipeline does it, training
with prior preservation and CLIP adapters (T5 frozen), and files that StableDiffusion3Pipeline.load_lora_weights
loads key for key, that change the output, and that at scale 0 are the base model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreamlora import SampleSettings, load_config, sample, train
from dreamlora.errors import ConfigError
from dreamlora.models import builtin_model_dir, detect_family, load_base_model
from dreamlora.models.configs import read_model_configs
from dreamlora.models.sd3 import StableDiffusion3Family

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def sd3_config(tmp_path, name="ball", **overrides):
    values = {"model.name": "builtin:tiny-sd3", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "output.path": str(tmp_path / f"{name}.safetensors"), "output.format": "diffusers", "train.steps": 3,
              "train.learning_rate": 5e-3, "train.checkpoint_every": 0, "prior.num_class_images": 2,
              "prior.steps": 2, "validation.steps": 1, "validation.seeds": [0],
              "validation.prompts": ["a photo of {token} {class}"], "lora.train_text_encoder": True}
    values.update(overrides)
    return load_config(None, values)


def test_tiny_sd3_is_detected_from_its_configs_alone(session_cache):
    configs = read_model_configs("builtin:tiny-sd3")  # no weights built or read
    family = detect_family(configs)
    assert isinstance(family, StableDiffusion3Family)
    assert family.file_metadata(64)["modelspec.architecture"] == "stable-diffusion-3-m/lora"
    assert family.objective(configs.scheduler).shift((32, 32)) == 3.0  # SD3's fixed shift, from its scheduler
    assert len(configs.text_encoders) == 3 and configs.vae["latent_channels"] == 16


def test_the_t5_tokenizer_is_built_offline_and_reads_prompt_words_whole(tmp_path):
    from dreamlora.models.tokenizer import load_t5_tokenizer, write_t5_tokenizer_files

    size = write_t5_tokenizer_files(tmp_path)
    tokenizer = load_t5_tokenizer(tmp_path)
    assert len(tokenizer) == size
    ids = tokenizer("a photo of sks dog").input_ids
    assert len(ids) == 6 and ids[-1] == tokenizer.eos_token_id == 1  # five words, then </s>
    assert tokenizer("zq!").input_ids[-1] == 1  # unknown words fall back to characters, never fail
    assert tokenizer.pad_token_id == 0


@pytest.fixture(scope="module")
def tiny_sd3(session_cache):
    return load_base_model("builtin:tiny-sd3")


@pytest.mark.slow  # over 3 s on 2 cores (builds builtin:tiny-sd3): run by .ci/run with -m slow
def test_prompts_are_encoded_as_the_sd3_pipeline_encodes_them(tiny_sd3):
    prompts = ["a photo of sks ball", "a photo of ball"]
    mine = tiny_sd3.family.encode_prompts(tiny_sd3.tokenizers, tiny_sd3.text_encoders, prompts)
    states, _, pooled, _ = tiny_sd3.pipeline().encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    assert mine.hidden_states.shape == (2, 77 + 256, 128)  # CLIP states padded to T5's width, then T5's sequence
    torch.testing.assert_close(mine.hidden_states, states)
    torch.testing.assert_close(mine.added_conditions["pooled_projections"], pooled)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sd3")
    return train(sd3_config(tmp_path)), tmp_path


def lora_state(pipe, component: str) -> set[str]:
    from peft import get_peft_model_state_dict

    return set(get_peft_model_state_dict(getattr(pipe, component), adapter_name="subject"))


@pytest.mark.slow  # over 3 s on 2 cores (trains tiny-sd3): run by .ci/run with -m slow
def test_trained_file_loads_in_the_sd3_pipeline_key_for_key_and_scale_zero_is_the_base(trained):
    from diffusers import StableDiffusion3Pipeline

    result, _ = trained
    assert result.prior_loss is not None and result.prior_loss > 0  # class rows in the batch
    with safe_open(str(result.output), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}  # T5 has none
    assert any(".add_q_proj." in k for k in keys) and any(".to_add_out." in k for k in keys)  # both streams
    assert meta["modelspec.architecture"] == "stable-diffusion-3-m/lora"
    assert not any(k.startswith("ss_") for k in meta)  # a diffusers file carries no kohya entries

    pipe = StableDiffusion3Pipeline.from_pretrained(str(builtin_model_dir("tiny-sd3")))
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    pipe.load_lora_weights(str(result.output), adapter_name="subject")
    # Every key of the file became an adapter weight, and no adapter weight is missing from the file.
    loaded = {f"{c}.{k}" for c in ("transformer", "text_encoder", "text_encoder_2") for k in lora_state(pipe, c)}
    assert {k.replace("text_model.", "") for k in loaded} == {k.replace("text_model.", "") for k in keys}
    with_lora = render()
    pipe.set_adapters(["subject"], adapter_weights=[0.0])
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(render(), base, atol=1e-6)


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_sample_renders_sd3_files_through_the_sd3_pipeline(trained, tmp_path):
    result, _ = trained
    out = sample(result.output, SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[0.0, 1.0],
                                               steps=2), tmp_path / "grid.png")
    off, on = (np.asarray(Image.open(p)) for p in out.images)
    base = sample(None, SampleSettings(prompts=["a photo of sks ball"], seeds=[0], steps=2), tmp_path / "base.png",
                  model="builtin:tiny-sd3")
    assert np.array_equal(off, np.asarray(Image.open(base.images[0])))
    assert not np.array_equal(off, on)


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_kohya_files_and_min_snr_are_refused_for_sd3_naming_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--format diffusers"):
        train(sd3_config(tmp_path, "k", **{"output.format": "kohya", "prior.enabled": False}))
    with pytest.raises(ConfigError, match="--flow-weighting"):
        train(sd3_config(tmp_path, "s", **{"train.snr_gamma": 5.0, "prior.enabled": False}))


def test_t5_runs_once_a_prompt_and_its_states_stay_cached_wherever_t5_moves():
    from dreamlora.models.sd3 import FrozenT5Cache

    calls = []

    class CountingT5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, ids):
            calls.append(ids.shape[0])
            return (ids[..., None].float() * self.weight,)

    def tokenizer(prompts, max_length, **_):
        return type("T", (), {"input_ids": torch.tensor([[len(p)] * max_length for p in prompts])})()

    cache, t5 = FrozenT5Cache(), CountingT5()
    first = cache.encode(t5, tokenizer, ["a", "bb", "a"], 4)
    t5.to(torch.float64)  # moved or cast afterwards (training offloads it): the cached states still answer
    again = cache.encode(t5, tokenizer, ["bb", "a"], 4)
    assert calls == [2]  # one T5 call, for the two distinct prompts
    assert torch.equal(again, first[[1, 0]]) and first.shape == (3, 4, 1)
