"""The benchmark models: configs, random-weight diffusers folders, and images to train on.

- "tiny" and "small": the reference-figure models of the performance issue (/work/shared/bench_models.json,
  copied below), trained at 64 and 128 px.
- "sd15" and "sdxl": the SD 1.5 and SDXL base architectures, written from their published configs
  (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0) with random weights.
- "sd15-mini" and "sdxl-mini": the same layouts at a tenth of the width, for `gpu.sh --cpu-smoke`.

Folders are standard diffusers StableDiffusion(XL)Pipeline folders with the project's tokenizer
(dreamlora/models/tokenizer.py), so `--model <folder>` loads them like any base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"  # 5 PNGs, as in the reference set-up
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True, "prediction_type": "epsilon"}

BENCH = {  # /work/shared/bench_models.json
    "tiny": {
        "unet": {"block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 32, "in_channels": 4,
                 "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32},
        "vae": {"block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "latent_channels": 4, "sample_size": 64},
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 5,
                 "vocab_size": 1000, "projection_dim": 32},
        "resolution": 64,
    },
    "small": {
        "unet": {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "sample_size": 64, "in_channels": 4,
                 "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 "cross_attention_dim": 256, "attention_head_dim": 8},
        "vae": {"block_out_channels": [64, 128], "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "latent_channels": 4, "layers_per_block": 2,
                "sample_size": 128},
        "text": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_hidden_layers": 4,
                 "vocab_size": 1000, "projection_dim": 256},
        "resolution": 128,
    },
}

_SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": [320, 640, 1280, 1280],
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
              "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
           "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77}
_SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
              "block_out_channels": [320, 640, 1280],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
              "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
              "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
              "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77,
              "architectures": ["CLIPTextModelWithProjection"]}

ARCH = {
    "sd15": {"unet": _SD15_UNET, "vae": _SD_VAE, "text": CLIP_L, "resolution": 512},
    "sdxl": {"unet": _SDXL_UNET, "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                                         "force_upcast": True},
             "text": CLIP_L, "text_2": _CLIP_BIGG, "resolution": 1024},
    # Same layouts at a tenth of the width (and 2 of SDXL's 10 deep transformer layers): CPU smoke tests.
    "sd15-mini": {"unet": {**_SD15_UNET, "block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64,
                           "norm_num_groups": 16},
                  "vae": {**_SD_VAE, "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8},
                  "text": {**CLIP_L, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "vocab_size": 1000, "projection_dim": 64},
                  "resolution": 128},
    "sdxl-mini": {"unet": {**_SDXL_UNET, "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 4, 8],
                           "transformer_layers_per_block": [1, 2, 2], "cross_attention_dim": 64,
                           "addition_time_embed_dim": 32, "projection_class_embeddings_input_dim": 64 + 6 * 32,
                           "norm_num_groups": 16},
                  "vae": {**_SD_VAE, "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8},
                  "text": {**CLIP_L, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "vocab_size": 1000, "projection_dim": 32},
                  "text_2": {**_CLIP_BIGG, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
                             "num_hidden_layers": 2, "vocab_size": 1000, "projection_dim": 64},
                  "resolution": 256},
}
# FLUX.1 [dev]'s transformer, VAE and CLIP-L at their published sizes (black-forest-labs/FLUX.1-dev configs), T5 v1.1
# XXL at its width with 2 of its 24 layers: the benchmark's T5 encodes the prompts on the CPU (--t5-on-cpu), so its
# depth changes no accelerator figure, only the folder (9 GB less to write and read). "flux-mini": the same layout
# at toy width, for gpu.sh --cpu-smoke.
FLUX_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "norm_num_groups": 32, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "is_encoder_decoder": False, "use_cache": False}
FLUX = {
    "flux-dev": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE, "text": CLIP_L,
                 "t5": {**T5_XXL, "num_layers": 2}, "resolution": 512},
    "flux-mini": {"transformer": {**FLUX_DEV_TRANSFORMER, "num_layers": 2, "num_single_layers": 4,
                                  "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 256,
                                  "pooled_projection_dim": 64, "axes_dims_rope": [4, 6, 6]},
                  "vae": {**FLUX_VAE, "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8},
                  "text": {**CLIP_L, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "vocab_size": 1000, "projection_dim": 64},
                  "t5": {**T5_XXL, "d_model": 256, "d_ff": 512, "d_kv": 32, "num_heads": 8, "num_layers": 2},
                  "resolution": 128},
}
MODELS = {**BENCH, **ARCH, **FLUX}


def model_configs(name: str):
    """dreamlora.memory.ModelConfigs of a benchmark model (text encoders in pipeline order)."""
    from dreamlora.memory import ModelConfigs

    spec = MODELS[name]
    texts = tuple(_text_config(spec[k]) for k in ("text", "text_2") if spec.get(k))
    pipeline = "StableDiffusionXLPipeline" if spec["unet"].get("addition_embed_type") else "StableDiffusionPipeline"
    return ModelConfigs(dict(spec["unet"]), dict(spec["vae"]), texts, name,
                        {"_class_name": "PNDMScheduler", **SD_SCHEDULER}, {"_class_name": pipeline})


def _text_config(config: dict) -> dict:
    return {"max_position_embeddings": 77, **config}


def bench_dir() -> Path:
    """Where benchmark models and images are kept: $DREAMLORA_BENCH_DIR or /tmp/dreamlora-bench."""
    return Path(os.environ.get("DREAMLORA_BENCH_DIR", "/tmp/dreamlora-bench"))


def model_folder(name: str, *, device: str = "cpu") -> Path:
    """A diffusers folder of the SD-family benchmark model `name`, random weights from a fixed seed (built once).

    Full-size architectures are stored in fp16 (half the disk and load time); dreamlora loads them in fp32.
    """
    spec = MODELS[name]
    dtype = (torch.bfloat16 if name == "flux-dev" else torch.float16 if name in ("sd15", "sdxl") else
             torch.float32)
    key = hashlib.sha256(json.dumps([spec, str(dtype)], sort_keys=True).encode()).hexdigest()[:10]
    folder = bench_dir() / "models" / f"{name}-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    if name in FLUX:
        return _flux_folder(spec, folder, dtype, device)
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamlora.models.tokenizer import load_tokenizer, write_tokenizer_files

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tokenizer_files(tmp / "tokenizer")
    tokenizer = load_tokenizer(tmp / "tokenizer")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec["unet"])
        torch.manual_seed(1)
        vae = AutoencoderKL(**spec["vae"])
        torch.manual_seed(2)
        text = CLIPTextModel(CLIPTextConfig(**_text_config(spec["text"]), **ids))
        if spec.get("text_2"):
            torch.manual_seed(3)
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(spec["text_2"]), **ids))
    if spec.get("text_2"):
        scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                              if k not in ("skip_prk_steps", "set_alpha_to_one")})
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for part in ("tokenizer", "tokenizer_2"):  # the plain CLIP files, as the built-in models have
        if (tmp / part).is_dir():
            shutil.rmtree(tmp / part)
            write_tokenizer_files(tmp / part)
    os.replace(tmp, folder)
    return folder


def _flux_folder(spec: dict, folder: Path, dtype: torch.dtype, device: str) -> Path:
    """A random-weight FluxPipeline folder at `spec`'s sizes, built on `device` (FLUX.1-dev's 12 B parameters
    initialise in seconds on a GPU and in minutes on a CPU) and saved in `dtype`."""
    from dreamlora.models.tiny_transformers import build_tiny_flux_pipeline
    from dreamlora.models.tokenizer import write_t5_tokenizer_files, write_tokenizer_files

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device(device):
        pipe = build_tiny_flux_pipeline(tmp / "_tokenizer", transformer_config=spec["transformer"],
                                        vae_config=spec["vae"],
                                        clip_config={k: v for k, v in _text_config(spec["text"]).items()
                                                     if k != "vocab_size"},  # the tokenizer's own vocabulary
                                        t5_config=spec["t5"])
    pipe.to(dtype=dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    del pipe
    shutil.rmtree(tmp / "_tokenizer")
    for part, write in (("tokenizer", write_tokenizer_files), ("tokenizer_2", write_t5_tokenizer_files)):
        shutil.rmtree(tmp / part)
        write(tmp / part)
    os.replace(tmp, folder)
    return folder


def instance_folder(resolution: int) -> Path:
    """The 5 sample photos, upscaled to `resolution` when they are smaller (preflight refuses more than 4x)."""
    from PIL import Image

    if resolution <= 4 * 128:
        return INSTANCES
    folder = bench_dir() / "instance-images" / f"{resolution}px"
    if len(list(folder.glob("*.png"))) != 5:
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(INSTANCES.glob("*.png")):
            Image.open(path).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC).save(
                folder / path.name)
    return folder


def class_folder(resolution: int, count: int = 20) -> Path:
    """`count` random-noise PNGs at `resolution`: class images given with --class-dir (none are generated)."""
    from PIL import Image

    folder = bench_dir() / "class-images" / f"{resolution}px-{count}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(resolution)
    for i in range(count):
        pixels = torch.randint(0, 256, (resolution, resolution, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:05d}.png")
    return folder
