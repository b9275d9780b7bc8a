"""SDXL in the original (Stability "SGM") layout: tiny test model, single-file export, file kinds, kohya names.

Everything here is a pure function of weights, configs or key names; nothing is loaded from the hub.

- `TINY_SDXL_*` and `build_tiny_sdxl_pipeline`: a random-weight SDXL (two text encoders, size
  conditions) that renders 64 px images on a CPU in about a second, for tests.
- `sdxl_original_state_dict` / `export_sdxl_single_file`: a diffusers SDXL as one
  `sd_xl_base_1.0.safetensors`-style file. The UNet, VAE and text-encoder renames of SD 1/2
  (`dreamlora.models.single_file`) are reused; SDXL adds the size-conditioning MLP (`label_emb`)
  and puts the two encoders under `conditioner.embedders.{0,1}`.
- `checkpoint_kind`: which model family a single-file checkpoint holds, from its key names.
- `kohya_unet_module_name` / `diffusers_unet_module_name`: the names SDXL LoRA files use for
  UNet modules. kohya's sd-scripts trains SDXL on the SGM UNet, so its files (and what
  AUTOMATIC1111 and ComfyUI expect) name modules by SGM path (`input_blocks.4.1...`), not by
  diffusers path (`down_blocks.1.attentions.0...`) as its SD 1.x files do.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..atomic import atomic_path
from ..errors import ConfigError, ModelLoadError
from .single_file import (
    _UNET_FIXED,
    _UNET_RESNET,
    UNET_PREFIX,
    VAE_PREFIX,
    _layers_per_block,
    _prefixed,
    _rename,
    clip_to_original,
    openclip_to_original,
    unet_to_original,
    vae_to_original,
)
from .builtin import TINY_UNET, TINY_VAE
from .tokenizer import load_tokenizer, write_tokenizer_files

if TYPE_CHECKING:  # diffusers and transformers take seconds to import; only the type checker needs them here
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

# Prefixes of sd_xl_base_1.0.safetensors (sgm's DiffusionEngine: model, first_stage_model, conditioner).
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."  # OpenAI CLIP ViT-L, transformers names
OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, open_clip names
KOHYA_UNET_PREFIX = "lora_unet_"

# OpenCLIP's learned temperature, as trained (exp(4.6052) = 100, the clamp it reached). The text tower never
# uses it, and diffusers' CLIPTextModelWithProjection has no such weight, but SDXL files carry it and
# kohya's sd-scripts writes it back when it re-saves a model.
OPENCLIP_LOGIT_SCALE = math.log(100.0)

# sgm's UNet feeds the size conditions through label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}

# Leaf modules outside the block structure, and the children of a ResBlock, as module paths (the tables in
# single_file.py are weight-name prefixes, "conv1." -> "in_layers.2."; these drop the trailing dot).
_FIXED_MODULES = {old[:-1]: new[:-1] for old, new in {**_UNET_FIXED, **_ADD_EMBEDDING}.items()}
_RESNET_MODULES = {old[:-1]: new[:-1] for old, new in _UNET_RESNET.items()}

WEIGHTS_SEED = 20240602  # the tiny SDXL's weights; a different stream from the SD 1/2 built-ins

# The tiny SDXL of diffusers' own pipeline tests (tests/pipelines/stable_diffusion_xl), at the same sizes: the SD 1/2
# built-ins' UNet levels, with SDXL's linear projections, size conditions and deeper second level.
TINY_SDXL_UNET = {
    **{k: v for k, v in TINY_UNET.items() if k != "cross_attention_dim"},
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,  # SDXL projects into attention with Linear layers, like SD 2
    "addition_embed_type": "text_time",  # pooled text + (original size, crop, target size) conditions
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 size numbers x 8 + pooled width (TEXT_2 projection)
    "cross_attention_dim": 32 + 64,  # both encoders' hidden states side by side: TEXT_1 + TEXT_2 widths
}
TINY_SDXL_VAE = {
    **TINY_VAE,  # two levels: downsamples by 2, as the SD 1/2 built-ins' VAE
    "scaling_factor": 0.13025,  # SDXL's VAE latent scale (SD 1/2 use 0.18215)
    "force_upcast": True,  # as SDXL's own VAE: it overflows in fp16, so it encodes and decodes in fp32
}
# Text encoder 1 stands in for OpenAI CLIP ViT-L (quick_gelu); vocab and special-token ids come from the tokenizer.
TINY_SDXL_TEXT_1 = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
# Text encoder 2 stands in for OpenCLIP ViT-bigG (gelu, with a text projection whose output is the pooled embedding).
# It is wider than encoder 1, as bigG (1280) is wider than ViT-L (768): diffusers' single-file loader tells the two
# encoders apart by width (it gives text_encoder_2 the CLIP-L weights when both are equally wide), and a width
# difference also catches concatenating the two hidden states in the wrong order.
TINY_SDXL_TEXT_2 = {
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
# SDXL base's noise schedule and sampler (its scheduler/scheduler_config.json).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


# --- tiny model ----------------------------------------------------------------------------------


def build_tiny_sdxl_pipeline(tokenizer_dir: str | os.PathLike) -> StableDiffusionXLPipeline:
    """A random-weight SDXL pipeline at the TINY_SDXL_* sizes, the same weights on every call.

    Args:
        tokenizer_dir: Folder the project's CLIP tokenizer files are written to; both encoders
            use that vocabulary (SDXL's two tokenizers share one BPE vocabulary too).

    Returns:
        A `diffusers.StableDiffusionXLPipeline` (EulerDiscreteScheduler, no watermarker, progress bar off).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    write_tokenizer_files(tokenizer_dir)
    tokenizer, tokenizer_2 = load_tokenizer(tokenizer_dir), load_tokenizer(tokenizer_dir)
    # CLIP pools the hidden state at the first eos_token_id, so the ids must be the tokenizer's.
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # fork_rng: seeding must not disturb the caller's random state; one seed a component keeps each
    # component's weights independent of the others' sizes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        torch.manual_seed(WEIGHTS_SEED + 1)
        vae = AutoencoderKL(**TINY_SDXL_VAE)
        torch.manual_seed(WEIGHTS_SEED + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_1, **ids))
        torch.manual_seed(WEIGHTS_SEED + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2, **ids))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- single-file export --------------------------------------------------------------------------


