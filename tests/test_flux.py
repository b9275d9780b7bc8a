"""Flux.1 end to end on the CPU through builtin:tiny-flux: 2x2 latent packing, detection, prompt encoding as the
pipeline does it, the dev guidance embedding, training with prior preservation and CLIP-L adapters (T5 frozen), and
files that FluxPipeline.load_lora_weights loads key for key, that change the output, and that at scale 0 are the
base model."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreamlora import load_config, train
from dreamlora.models import builtin_model_dir, detect_family, load_base_model
from dreamlora.models.configs import read_model_configs
from dreamlora.interop.formats import read_lora
from dreamlora.models.flux import FluxFamily, latent_position_ids, pack_latents, unpack_latents

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def flux_config(tmp_path, name="ball", **overrides):
    values = {"model.name": "builtin:tiny-flux", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "output.path": str(tmp_path / f"{name}.safetensors"), "output.format": "diffusers", "train.steps": 3,
              "train.learning_rate": 5e-3, "train.checkpoint_every": 0, "prior.num_class_images": 2,
              "prior.steps": 2, "prior.guidance": 3.5, "validation.steps": 1, "validation.seeds": [0],
              "validation.guidance": 3.5, "validation.prompts": ["a photo of {token} {class}"],
              "lora.train_text_encoder": True}
    values.update(overrides)
    return load_config(None, values)


def test_packing_round_trips_and_matches_the_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (2, 3 * 4, 64)  # (h/2 · w/2) tokens of 16 channels x 2x2
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    # Token (row 1, column 2) holds channel 0's 2x2 patch at rows 2-3, columns 4-5 first.
    assert torch.equal(packed[0, 1 * 4 + 2, :4], latents[0, 0, 2:4, 4:6].reshape(4))
    assert torch.equal(latent_position_ids(6, 8), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))


def test_tiny_flux_is_detected_from_its_configs_alone(session_cache):
    configs = read_model_configs("builtin:tiny-flux")
    family = detect_family(configs)
    assert isinstance(family, FluxFamily) and family.variant == "dev" and family.guidance_embeds
    meta = family.file_metadata(64)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    schnell = detect_family(replace(configs, unet={**configs.unet, "guidance_embeds": False}))
    assert schnell.variant == "schnell" and schnell.file_metadata(64)["modelspec.architecture"] == "flux-1-schnell/lora"
    # The σ shift grows with the image: 1024 tokens (512 px) -> exp(0.63).
    assert family.objective(configs.scheduler).shift((64, 64)) == pytest.approx(np.exp(0.63))


@pytest.fixture(scope="module")
def tiny_flux(session_cache):
    return load_base_model("builtin:tiny-flux")


@pytest.mark.slow  # over 3 s on 2 cores (builds builtin:tiny-flux): run by .ci/run with -m slow
def test_prompts_and_the_forward_are_the_flux_pipelines(tiny_flux):
    prompts = ["a photo of sks ball", "a photo of ball"]
    mine = tiny_flux.family.encode_prompts(tiny_flux.tokenizers, tiny_flux.text_encoders, prompts)
    states, pooled, _ = tiny_flux.pipeline().encode_prompt(prompts, None)
    torch.testing.assert_close(mine.hidden_states, states)
    torch.testing.assert_close(mine.added_conditions["pooled_projections"], pooled)
    # predict = the pipeline's transformer call on packed latents, at σ = t / 1000, with the guidance value.
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 200.0])
    family = tiny_flux.family.for_training(type("S", (), {"guidance": 3.5})())
    with torch.no_grad():
        pred = family.predict(tiny_flux.unet, x, t, family.denoiser_kwargs(mine, {}))
        direct = tiny_flux.unet(hidden_states=pack_latents(x), timestep=t / 1000, guidance=torch.full((2,), 3.5),
                                pooled_projections=pooled, encoder_hidden_states=states,
                                img_ids=latent_position_ids(32, 32), txt_ids=torch.zeros(512, 3)).sample
        other = tiny_flux.family.predict(tiny_flux.unet, x, t, family.denoiser_kwargs(mine, {}))  # guidance 1
    torch.testing.assert_close(pred, unpack_latents(direct, 32, 32))
    assert not torch.allclose(pred, other)  # the dev guidance embedding sees the value


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("flux")
    return train(flux_config(tmp_path)), tmp_path


def tiny_flux_renderer():
    """diffusers' own FluxPipeline over builtin:tiny-flux, and a function rendering one seeded picture with it."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(builtin_model_dir("tiny-flux")))
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, output_type="np",
                    guidance_scale=3.5, generator=torch.Generator().manual_seed(0)).images

    return pipe, render


