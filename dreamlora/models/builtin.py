"""Built-in tiny models: random-weight SD 1 and SD 2 layouts that run on a CPU in seconds, and `toy`.

The random-weight ones are not for pictures anyone wants to look at; they let the whole tool
(training, priors, sampling, export) run and be tested without downloading a multi-gigabyte base
model. Each one is built once, from a fixed seed, into `cache_dir()/builtin/<name>-<BUILDER_VERSION>/`
as a standard diffusers StableDiffusionPipeline folder with safetensors weights.

`toy` is different: an SD 1.x-layout model pretrained on the toy world (dreamlora.toyworld), whose
weights ship inside the package in `dreamlora/builtin_models/toy/`. It is loaded from there, never
rebuilt; `python -m dreamlora.toyworld.pretrain` is how it was made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..paths import cache_dir
from .tokenizer import load_tokenizer, write_t5_tokenizer_files, write_tokenizer_files

# Bump when anything below changes the built weights or configs, so old cache folders are not reused.
BUILDER_VERSION = "1"
WEIGHTS_SEED = 20240601

# SD 1.5's noise schedule, shared by both built-ins.
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# The "tiny" configs of /work/shared/bench_models.json (the reference-figure models), copied here.
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,  # latents of 64 px images: the tiny VAE downsamples by 2
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
}
TINY_VAE = {
    "block_out_channels": (32, 64),
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "sample_size": 64,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": 32,
    "max_position_embeddings": 77,
}


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: an SD 1, SD 2 or SDXL layout at the tiny size."""

    name: str
    description: str
    layout: Literal["sd1", "sd2", "sdxl", "sd3", "flux"]  # sd2: gelu text encoder, linear attention projections, v-prediction
    shipped: bool = False  # trained weights in SHIPPED_DIR/<name>/, loaded as they are (never built)

    @property
    def v2(self) -> bool:
        return self.layout == "sd2"


# The training settings a built-in model needs where the defaults (sized for SD 1.5) do not fit it are
# declared with each config key (`recommended=` in dreamlora.config). builtin:toy's UNet is this small (32-channel
# attention at the finest level): it learns the subject's dots only with more adapter rank, a higher rate and the
# text encoder trained too, and a class loss at half weight (λ 1 held subject detection to 0.47-0.62 over training
# seeds 0-2, λ 0.5 gave 0.56-1.00 with class renders as clean): measured with `dreamlora eval`.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-sd": BuiltinModel("tiny-sd", "random-weight SD 1.x layout, epsilon prediction, 64 px", "sd1"),
    "tiny-sd2": BuiltinModel("tiny-sd2", "random-weight SD 2.x layout, v-prediction, 64 px", "sd2"),
    "tiny-sdxl": BuiltinModel("tiny-sdxl", "random-weight SDXL layout (two text encoders, size conditions), "
                              "epsilon prediction, 64 px", "sdxl"),
    "tiny-sd3": BuiltinModel("tiny-sd3", "random-weight SD3 layout (MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE), "
                             "rectified flow, 64 px", "sd3"),
    "tiny-flux": BuiltinModel("tiny-flux", "random-weight Flux.1 [dev] layout (double and single blocks, guidance "
                              "embedding, CLIP-L + T5, 2x2 latent patches), rectified flow, 64 px", "flux"),
    "toy": BuiltinModel("toy", "SD 1.x layout pretrained on the toy world (balls, cubes, cups, stars), "
                        "epsilon prediction, 64 px", "sd1", shipped=True),
    "toy-dots": BuiltinModel("toy-dots", "SD 1.x layout pretrained on the white-dot toy world (a share of objects "
                             "carry white dots; never the red ball with white dots), 32x32 latents, 64 px", "sd1",
                             shipped=True),
}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "builtin_models"


def builtin_spec(name: str) -> BuiltinModel:
    """The built-in model called `name`.

    Raises:
        ModelLoadError: no built-in model has that name.
    """
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise ModelLoadError(f"unknown built-in model 'builtin:{name}'. Known built-in models: {known}.")
    return BUILTIN_MODELS[name]