def sdxl_original_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> dict[str, torch.Tensor]:
    """All SDXL weights under the names of `sd_xl_base_1.0.safetensors`.

    - UNet -> `model.diffusion_model.*`, with `add_embedding.linear_1/2` -> `label_emb.0.0/0.2`;
    - VAE -> `first_stage_model.*`;
    - text encoder 1 (CLIP ViT-L) -> `conditioner.embedders.0.transformer.text_model.*`, transformers names;
    - text encoder 2 (OpenCLIP bigG) -> `conditioner.embedders.1.model.*`: fused `attn.in_proj_weight/bias`,
      `text_projection` as (width, projection) (OpenCLIP computes x @ P), `positional_embedding`, `ln_final`,
      plus `logit_scale`, which the file format carries although text conditioning never reads it.

    Args:
        unet: The SDXL UNet (`addition_embed_type="text_time"`).
        vae: Its AutoencoderKL.
        text_encoder: The CLIPTextModel (first encoder).
        text_encoder_2: The CLIPTextModelWithProjection (second encoder, gives the pooled embedding).

    Returns:
        The tensors by original key (they share storage with the modules; copy before modifying).

    Raises:
        ModelLoadError: a weight the original layout has no name for (e.g. a UNet that is not SDXL's).
    """
    unet_state = unet.state_dict()
    # The generic SD 1/2 UNet rules have no name for the size-conditioning MLP; rename it here.
    added = {key: unet_state.pop(key) for key in list(unet_state) if key.startswith("add_embedding.")}
    unet_original = unet_to_original(unet_state, dict(unet.config))
    for key, value in added.items():
        name = _rename(key, _ADD_EMBEDDING)
        if name == key:
            raise ModelLoadError(f"cannot export UNet weight '{key}': the SDXL layout has no name for it.")
        unet_original[name] = value
    text_2 = openclip_to_original(text_encoder_2.state_dict())
    text_2["logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=text_2["ln_final.weight"].dtype)
    return {
        **_prefixed(UNET_PREFIX, unet_original),
        **_prefixed(VAE_PREFIX, vae_to_original(vae.state_dict(), dict(vae.config))),
        **_prefixed(CLIP_L_PREFIX, clip_to_original(text_encoder.state_dict())),
        **_prefixed(OPENCLIP_G_PREFIX, text_2),
    }


def export_sdxl_single_file(
    pipe: StableDiffusionXLPipeline,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an SDXL pipeline's weights as one original-layout .safetensors file (atomically).

    Args:
        pipe: The pipeline whose unet, vae, text_encoder and text_encoder_2 are written.
        path: The file to write; must end in .safetensors.
        dtype: dtype of the stored weights (released SDXL files are fp16; the default keeps every bit).

    Returns:
        The path written.

    Raises:
        ConfigError: `path` does not end in .safetensors.
        ModelLoadError: a weight the original layout has no name for.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"export file '{path}' must end in .safetensors (the only format written).")
    from safetensors.torch import save_file

    state = sdxl_original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    # safetensors writes contiguous CPU tensors only; .to() and .contiguous() copy just the ones that need it.
    state = {key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path


# --- what a checkpoint holds ---------------------------------------------------------------------

CheckpointKind = Literal["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux-dev", "flux-schnell", "flux-all-in-one",
                         "lora", "unknown"]

_LORA_KEY = re.compile(r"^lora_|\.lora_[AB]\.|\.lora_(?:down|up)\.|[._]lora\.(?:down|up)\.|\.lora_magnitude_vector")
# What a checkpoint holds besides its denoiser: a VAE (LDM/SGM names, ComfyUI's newer `vae.`) or text encoders.
_BESIDES_DENOISER = ("first_stage_model.", "vae.", "cond_stage_model.", "conditioner.", "text_encoders.")


def checkpoint_kind(keys: Iterable[str]) -> CheckpointKind:
    """Classify an original-layout single-file checkpoint by its key names alone.

    Each kind is decided by the prefixes below, checked in this order (the first that matches wins):

    - "lora": every key is a LoRA key: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te*_*`, with
      `.lora_down/.lora_up/.alpha`), peft / diffusers (`*.lora_A.*`, `*.lora_B.*`) or older diffusers
      (`*_lora.down.*`, `*_lora.up.*`).
    - "sd3": MMDiT joint blocks, `model.diffusion_model.joint_blocks.*` (or bare `joint_blocks.*`).
    - "flux-dev" / "flux-schnell": a Flux transformer alone in Black Forest Labs' layout (`flux1-dev.safetensors`):
      double-stream blocks, bare `double_blocks.*` as BFL names them or under ComfyUI's `model.diffusion_model.`,
      and no VAE or text encoder; [dev] has a guidance embedding (`guidance_in.*`), [schnell] none.
    - "flux-all-in-one": Flux's blocks beside a VAE or text encoders (`first_stage_model.`, `vae.`,
      `text_encoders.`, ...), as ComfyUI's all-in-one checkpoints bundle them.
    - "sdxl": the SGM UNet `model.diffusion_model.*` and OpenCLIP bigG as the second embedder,
      `conditioner.embedders.1.model.*`.
    - "sdxl-refiner": the SGM UNet and OpenCLIP as the first and only OpenCLIP embedder,
      `conditioner.embedders.0.model.*` (the refiner has no CLIP ViT-L).
    - "sd2": the LDM UNet `model.diffusion_model.*` and OpenCLIP ViT-H under `cond_stage_model.model.*`.
    - "sd1": the LDM UNet and OpenAI CLIP ViT-L under `cond_stage_model.transformer.*`.
    - "unknown": anything else, including no keys and a UNet without its text encoder (SD 1, SD 2 and SDXL
      UNets share their `model.diffusion_model.*` names; only widths, which names do not show, tell them apart).

    Args:
        keys: The checkpoint's tensor names (a state dict, or `safe_open(...).keys()`).

    Returns:
        One of "sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux-dev", "flux-schnell", "flux-all-in-one", "lora",
        "unknown".
    """
    keys = list(keys)
    if not keys:
        return "unknown"
    if all(_LORA_KEY.search(key) for key in keys):
        return "lora"

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if has(UNET_PREFIX + "joint_blocks.", "joint_blocks."):
        return "sd3"
    if has(UNET_PREFIX + "double_blocks.", "double_blocks."):
        if has(*_BESIDES_DENOISER):
            return "flux-all-in-one"
        return "flux-dev" if has(UNET_PREFIX + "guidance_in.", "guidance_in.") else "flux-schnell"
    if not has(UNET_PREFIX):
        return "unknown"
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return "unknown"


# --- kohya / AUTOMATIC1111 names of SDXL UNet modules --------------------------------------------

# SGM module-path parts that contain an underscore; kohya writes every "." as "_", so reading a name back
# splits on "_" and joins these pairs again. Everything else in an SGM UNet path is one word.
_SGM_COMPOUNDS = frozenset({
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb",  # UNetModel
    "in_layers", "emb_layers", "out_layers", "skip_connection",  # ResBlock
    "proj_in", "proj_out", "transformer_blocks",  # SpatialTransformer
    "to_q", "to_k", "to_v", "to_out",  # CrossAttention
})


def kohya_unet_module_name(diffusers_module: str, unet_config: dict) -> str:
    """A diffusers SDXL UNet module path -> its name in kohya / AUTOMATIC1111 / ComfyUI SDXL LoRA files.

    The name is `lora_unet_` + the module's SGM path with dots as underscores, e.g.
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` and `...to_out.0` -> `..._to_out_0`.

    Args:
        diffusers_module: A module path of the UNet (`named_modules()`), without `.weight`.
        unet_config: The UNet's config (layers_per_block, down_block_types, up_block_types).

    Returns:
        The kohya module name (append `.lora_down.weight`, `.lora_up.weight`, `.alpha` for the tensors).

    Raises:
        ValueError: the path is not a module of a UNet with this config.
    """
    return KOHYA_UNET_PREFIX + sgm_unet_module_name(diffusers_module, unet_config).replace(".", "_")


def diffusers_unet_module_name(kohya_name: str, unet_config: dict) -> str:
    """The inverse of `kohya_unet_module_name`: `lora_unet_input_blocks_4_1_...` -> `down_blocks.1.attentions.0...`.

    Args:
        kohya_name: A kohya module name (`lora_unet_...`, without `.lora_down.weight` or `.alpha`).
        unet_config: The UNet's config.

    Returns:
        The diffusers module path.

    Raises:
        ValueError: not a `lora_unet_` name, or no module of a UNet with this config has that name.
    """
    if not kohya_name.startswith(KOHYA_UNET_PREFIX):
        raise ValueError(f"kohya UNet module name {kohya_name!r} must start with {KOHYA_UNET_PREFIX!r}.")
    words = kohya_name.removeprefix(KOHYA_UNET_PREFIX).split("_")
    parts: list[str] = []
    for word in words:
        if parts and f"{parts[-1]}_{word}" in _SGM_COMPOUNDS:
            parts[-1] = f"{parts[-1]}_{word}"
        else:
            parts.append(word)
    sgm = ".".join(parts)
    try:
        return diffusers_from_sgm_module_name(sgm, unet_config)
    except ValueError as exc:
        raise ValueError(f"kohya UNet module name {kohya_name!r}: {exc}") from None


def sgm_unet_module_name(diffusers_module: str, unet_config: dict) -> str:
    """A diffusers UNet module path -> the same module's path in the SGM (original) UNet.

    The SGM UNet numbers its blocks flatly. input_blocks[0] is conv_in; then each level b has
    `layers` blocks (a ResBlock at `.0`, its SpatialTransformer at `.1`) and, except the last level,
    one Downsample: input_blocks[1 + b * (layers + 1) + l]. output_blocks[b * (layers + 1) + l] hold
    `layers + 1` blocks a level, the Upsample beside the level's last block (at `.2` after a
    SpatialTransformer, else `.1`). middle_block is ResBlock, SpatialTransformer, ResBlock.

    Args:
        diffusers_module: A module path of the UNet, e.g. `up_blocks.0.attentions.2.proj_in`.
        unet_config: The UNet's config.

    Returns:
        The SGM module path (without `model.diffusion_model.`).

    Raises:
        ValueError: the path is not a module of a UNet with this config.
    """
    layers, down_attention, up_attention = _unet_shape(unet_config)
    levels = len(down_attention)

    def check(ok: bool) -> None:
        if not ok:
            raise ValueError(
                f"'{diffusers_module}' is not a module of this UNet ({levels} levels of {layers} layers; "
                f"down {list(unet_config['down_block_types'])}, up {list(unet_config['up_block_types'])})."
            )

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", diffusers_module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        check(block < levels and layer < layers and (kind == "resnets" or down_attention[block]))
        index = 1 + block * (layers + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0{_resnet_to_sgm(rest, check)}"
        return f"input_blocks.{index}.1{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", diffusers_module):
        block = int(m[1])
        check(block < levels - 1)
        return f"input_blocks.{1 + block * (layers + 1) + layers}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)(\..+)?", diffusers_module):
        check(int(m[1]) < 2)
        return f"middle_block.{2 * int(m[1])}{_resnet_to_sgm(m[2] or '', check)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0(\..+)?", diffusers_module):
        return f"middle_block.1{m[1] or ''}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..+)?", diffusers_module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        check(block < levels and layer < layers + 1 and (kind == "resnets" or up_attention[block]))
        index = block * (layers + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0{_resnet_to_sgm(rest, check)}"
        return f"output_blocks.{index}.1{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", diffusers_module):
        block = int(m[1])
        check(block < levels - 1)
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if up_attention[block] else 1}.conv"
    check(diffusers_module in _FIXED_MODULES)
    return _FIXED_MODULES[diffusers_module]