@pytest.mark.slow  # over 3 s on 2 cores (trains tiny-flux): run by .ci/run with -m slow
def test_trained_file_loads_in_the_flux_pipeline_key_for_key_and_scale_zero_is_the_base(trained):
    from peft import get_peft_model_state_dict

    result, _ = trained
    assert result.prior_loss is not None and result.prior_loss > 0
    with safe_open(str(result.output), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}  # T5 (text_encoder_2) has none
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.") for k in keys)
    assert any(".to_add_out." in k for k in keys)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"

    pipe, render = tiny_flux_renderer()
    base = render()
    pipe.load_lora_weights(str(result.output), adapter_name="subject")
    loaded = {f"{c}.{k}" for c in ("transformer", "text_encoder")
              for k in get_peft_model_state_dict(getattr(pipe, c), adapter_name="subject")}
    assert {k.replace("text_model.", "") for k in loaded} == {k.replace("text_model.", "") for k in keys}
    with_lora = render()
    pipe.set_adapters(["subject"], adapter_weights=[0.0])
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(render(), base, atol=1e-6)


# --- BFL / kohya names --------------------------------------------------------------------------------------------


def synthetic_flux_adapters(rank=2, width=8, seed=0) -> dict:
    """A double block's both streams and a single block's q/k/v, as diffusers names them, with random weights."""
    from dreamlora.interop.formats import LoraModule

    g = torch.Generator().manual_seed(seed)

    def module(out=width, inp=width):
        return LoraModule(down=torch.randn(rank, inp, generator=g), up=torch.randn(out, rank, generator=g),
                          alpha=float(rank))

    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_out.0",
             "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_q",
             "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"]
    modules = {f"transformer.{n}": module() for n in names}
    modules["transformer.single_transformer_blocks.0.proj_out"] = module(width, 5 * width)
    modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = module()
    return modules