def builtin_model_dir(name: str) -> Path:
    """The diffusers folder of a built-in model, building it on first use.

    The model is built in a temporary folder beside the target and renamed into place, so a
    concurrent caller either sees no folder (and builds its own) or a complete one.

    Args:
        name: A key of BUILTIN_MODELS, without the "builtin:" prefix.

    Returns:
        `cache_dir()/builtin/<name>-<BUILDER_VERSION>/`, or for a shipped model its folder in the package.

    Raises:
        ModelLoadError: unknown name, or a shipped model missing from the installed package.
    """
    spec = builtin_spec(name)
    if spec.shipped:
        folder = SHIPPED_DIR / name
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"built-in model 'builtin:{name}' is missing from this installation ('{folder}' "
                                 "has no model_index.json). Reinstall dreamlora.")
        return folder
    target = cache_dir() / "builtin" / f"{name}-{BUILDER_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _no_progress_bars():
            _build_pipeline(spec, tmp / "_tokenizer").save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_tokenizer")
        # Replace what the tokenizers' save_pretrained wrote (a tokenizer.json and a config naming
        # load-time options) with the plain CLIP files, which every transformers version reads.
        # T5's tokenizer (SD3's third, Flux's second) is rewritten as a plain tokenizer.json folder too.
        t5_folder = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(spec.layout)
        for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if (tmp / folder).is_dir():
                shutil.rmtree(tmp / folder)
                (write_t5_tokenizer_files if folder == t5_folder else write_tokenizer_files)(tmp / folder)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its finished build into place first; use that one.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar while saving: the library does not print."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def builtin_config_values(spec: BuiltinModel) -> dict:
    """The configs of a random-weight built-in (unet, vae, text_encoders, scheduler, index), without building it."""
    from .tokenizer import DEFAULT_WORDS, build_merges, build_vocab

    vocab = len(build_vocab(build_merges(DEFAULT_WORDS)))
    if spec.layout == "sd3":
        from .tiny_transformers import tiny_sd3_config_values

        return tiny_sd3_config_values(vocab)
    if spec.layout == "flux":
        from .tiny_transformers import tiny_flux_config_values

        return tiny_flux_config_values(vocab)
    if spec.layout == "sdxl":
        from .sdxl_layout import SDXL_SCHEDULER, TINY_SDXL_TEXT_1, TINY_SDXL_TEXT_2, TINY_SDXL_UNET, TINY_SDXL_VAE

        texts = [{**TINY_SDXL_TEXT_1, "vocab_size": vocab, "architectures": ["CLIPTextModel"]},
                 {**TINY_SDXL_TEXT_2, "vocab_size": vocab, "architectures": ["CLIPTextModelWithProjection"]}]
        return {"unet": dict(TINY_SDXL_UNET), "vae": dict(TINY_SDXL_VAE), "text_encoders": texts,
                "scheduler": {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER},
                "index": {"_class_name": "StableDiffusionXLPipeline"}}
    text = {**TINY_TEXT, "vocab_size": vocab, "hidden_act": "gelu" if spec.v2 else "quick_gelu"}
    scheduler = _scheduler(spec)
    return {"unet": {**TINY_UNET, "use_linear_projection": spec.v2}, "vae": dict(TINY_VAE), "text_encoders": [text],
            "scheduler": {"_class_name": type(scheduler).__name__, **scheduler.config},
            "index": {"_class_name": "StableDiffusionPipeline"}}


def _build_pipeline(spec: BuiltinModel, tokenizer_dir: Path):
    """A StableDiffusion(XL)Pipeline with seeded random weights; the tokenizer files go to `tokenizer_dir`."""
    from diffusers import StableDiffusionPipeline

    if spec.layout == "sdxl":
        from .sdxl_layout import build_tiny_sdxl_pipeline

        return build_tiny_sdxl_pipeline(tokenizer_dir)
    if spec.layout == "sd3":
        from .tiny_transformers import build_tiny_sd3_pipeline

        return build_tiny_sd3_pipeline(tokenizer_dir)
    if spec.layout == "flux":
        from .tiny_transformers import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(tokenizer_dir)
    write_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    # fork_rng: seeding must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        unet = _tiny_unet(spec)
        torch.manual_seed(WEIGHTS_SEED + 1)
        vae = _tiny_vae()
        torch.manual_seed(WEIGHTS_SEED + 2)
        text_encoder = _tiny_text_encoder(spec, tokenizer)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(spec),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet(spec: BuiltinModel):
    from diffusers import UNet2DConditionModel

    # SD 2 projects into and out of attention with Linear layers instead of 1x1 convolutions.
    return UNet2DConditionModel(**TINY_UNET, use_linear_projection=spec.v2)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE)


def _tiny_text_encoder(spec: BuiltinModel, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        **TINY_TEXT,
        vocab_size=len(tokenizer),
        # CLIPTextModel pools the hidden state at the first eos_token_id, so the ids must be the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu" if spec.v2 else "quick_gelu",  # OpenCLIP (SD 2) vs OpenAI CLIP (SD 1)
    )
    return CLIPTextModel(config)


def _scheduler(spec: BuiltinModel):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = {**SD_SCHEDULE, "set_alpha_to_one": False, "steps_offset": 1}
    if spec.v2:
        return DDIMScheduler(**common, clip_sample=False, prediction_type="v_prediction")
    return PNDMScheduler(**common, skip_prk_steps=True, prediction_type="epsilon")
