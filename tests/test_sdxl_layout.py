"""SDXL layout: the tiny SDXL, single-file export and reload, checkpoint kinds, kohya LoRA names."""

import contextlib
import logging

import pytest
import torch
from peft.tuners.lora import LoraLayer

from dreamlora.errors import ConfigError
from dreamlora.models import load_base_model
from dreamlora.models.sdxl_layout import (
    TINY_SDXL_TEXT_1,
    TINY_SDXL_TEXT_2,
    TINY_SDXL_UNET,
    build_tiny_sdxl_pipeline,
    checkpoint_kind,
    diffusers_unet_module_name,
    export_sdxl_single_file,
    kohya_unet_module_name,
    sdxl_original_state_dict,
)
from dreamlora.models.single_file import original_state_dict

PROMPT = "a photo of sks dog"
ATTENTION_PROJECTIONS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                              for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
# SDXL base's UNet block layout (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), without the weights.
SDXL_BASE_UNET_CONFIG = {
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """One tiny SDXL for the tests that only read it (LoRA tests build their own: loading adapters changes it)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tokenizer"))


def render(pipe, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images


@contextlib.contextmanager
def library_warnings():
    """Collect WARNING+ records of diffusers, transformers and peft (diffusers' loggers do not reach caplog)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)  # another test may have quieted a library; these warnings must get through
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


# --- the tiny model --------------------------------------------------------------------------------


def test_tiny_sdxl_builds_seeded_and_renders(sdxl, tmp_path):
    rng = torch.random.get_rng_state()
    again = build_tiny_sdxl_pipeline(tmp_path / "tokenizer")
    assert torch.equal(torch.random.get_rng_state(), rng), "building must not move the caller's RNG"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(sdxl, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # SDXL's conditioning: both encoders' hidden states side by side, the pooled output of encoder 2 plus six
    # size numbers (8 sinusoidal features each) into the added embedding.
    widths = TINY_SDXL_TEXT_1["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"]
    assert sdxl.unet.config.cross_attention_dim == widths == 96
    assert sdxl.unet.config.projection_class_embeddings_input_dim == 6 * 8 + TINY_SDXL_TEXT_2["projection_dim"] == 80
    embeds, _, pooled, _ = sdxl.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 96) and pooled.shape == (1, 32)
    scheduler = sdxl.scheduler.config
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (scheduler.num_train_timesteps, scheduler.prediction_type) == (1000, "epsilon")
    assert sdxl.watermark is None

    image = render(sdxl)
    assert image.shape == (1, 64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())
    assert (render(again) == image).all()


# --- single-file export ----------------------------------------------------------------------------


def test_export_has_the_sdxl_base_layout(sdxl):
    state = sdxl_original_state_dict(sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2)
    parts = {"model.diffusion_model.": 0, "first_stage_model.": 0, "conditioner.embedders.0.transformer.text_model.": 0,
             "conditioner.embedders.1.model.": 0}
    for key in state:
        parts[next(p for p in parts if key.startswith(p))] += 1
    layers = TINY_SDXL_TEXT_2["num_hidden_layers"]
    assert parts == {
        "model.diffusion_model.": len(sdxl.unet.state_dict()),
        "first_stage_model.": len(sdxl.vae.state_dict()),
        "conditioner.embedders.0.transformer.text_model.": len(sdxl.text_encoder.state_dict()),
        # q, k, v (weight and bias) fuse into in_proj_weight / in_proj_bias: 4 fewer a layer; plus logit_scale
        "conditioner.embedders.1.model.": len(sdxl.text_encoder_2.state_dict()) - 4 * layers + 1,
    }
    unet = "model.diffusion_model."
    assert torch.equal(state[unet + "label_emb.0.0.weight"], sdxl.unet.add_embedding.linear_1.weight)
    assert torch.equal(state[unet + "label_emb.0.2.bias"], sdxl.unet.add_embedding.linear_2.bias)
    assert torch.equal(state[unet + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"],
                       sdxl.unet.down_blocks[1].attentions[0].transformer_blocks[1].attn2.to_k.weight)
    assert torch.equal(state[unet + "output_blocks.2.2.conv.weight"], sdxl.unet.up_blocks[0].upsamplers[0].conv.weight)

    g = "conditioner.embedders.1.model."
    tower = sdxl.text_encoder_2.text_model
    attn = tower.encoder.layers[3].self_attn
    assert torch.equal(state[g + "transformer.resblocks.3.attn.in_proj_weight"],
                       torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(state[g + "transformer.resblocks.3.attn.in_proj_bias"],
                       torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert torch.equal(state[g + "text_projection"], sdxl.text_encoder_2.text_projection.weight.T)
    assert state[g + "text_projection"].shape == (64, 32)  # (width, projection): OpenCLIP computes x @ P
    assert torch.equal(state[g + "positional_embedding"], tower.embeddings.position_embedding.weight)
    assert torch.equal(state[g + "ln_final.weight"], tower.final_layer_norm.weight)
    assert state[g + "logit_scale"].ndim == 0 and state[g + "logit_scale"].item() == pytest.approx(4.6052, abs=1e-4)
    clip_l = "conditioner.embedders.0.transformer.text_model."
    assert state[clip_l + "embeddings.position_embedding.weight"].shape == (77, 32)


def test_single_file_round_trip_through_diffusers(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "diffusers"
    sdxl.save_pretrained(folder)  # diffusers needs the configs (and tokenizers) of the same model
    path = export_sdxl_single_file(sdxl, tmp_path / "tiny-sdxl.safetensors")  # float32: every bit must survive
    assert checkpoint_kind(_keys(path)) == "sdxl"

    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original, reloaded = getattr(sdxl, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys(), name
        differ = [k for k in original if reloaded[k].is_meta or not torch.equal(original[k], reloaded[k])]
        assert differ == [], f"{name}: {differ[:5]}"
    loaded.set_progress_bar_config(disable=True)
    assert (render(loaded) == render(sdxl)).all()


def test_export_writes_the_dtype_and_refuses_other_suffixes(sdxl, tmp_path):
    from safetensors import safe_open

    path = export_sdxl_single_file(sdxl, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        export_sdxl_single_file(sdxl, tmp_path / "model.ckpt")
    assert not (tmp_path / "model.ckpt").exists()


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# --- checkpoint kinds ------------------------------------------------------------------------------

HAND_WRITTEN_KINDS = {
    "sdxl-refiner": [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.model.positional_embedding",
        "conditioner.embedders.0.model.text_projection",
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
        "first_stage_model.decoder.conv_in.weight",
    ],
    "sd3": [
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "model.diffusion_model.x_embedder.proj.weight",
        "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
        "first_stage_model.decoder.conv_in.weight",
    ],
    "flux-schnell": [  # Black Forest Labs' own file: bare transformer names, no guidance embedding
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "single_blocks.0.linear1.weight",
        "img_in.weight",
        "time_in.in_layer.weight",
    ],
    "flux-dev": [  # the transformer as ComfyUI saves a diffusion model, with [dev]'s guidance embedding
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "model.diffusion_model.guidance_in.in_layer.weight",
        "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
    ],
    "flux-all-in-one": [  # ComfyUI's checkpoint of transformer, VAE and text encoders
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "model.diffusion_model.guidance_in.in_layer.weight",
        "vae.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
    ],
    "lora": [  # diffusers / peft names
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    ],
    "unknown": [
        "model.diffusion_model.input_blocks.0.0.weight",  # a UNet alone: SD 1, 2 and XL share these names
        "model.diffusion_model.out.2.weight",
    ],
}


@pytest.mark.parametrize("kind", sorted(HAND_WRITTEN_KINDS))
def test_checkpoint_kind_of_hand_written_keys(kind):
    assert checkpoint_kind(HAND_WRITTEN_KINDS[kind]) == kind


def test_checkpoint_kind_of_exported_models(sdxl, session_cache):
    for name, kind in (("builtin:tiny-sd", "sd1"), ("builtin:tiny-sd2", "sd2")):
        assert checkpoint_kind(original_state_dict(load_base_model(name))) == kind
    state = sdxl_original_state_dict(sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2)
    assert checkpoint_kind(state) == "sdxl"
    assert checkpoint_kind(iter(state)) == "sdxl"  # any iterable of names, read once
    # ComfyUI saves Flux under the same prefix as the SD UNets; the blocks still say Flux (with a VAE: all in one).
    assert checkpoint_kind(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", *state]) == "flux-all-in-one"
    kohya = [f"{kohya_unet_module_name('mid_block.attentions.0.proj_in', sdxl.unet.config)}.{suffix}"
             for suffix in ("lora_down.weight", "lora_up.weight", "alpha")]
    assert checkpoint_kind(kohya + ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == "lora"
    assert checkpoint_kind(kohya + ["model.diffusion_model.out.2.weight"]) == "unknown"  # not only LoRA keys
    assert checkpoint_kind([]) == "unknown"


# --- kohya names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "diffusers_name", "kohya_name"),
    [
        (TINY_SDXL_UNET, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        (TINY_SDXL_UNET, "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj",
         "lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_0_proj"),
        (TINY_SDXL_UNET, "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0",
         "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0"),
        (TINY_SDXL_UNET, "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v",
         "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v"),
        (TINY_SDXL_UNET, "up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
        (TINY_SDXL_UNET, "up_blocks.1.resnets.2.conv_shortcut", "lora_unet_output_blocks_5_0_skip_connection"),
        (TINY_SDXL_UNET, "down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
        (TINY_SDXL_UNET, "down_blocks.0.resnets.1.time_emb_proj", "lora_unet_input_blocks_2_0_emb_layers_1"),
        (TINY_SDXL_UNET, "mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
        (TINY_SDXL_UNET, "conv_in", "lora_unet_input_blocks_0_0"),
        (TINY_SDXL_UNET, "add_embedding.linear_2", "lora_unet_label_emb_0_2"),
        (TINY_SDXL_UNET, "time_embedding.linear_1", "lora_unet_time_embed_0"),
        (TINY_SDXL_UNET, "conv_out", "lora_unet_out_2"),
        # SDXL base, three levels: the names found in SDXL LoRA files
        (SDXL_BASE_UNET_CONFIG, "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k",
         "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_k"),
        (SDXL_BASE_UNET_CONFIG, "up_blocks.1.attentions.2.proj_out", "lora_unet_output_blocks_5_1_proj_out"),
        (SDXL_BASE_UNET_CONFIG, "up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
        (SDXL_BASE_UNET_CONFIG, "up_blocks.2.resnets.0.norm1",
         "lora_unet_output_blocks_6_0_in_layers_0"),
        (SDXL_BASE_UNET_CONFIG, "down_blocks.1.downsamplers.0.conv", "lora_unet_input_blocks_6_0_op"),
    ],
)
def test_kohya_unet_names(config, diffusers_name, kohya_name):
    assert kohya_unet_module_name(diffusers_name, config) == kohya_name
    assert diffusers_unet_module_name(kohya_name, config) == diffusers_name


@pytest.mark.parametrize(
    "diffusers_name",
    [
        "down_blocks.0.attentions.0.proj_in",  # level 0 is a DownBlock2D: no attention
        "down_blocks.1.downsamplers.0.conv",  # the last level does not downsample
        "down_blocks.2.resnets.0.conv1",  # two levels only
        "down_blocks.1.resnets.2.conv1",  # two layers a level going down (three going up)
        "up_blocks.1.attentions.0.proj_in",  # level 1 going up is an UpBlock2D
        "down_blocks.0.resnets.0.nonlinearity",  # diffusers-only module
        "add_time_proj",
    ],
)
def test_kohya_unet_name_of_a_module_this_unet_lacks(diffusers_name):
    with pytest.raises(ValueError, match="not a module of this UNet"):
        kohya_unet_module_name(diffusers_name, TINY_SDXL_UNET)


@pytest.mark.parametrize(
    "kohya_name",
    [
        "lora_unet_input_blocks_3_1_proj_in",  # Downsample slot has no attention
        "lora_unet_input_blocks_1_1_proj_in",  # level 0 has no attention
        "lora_unet_output_blocks_9_0_in_layers_0",  # past the last level
        "lora_unet_output_blocks_5_1_conv",  # the last level does not upsample
        "lora_unet_middle_block_3_in_layers_0",
        "lora_unet_input_blocks_4_0_in_layers",  # a container, not a layer
        "lora_unet_down_blocks_1_attentions_0_proj_in",  # SD 1.x-style kohya name
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    ],
)
def test_diffusers_unet_name_of_a_name_this_unet_lacks(kohya_name):
    with pytest.raises(ValueError):
        diffusers_unet_module_name(kohya_name, TINY_SDXL_UNET)


def _lora_pair(module: torch.nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) for a Linear or Conv2d: (r, in[, kh, kw]) and (out, r[, 1, 1])."""
    if isinstance(module, torch.nn.Linear):
        down = torch.randn(rank, module.in_features, generator=generator)
        return down, torch.randn(module.out_features, rank, generator=generator)
    down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
    return down, torch.randn(module.out_channels, rank, 1, 1, generator=generator)


def _load_kohya_and_check(pipe, targets: dict[tuple[str, str], str], rank: int = 2, alpha: float = 1.0) -> None:
    """Load a kohya state dict for {(component, module path): kohya name}; check each module got its tensors."""
    generator = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for (component, module_name), kohya_name in targets.items():
        down, up = _lora_pair(getattr(pipe, component).get_submodule(module_name), rank, generator)
        state[f"{kohya_name}.lora_down.weight"] = down
        state[f"{kohya_name}.lora_up.weight"] = up
        state[f"{kohya_name}.alpha"] = torch.tensor(alpha)
        expected[(component, module_name)] = (down, up)
    assert checkpoint_kind(state) == "lora"

    with library_warnings() as warnings:
        pipe.load_lora_weights(dict(state))  # diffusers pops the keys it converts: give it a copy
    # Keys diffusers cannot place are reported, not raised: UNet ones by diffusers.utils.peft_utils ("unexpected
    # keys found in the model"), text-encoder ones by transformers.integrations.peft (a LOAD REPORT of UNEXPECTED keys).
    # diffusers also says so for a component the file has no keys for; that is expected here, nothing else is.
    untouched = {"unet", "text_encoder", "text_encoder_2"} - {component for component, _ in targets}

    def untouched_note(message: str) -> bool:
        return message.startswith("No LoRA keys") and any(f"prefix='{c}'" in message for c in untouched)

    assert [r.getMessage() for r in warnings if not untouched_note(r.getMessage())] == []

    adapted = {(component, name) for component in ("unet", "text_encoder", "text_encoder_2")
               for name, module in getattr(pipe, component).named_modules() if isinstance(module, LoraLayer)}
    assert adapted == set(expected), "exactly the named modules get an adapter"
    for (component, module_name), (down, up) in expected.items():
        layer = getattr(pipe, component).get_submodule(module_name)
        (adapter,) = layer.lora_A.keys()
        assert torch.equal(layer.lora_A[adapter].weight, down), module_name
        assert torch.equal(layer.lora_B[adapter].weight, up), module_name
        assert layer.scaling[adapter] == pytest.approx(alpha / rank)


def test_kohya_sdxl_lora_loads_into_diffusers(tmp_path):
    pipe = build_tiny_sdxl_pipeline(tmp_path / "tokenizer")
    config = pipe.unet.config
    targets = {}
    for name, _ in pipe.unet.named_modules():
        if name.endswith(ATTENTION_PROJECTIONS):
            kohya_name = kohya_unet_module_name(name, config)
            assert diffusers_unet_module_name(kohya_name, config) == name
            targets[("unet", name)] = kohya_name
    # 4 transformer blocks going down, 2 in the middle, 6 going up; 8 projections each.
    assert len(targets) == (2 * 1 * 2 + 2 + 3 * 2) * 8 == 96
    # Text encoders: kohya's lora_te1_ / lora_te2_ + the transformers 4.x module path, whatever the installed
    # transformers calls it (5.x's CLIPTextModel has no text_model level; CLIPTextModelWithProjection keeps it).
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for name, _ in getattr(pipe, component).named_modules():
            if name.endswith(TEXT_PROJECTIONS):
                path = name if name.startswith("text_model.") else f"text_model.{name}"
                targets[(component, name)] = prefix + path.replace(".", "_")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in targets.values()
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj" in targets.values()

    before = render(pipe)
    _load_kohya_and_check(pipe, targets)
    after = render(pipe)
    assert float(abs(after - before).max()) > 1e-2


def test_kohya_names_of_every_unet_layer_load_into_diffusers(tmp_path):
    """LoCon-style files adapt convolutions, resnets, samplers and embeddings too; every name must land."""
    pipe = build_tiny_sdxl_pipeline(tmp_path / "tokenizer")
    config = pipe.unet.config
    targets = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            kohya_name = kohya_unet_module_name(name, config)
            assert diffusers_unet_module_name(kohya_name, config) == name
            targets[("unet", name)] = kohya_name
    assert len(set(targets.values())) == len(targets) == 183
    _load_kohya_and_check(pipe, targets)