def test_bfl_names_fuse_qkv_and_the_fused_update_is_the_split_ones_stacked():
    from dreamlora.interop.bfl import to_bfl

    split = synthetic_flux_adapters()
    fused, header = to_bfl(split)
    assert set(fused) == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
                          "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
                          "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}
    qkv = fused["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.rank == 6 and qkv.alpha == 6.0  # three rank-2 parts, strength alpha / rank kept at 1
    stacked = torch.cat([split[f"transformer.transformer_blocks.0.attn.to_{p}"].delta() for p in "qkv"])
    torch.testing.assert_close(qkv.delta(), stacked)
    linear1 = fused["lora_unet_single_blocks_0_linear1"]
    assert linear1.up.shape == (8 * 3 + 4 * 8, 6)  # q, k, v and the MLP's input (not adapted: zero rows)
    single = [split[f"transformer.single_transformer_blocks.0.attn.to_{p}"].delta() for p in "qkv"]
    torch.testing.assert_close(linear1.delta(), torch.cat(single + [torch.zeros(32, 8)]))
    assert "dreamlora.bfl_split" in header


def test_bfl_conversion_is_bit_exact_both_ways():
    from dreamlora.interop.bfl import from_bfl, to_bfl

    split = synthetic_flux_adapters()
    fused, header = to_bfl(split)
    back = from_bfl(fused, header)
    assert set(back) == set(split)
    for stem, module in split.items():
        assert torch.equal(back[stem].down, module.down) and torch.equal(back[stem].up, module.up), stem
        assert back[stem].alpha == module.alpha
    again, header_again = to_bfl(back)
    assert header_again == header
    for stem, module in fused.items():
        assert torch.equal(again[stem].down, module.down) and torch.equal(again[stem].up, module.up)


def test_a_fused_adapter_trained_elsewhere_splits_into_the_same_update():
    from dreamlora.interop.bfl import from_bfl
    from dreamlora.interop.formats import LoraModule

    g = torch.Generator().manual_seed(3)
    fused = {"lora_unet_single_blocks_1_linear1": LoraModule(down=torch.randn(4, 8, generator=g),
                                                             up=torch.randn(56, 4, generator=g), alpha=2.0)}
    parts = from_bfl(fused, {})  # no dreamlora.bfl_split: sd-scripts trained it fused
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    assert set(parts) == {f"transformer.single_transformer_blocks.1.{n}" for n in names}
    stacked = torch.cat([parts[f"transformer.single_transformer_blocks.1.{n}"].delta() for n in names])
    torch.testing.assert_close(stacked, fused["lora_unet_single_blocks_1_linear1"].delta())


@pytest.mark.slow  # over 3 s on 2 cores (trains tiny-flux): run by .ci/run with -m slow
def test_convert_to_bfl_and_back_is_exact_and_diffusers_loads_the_bfl_file_as_the_same_lora(trained, tmp_path):
    from diffusers import FluxPipeline

    from dreamlora.interop.convert import convert_lora

    result, _ = trained
    bfl = convert_lora(result.output, tmp_path / "bfl.safetensors", "kohya").out
    back = convert_lora(bfl, tmp_path / "back.safetensors", "diffusers").out
    with safe_open(str(result.output), "pt") as a, safe_open(str(bfl), "pt") as b, safe_open(str(back), "pt") as c:
        assert set(a.keys()) == set(c.keys())
        assert all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in a.keys())  # bit for bit
        keys, meta = set(b.keys()), b.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"
    again = convert_lora(back, tmp_path / "bfl2.safetensors", "kohya").out
    with safe_open(str(bfl), "pt") as b, safe_open(str(again), "pt") as d:
        assert set(b.keys()) == set(d.keys()) and all(torch.equal(b.get_tensor(k), d.get_tensor(k)) for k in b.keys())

    # diffusers reads BFL files too; its reader splits linear1 at FLUX.1's own widths (3 x 3072 + 12288), so the
    # tiny model's single blocks are left out of this comparison: both files hold the double blocks and CLIP-L.
    from safetensors.torch import load_file, save_file

    with safe_open(str(result.output), "pt") as f:
        header = f.metadata()
    doubles = {k: v for k, v in load_file(str(result.output)).items() if ".single_transformer_blocks." not in k}
    save_file(doubles, str(tmp_path / "doubles.safetensors"), metadata=header)
    doubles_bfl = convert_lora(tmp_path / "doubles.safetensors", tmp_path / "doubles-bfl.safetensors", "kohya").out
    pipe = FluxPipeline.from_pretrained(str(builtin_model_dir("tiny-flux")))
    pipe.set_progress_bar_config(disable=True)

    def render(path=None):
        if path is None:
            return pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, output_type="np",
                        guidance_scale=3.5, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(str(path), adapter_name="x")
        image = pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, output_type="np",
                     guidance_scale=3.5, generator=torch.Generator().manual_seed(0)).images
        pipe.delete_adapters("x")
        return image

    from_bfl, from_diffusers = render(doubles_bfl), render(tmp_path / "doubles.safetensors")
    np.testing.assert_allclose(from_bfl, from_diffusers, atol=1e-5)
    assert np.abs(from_bfl - render()).max() > 1e-3  # and the LoRA does something