def diffusers_from_sgm_module_name(sgm_module: str, unet_config: dict) -> str:
    """The inverse of `sgm_unet_module_name`: an SGM UNet module path -> the diffusers module path.

    Raises:
        ValueError: no module of a UNet with this config has that SGM path.
    """
    layers, down_attention, up_attention = _unet_shape(unet_config)
    levels = len(down_attention)

    def fail() -> ValueError:
        return ValueError(
            f"'{sgm_module}' is not a module of this UNet's SGM layout ({levels} levels of {layers} layers)."
        )

    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)(\..+)?", sgm_module):
        index, part, rest = int(m[1]), int(m[2]), m[3] or ""
        if index == 0:
            if part != 0 or rest:
                raise fail()
            return "conv_in"
        block, layer = divmod(index - 1, layers + 1)
        if block >= levels:
            raise fail()
        if layer == layers:  # the level's Downsample
            if block == levels - 1 or part != 0 or rest != ".op":
                raise fail()
            return f"down_blocks.{block}.downsamplers.0.conv"
        if part == 0:
            return f"down_blocks.{block}.resnets.{layer}{_resnet_from_sgm(rest, fail)}"
        if part == 1 and down_attention[block]:
            return f"down_blocks.{block}.attentions.{layer}{rest}"
        raise fail()
    if m := re.fullmatch(r"middle_block\.(\d+)(\..+)?", sgm_module):
        index, rest = int(m[1]), m[2] or ""
        if index in (0, 2):
            return f"mid_block.resnets.{index // 2}{_resnet_from_sgm(rest, fail)}"
        if index == 1:
            return f"mid_block.attentions.0{rest}"
        raise fail()
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)(\..+)?", sgm_module):
        index, part, rest = int(m[1]), int(m[2]), m[3] or ""
        block, layer = divmod(index, layers + 1)
        if block >= levels:
            raise fail()
        upsampler_part = 2 if up_attention[block] else 1
        if part == 0:
            return f"up_blocks.{block}.resnets.{layer}{_resnet_from_sgm(rest, fail)}"
        if part == upsampler_part and layer == layers and block < levels - 1:
            if rest != ".conv":
                raise fail()
            return f"up_blocks.{block}.upsamplers.0.conv"
        if part == 1 and up_attention[block]:
            return f"up_blocks.{block}.attentions.{layer}{rest}"
        raise fail()
    fixed = {sgm: diffusers for diffusers, sgm in _FIXED_MODULES.items()}
    if sgm_module not in fixed:
        raise fail()
    return fixed[sgm_module]


def _unet_shape(config: dict) -> tuple[int, list[bool], list[bool]]:
    """(layers per level, which down levels have attention, which up levels have attention) of a UNet config."""
    layers = _layers_per_block(config)
    # Cross-attention blocks ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") are the ones with a SpatialTransformer.
    down = ["CrossAttn" in kind for kind in config["down_block_types"]]
    up = ["CrossAttn" in kind for kind in config["up_block_types"]]
    return layers, down, up


def _resnet_to_sgm(rest: str, check: Callable[[bool], None]) -> str:
    """`.conv1` (a child of a diffusers ResnetBlock2D) -> `.in_layers.2` (the LDM ResBlock's); "" stays ""."""
    if not rest:
        return ""
    check(rest[1:] in _RESNET_MODULES)
    return "." + _RESNET_MODULES[rest[1:]]


def _resnet_from_sgm(rest: str, fail: Callable[[], ValueError]) -> str:
    if not rest:
        return ""
    inverse = {sgm: diffusers for diffusers, sgm in _RESNET_MODULES.items()}
    if rest[1:] not in inverse:
        raise fail()
    return "." + inverse[rest[1:]]