@pytest.mark.slow  # renders with two tiny models (about 10 s on 2 cores)
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_sampling_through_the_t5_cache_renders_what_the_pipeline_encodes_itself(model, session_cache):
    """Grids and class images get their prompt embeddings from the family (T5 through its cache, so T5 can stay on
    the CPU); they must be the pictures the pipeline makes from the texts."""
    from dreamlora.sampling import render_images

    base = load_base_model(f"builtin:{model}")
    pipe = base.pipeline()
    settings = {"steps": 2, "guidance": 3.5, "resolution": 64, "negative_prompt": "blurry"}
    own = render_images(pipe, "a photo of sks ball", [0, 1], **settings)
    t5 = base.text_encoders[base.family.cached_text_encoder]
    cached = render_images(pipe, "a photo of sks ball", [0, 1], family=base.family, **settings)
    t5.to("meta")  # every prompt is cached now: T5 is not needed again
    again = render_images(pipe, "a photo of sks ball", [0, 1], family=base.family, **settings)
    for a, b, c in zip(own, cached, again):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(b), np.asarray(c))


# --- single-file transformers in BFL's layout ---------------------------------------------------------------------

FLUX1_LINEAR1 = (3072, 3072, 3072, 12288)  # the widths diffusers' BFL reader splits a single block's linear1 at


@pytest.fixture
def diffusers_reads_tiny_widths(monkeypatch):
    """diffusers' BFL reader (convert_flux_transformer_checkpoint_to_diffusers) splits single blocks' linear1 at
    FLUX.1's widths, hard-coded; the tiny model's are 3 x 32 + 128. Here each part is padded with zero rows to
    FLUX.1's width on the way in and cut back on the way out: every other step is diffusers' own."""
    import re

    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from dreamlora.models.flux_layout import MLP_RATIO

    entry = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    convert = entry["checkpoint_mapping_fn"]

    def padded(checkpoint, **kwargs):
        width = None
        for key in [k for k in checkpoint if re.search(r"single_blocks\.\d+\.linear1\.(weight|bias)$", k)]:
            width = checkpoint[key].shape[0] // (3 + MLP_RATIO)
            parts = checkpoint[key].split([width] * 3 + [MLP_RATIO * width])
            checkpoint[key] = torch.cat([torch.cat([p, p.new_zeros(size - len(p), *p.shape[1:])])
                                         for p, size in zip(parts, FLUX1_LINEAR1)])
        out = convert(checkpoint=checkpoint, **kwargs)
        for key in out:
            if re.fullmatch(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\.(weight|bias)", key):
                out[key] = out[key][: width * (MLP_RATIO if ".proj_mlp." in key else 1)]
        return out

    monkeypatch.setitem(entry, "checkpoint_mapping_fn", padded)


def tiny_flux_transformer(guidance: bool):
    """builtin:tiny-flux's transformer ([dev]: a guidance embedding) or its [schnell] twin, seeded."""
    from diffusers import FluxTransformer2DModel

    from dreamlora.models.tiny_transformers import TINY_FLUX_TRANSFORMER

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "guidance_embeds": guidance}).eval()


def save_bfl(transformer, path, prefix=""):
    from safetensors.torch import save_file

    from dreamlora.models.flux_layout import bfl_transformer_state_dict

    state = bfl_transformer_state_dict(transformer.state_dict())
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("guidance, kind", [(True, "flux-dev"), (False, "flux-schnell")])
def test_a_bfl_transformer_file_reads_back_through_diffusers_bit_for_bit(tmp_path, diffusers_reads_tiny_widths,
                                                                       guidance, kind):
    from diffusers import FluxTransformer2DModel

    from dreamlora.models.sdxl_layout import checkpoint_kind

    model = tiny_flux_transformer(guidance)
    state = save_bfl(model, tmp_path / "flux1.safetensors")
    diffusers_state = model.state_dict()
    double = "transformer_blocks.0.attn"
    assert torch.equal(state["double_blocks.0.img_attn.qkv.weight"],
                       torch.cat([diffusers_state[f"{double}.to_{p}.weight"] for p in "qkv"]))
    assert torch.equal(state["double_blocks.0.txt_attn.norm.key_norm.scale"], diffusers_state[f"{double}.norm_added_k.weight"])
    assert state["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)  # q, k, v, the MLP's input
    scale, shift = diffusers_state["norm_out.linear.weight"].chunk(2)  # BFL's final modulation: shift first
    assert torch.equal(state["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert ("guidance_in.in_layer.weight" in state) == guidance
    assert checkpoint_kind(state) == kind

    model.save_config(tmp_path / "config" / "transformer")
    loaded = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux1.safetensors"), config=str(tmp_path / "config"),
                                                     subfolder="transformer", local_files_only=True)
    assert_same_state(loaded, model)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # BFL's own files; ComfyUI's saves
def test_a_flux_transformer_file_loads_with_model_config_as_the_model_it_came_from(tiny_flux, tmp_path, prefix,
                                                                                diffusers_reads_tiny_widths):
    from dreamlora.models import export_single_file

    path = tmp_path / "flux1-dev.safetensors"
    if prefix:
        save_bfl(tiny_flux.unet, path, prefix)
    else:
        export_single_file(tiny_flux, path)  # FluxFamily.original_state_dict: the transformer alone, BFL names
    loaded = load_base_model(str(path), single_file_config=str(builtin_model_dir("tiny-flux")))
    assert isinstance(loaded.family, FluxFamily) and loaded.family.variant == "dev"
    assert loaded.identity == "flux1-dev.safetensors" and loaded.notes == []
    assert_same_state(loaded.unet, tiny_flux.unet)
    assert_same_state(loaded.vae, tiny_flux.vae)  # the rest is --model-config's
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    conditions = {"encoder_hidden_states": torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(3)),
                  "pooled_projections": torch.randn(1, 32, generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        expected = tiny_flux.family.predict(tiny_flux.unet, x, torch.tensor([500.0]), conditions)
        got = loaded.family.predict(loaded.unet, x, torch.tensor([500.0]), conditions)
    # The weights are the same bits; the output agrees to float32 rounding only, as a deepcopy of the very same
    # module does (CPU kernels sum in an order that depends on where the weights lie in memory).
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_a_schnell_file_with_a_dev_config_loads_as_schnell_and_says_so(tiny_flux, tmp_path, diffusers_reads_tiny_widths):
    schnell = tiny_flux_transformer(guidance=False)
    save_bfl(schnell, tmp_path / "flux1-schnell.safetensors")
    loaded = load_base_model(str(tmp_path / "flux1-schnell.safetensors"),
                             single_file_config=str(builtin_model_dir("tiny-flux")))  # a [dev] folder
    assert loaded.family.variant == "schnell" and not loaded.unet.config.guidance_embeds
    assert_same_state(loaded.unet, schnell)
    assert len(loaded.notes) == 1 and "Flux.1 [schnell]" in loaded.notes[0] and "scheduler" in loaded.notes[0]


def test_a_flux_transformer_file_without_model_config_is_one_line_naming_the_flag(tmp_path):
    from dreamlora.errors import ModelLoadError

    path = tmp_path / "flux1-dev.safetensors"
    save_bfl(tiny_flux_transformer(guidance=True), path)
    for load in (lambda: load_base_model(str(path)), lambda: read_model_configs(str(path))):  # loading, memory plan
        with pytest.raises(ModelLoadError) as caught:
            load()
        message = str(caught.value)
        assert "\n" not in message and "Flux.1 [dev] transformer" in message and "--model-config" in message
        assert "VAE, text encoders, tokenizers" in message
    sd_folder = tmp_path / "sd"  # configs of another pipeline: refused before any weight is read
    for part, config in (("", {"_class_name": "StableDiffusionPipeline"}), ("unet", {"in_channels": 4}),
                         ("vae", {"latent_channels": 4})):
        (sd_folder / part).mkdir(parents=True, exist_ok=True)
        (sd_folder / part / ("model_index.json" if not part else "config.json")).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'.*sd' is a StableDiffusionPipeline model; 'flux1-dev.safetensors' is "
                                             r"a Flux.1 \[dev\] transformer, which needs a FluxPipeline"):
        load_base_model(str(path), single_file_config=str(sd_folder))


def test_an_all_in_one_flux_checkpoint_is_refused_saying_what_to_pass(tmp_path):
    from safetensors.torch import save_file

    from dreamlora.errors import ModelLoadError

    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1),
               "vae.decoder.conv_in.weight": torch.zeros(1), "text_encoders.clip_l.logit_scale": torch.zeros(1)},
              str(tmp_path / "flux1-dev-fp8.safetensors"))
    with pytest.raises(ModelLoadError, match=r"all-in-one Flux checkpoint.*transformer alone.*--model-config"):
        load_base_model(str(tmp_path / "flux1-dev-fp8.safetensors"), single_file_config=str(tmp_path))


def test_the_identity_of_a_flux_transformer_file_covers_the_configs_weights(tmp_path, session_cache):
    import shutil

    from dreamlora.identity import model_identity

    path = tmp_path / "flux1-dev.safetensors"
    save_bfl(tiny_flux_transformer(guidance=True), path)
    folder = shutil.copytree(builtin_model_dir("tiny-flux"), tmp_path / "config")
    before = model_identity(str(path), str(folder))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # never read: not the model
    assert model_identity(str(path), str(folder)) == before
    vae = next((folder / "vae").glob("*.safetensors"))
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\1")  # another VAE: another model
    assert model_identity(str(path), str(folder)).fingerprint != before.fingerprint


# --- `dreamlora check` on kohya (BFL-named) Flux files -------------------------------------------------------------


def tiny_flux_lora_file(path, modules, *, rank=2, alpha=1.0, seed=0):
    """A diffusers-format LoRA of builtin:tiny-flux's `modules` (peft stems), random weights at the model's shapes."""
    from dreamlora.interop.formats import LoraModule, header_for, write_lora
    from dreamlora.interop.keymaps import ModelLayout

    layout = ModelLayout.from_configs(read_model_configs("builtin:tiny-flux"))
    shapes = {layout.peft_stem(t): info.shape for t, info in layout.modules.items()}
    g = torch.Generator().manual_seed(seed)
    lora = {stem: LoraModule(down=torch.randn(rank, shapes[stem][1], generator=g),
                             up=torch.randn(shapes[stem][0], rank, generator=g), alpha=alpha) for stem in modules}
    meta = layout.family.file_metadata(64)
    return write_lora(path, lora, "peft", header_for("peft", meta, lora, family=layout.family))


DOUBLE_AND_CLIP = [f"transformer.transformer_blocks.0.attn.{m}" for m in
                   ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")] + \
                  ["transformer.single_transformer_blocks.0.proj_out"] + \
                  [f"text_encoder.text_model.encoder.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj")]


def test_check_reads_a_bfl_named_flux_file_and_says_which_tools_load_it(tmp_path, session_cache):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from cli.main import app
    from dreamlora.errors import ConfigError
    from dreamlora.interop.check import check_file
    from dreamlora.interop.convert import convert_lora

    peft = tiny_flux_lora_file(tmp_path / "d.safetensors", DOUBLE_AND_CLIP)
    assert all(t.ok for t in check_file(peft, "builtin:tiny-flux").tools if t.tool != "automatic1111")  # ComfyUI too
    bfl = convert_lora(peft, tmp_path / "k.safetensors", "kohya").out  # as ComfyUI and sd-scripts name them
    with pytest.raises(ConfigError, match=r"'k.safetensors' is a Flux.1 LoRA that does not say which Flux model.*"
                                          r"--model \(a hub id such as black-forest-labs/FLUX.1-dev"):
        check_file(bfl)  # no dreamlora metadata naming its model, as files from sd-scripts
    report = check_file(bfl, "builtin:tiny-flux")
    assert (report.style, report.family, report.modules, report.errors) == ("kohya", "flux", 7, [])
    assert report.names == "Black Forest Labs' Flux module names"
    tools = {t.tool: t for t in report.tools}
    assert tools["comfyui"].ok and tools["comfyui"].intended and tools["diffusers"].ok
    assert tools["diffusers"].notes == []  # its Flux reader keeps each module's alpha (fused: 3, the others 1)
    assert not tools["automatic1111"].intended and "runs no Flux model" in tools["automatic1111"].notes[0]
    cli = CliRunner().invoke(app, ["check", str(bfl), "--model", "builtin:tiny-flux"])
    assert cli.exit_code == 0, cli.output
    assert "k.safetensors: kohya format in Black Forest Labs' Flux module names, 7 modules" in cli.output
    assert "ComfyUI              loads all" in cli.output and "ok: every tool" in cli.output

    # Shapes against the fused module (q, k, v stacked: 96 x 32), stems naming no module, and the header's variant.
    tensors, meta = load_file(str(bfl)), {**read_lora(bfl).metadata, "modelspec.architecture": "flux-1-schnell/lora"}
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors[f"{qkv}.lora_up.weight"] = tensors[f"{qkv}.lora_up.weight"][:95]
    tensors[qkv.replace("_0_", "_5_") + ".lora_down.weight"] = tensors.pop("lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight")
    tensors[qkv.replace("_0_", "_5_") + ".lora_up.weight"] = tensors.pop("lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight")
    tensors[qkv.replace("_0_", "_5_") + ".alpha"] = tensors.pop("lora_unet_double_blocks_0_txt_attn_qkv.alpha")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    errors = " ".join(check_file(tmp_path / "bad.safetensors", "builtin:tiny-flux").errors)
    assert f"'{qkv}' gives 95 outputs (up (95, 6)), the layer 96 (unet module 'double_blocks.0.img_attn.qkv', " \
           "weight (96, 32))" in errors
    assert "1 of 7 modules name no module of the model ('lora_unet_double_blocks_5_img_attn_qkv')" in errors
    assert "header 'modelspec.architecture' is 'flux-1-schnell/lora' but the base model is 'flux-1-dev/lora'" in errors


def test_check_says_diffusers_refuses_a_flux_file_whose_linear1_is_not_flux1_wide(tmp_path, session_cache):
    from dreamlora.interop.check import check_file
    from dreamlora.interop.convert import convert_lora

    singles = [f"transformer.single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]
    peft = tiny_flux_lora_file(tmp_path / "d.safetensors", singles)
    report = check_file(convert_lora(peft, tmp_path / "k.safetensors", "kohya").out, "builtin:tiny-flux")
    tools = {t.tool: t for t in report.tools}
    assert tools["comfyui"].ok  # lora_unet_single_blocks_0_linear1: q, k, v and the MLP's input, 224 x 32
    assert tools["diffusers"].loaded == 0 and "(3 x 3072 + 12288 = 21504 outputs); this file's have 224" in \
        tools["diffusers"].notes[0]
    assert report.errors == ["diffusers would not load 1 of 1 modules ('lora_unet_single_blocks_0_linear1')"]


def test_baking_into_a_flux_single_file_writes_the_transformer_and_keeps_no_clip_change_silently(
        tiny_flux, tmp_path, diffusers_reads_tiny_widths):
    from dreamlora.errors import ConfigError
    from dreamlora.interop.merge import bake_loras, merged_weight

    stem = "transformer.transformer_blocks.0.attn.to_q"
    lora = tiny_flux_lora_file(tmp_path / "q.safetensors", [stem], alpha=3.0)
    out = bake_loras("builtin:tiny-flux", [lora], tmp_path / "baked.safetensors", save_dtype="fp32").out
    loaded = load_base_model(str(out), single_file_config=str(builtin_model_dir("tiny-flux")))
    base = dict(tiny_flux.unet.named_parameters())
    for name, weight in loaded.unet.named_parameters():
        changed = name == "transformer_blocks.0.attn.to_q.weight"
        expected = merged_weight(base[name], read_lora(lora).modules[stem], 1.0) if changed else base[name]
        assert torch.equal(weight, expected), name

    with_clip = tiny_flux_lora_file(tmp_path / "qc.safetensors", [stem, DOUBLE_AND_CLIP[-1]])
    with pytest.raises(ConfigError, match=r"flux single file holds the denoiser alone, so the LoRA's changes to "
                                          r"text_encoder would be lost; bake into a diffusers folder"):
        bake_loras("builtin:tiny-flux", [with_clip], tmp_path / "baked2.safetensors")
