"""The families the loader walks, and the models it knows it cannot train (refused with the reason).

Detection reads configs only (model_index.json, the UNet, VAE, text-encoder and scheduler configs), or, for a
single-file checkpoint, its key names (sdxl_layout.checkpoint_kind): no weight is read to decide. A single file holds
a whole pipeline (SD 1.x/2.x, SDXL) or a Flux transformer alone, whose VAE, text encoders, tokenizers and scheduler
come from --model-config (`SingleFileKind`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from .configs import ModelConfigs
from .family import ModelFamily
from .sd import StableDiffusionFamily
from .flux import FluxFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

# Walked in order; the first whose detect() answers wins.
FAMILIES: tuple[type, ...] = (FluxFamily, StableDiffusion3Family, StableDiffusionXLFamily, StableDiffusionFamily)
SUPPORTED = "SD 1.x, SD 2.x, SDXL, SD3 and Flux.1"



@dataclass(frozen=True)
class SingleFileKind:
    """How a single-file checkpoint loads: as a whole pipeline, or as a transformer beside --model-config's parts."""

    pipeline_class: str  # the diffusers pipeline the model loads as
    transformer_class: str | None = None  # the file holds this denoiser alone; VAE, text encoders, tokenizers and
    # scheduler are --model-config's (weights included)
    description: str = ""  # what the file is, for messages
    transformer_config: dict = field(default_factory=dict)  # config values the file's keys decide, over the config's


# Single-file kinds (sdxl_layout.checkpoint_kind) -> how they load.
CHECKPOINT_KINDS = {
    "sd1": SingleFileKind("StableDiffusionPipeline"),
    "sd2": SingleFileKind("StableDiffusionPipeline"),
    "sdxl": SingleFileKind("StableDiffusionXLPipeline"),
    # BFL's flux1-dev / flux1-schnell files; the guidance embedding follows the file, whichever variant's folder
    # --model-config names (their transformers differ in nothing else).
    "flux-dev": SingleFileKind("FluxPipeline", "FluxTransformer2DModel", "a Flux.1 [dev] transformer",
                               {"guidance_embeds": True}),
    "flux-schnell": SingleFileKind("FluxPipeline", "FluxTransformer2DModel", "a Flux.1 [schnell] transformer",
                                   {"guidance_embeds": False}),
}
CHECKPOINT_REFUSALS = {
    "sdxl-refiner": "an SDXL refiner checkpoint (one OpenCLIP encoder, aesthetic-score conditions); refiners are "
                    "not supported: train on the SDXL base model",
    "sd3": "a single-file Stable Diffusion 3 checkpoint; SD3 trains from a diffusers folder or hub id "
           "(e.g. stabilityai/stable-diffusion-3.5-medium)",
    "flux-all-in-one": "an all-in-one Flux checkpoint (transformer, VAE and text encoders in one file, as ComfyUI "
                       "saves them), which dreamlora does not read; pass the transformer alone (flux1-dev."
                       "safetensors) with --model-config black-forest-labs/FLUX.1-dev, or a diffusers folder or hub id",
    "lora": "a LoRA file, not a base model; pass the base model with --model (and the LoRA with --lora)",
    "unknown": "not a Stable Diffusion checkpoint dreamlora knows (no SD 1.x, 2.x or SDXL weights); a VAE or a "
               "UNet alone? Pass a whole base model",
}
# Names that mark a few-step distilled SDXL (its weights have SDXL's architecture, so it loads and trains).
DISTILLED_MARKERS = ("turbo", "lightning", "lcm", "hyper")


def detect_family(configs: ModelConfigs) -> ModelFamily:
    """The family of the model whose configs these are.

    Raises:
        ModelLoadError: a model dreamlora cannot train, naming what it is and what is supported.
    """
    refusal = unsupported_reason(configs)
    if refusal:
        raise ModelLoadError(f"--model '{configs.source}' is {refusal}.")
    for family_type in FAMILIES:
        family = family_type.detect(configs)
        if family is not None:
            return family
    kind = configs.index.get("_class_name") or f"a model with {len(configs.text_encoders)} text encoder(s)"
    raise ModelLoadError(f"--model '{configs.source}' is {kind}, which dreamlora cannot train; {SUPPORTED} are "
                         "supported.")


def unsupported_reason(configs: ModelConfigs) -> str | None:
    """Why a model of these configs cannot be trained, or None."""
    pipeline = configs.index.get("_class_name", "")
    scheduler = configs.scheduler.get("_class_name", "")
    if "Img2Img" in pipeline or configs.index.get("requires_aesthetics_score") or (
            configs.unet.get("addition_embed_type") == "text_time" and len(configs.text_encoders) == 1):
        return ("an SDXL refiner (one OpenCLIP encoder, aesthetic-score conditions); refiners are not supported: "
                "train on the SDXL base model")
    if scheduler.startswith("EDM") or "latents_mean" in configs.vae and configs.vae.get("latents_mean"):
        return ("an EDM model of the Playground v2.5 kind (EDM noise schedule, latents with a mean and std); "
                f"its training objective is not supported ({SUPPORTED} with DDPM schedules are)")
    if pipeline.startswith("Flux") and pipeline != "FluxPipeline":
        return f"a {pipeline.removesuffix('Pipeline')} pipeline; train on the text-to-image Flux.1 model"
    if pipeline.startswith("StableDiffusion3") and pipeline != "StableDiffusion3Pipeline":
        return f"a {pipeline.removesuffix('Pipeline')} pipeline; train on the text-to-image SD3 model"
    return None


def single_file_kind(keys: list[str], path: str) -> SingleFileKind:
    """How a single-file checkpoint with these keys loads.

    Raises:
        ModelLoadError: the file is a kind dreamlora cannot train.
    """
    from .sdxl_layout import checkpoint_kind

    kind = checkpoint_kind(keys)
    if kind in CHECKPOINT_KINDS:
        return CHECKPOINT_KINDS[kind]
    raise ModelLoadError(f"--model '{path}' is {CHECKPOINT_REFUSALS[kind]}.")


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors checkpoint, read from its header alone.

    Raises:
        ModelLoadError: the file is not safetensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        raise ModelLoadError(f"--model '{path}' cannot be read as safetensors: {reason}") from exc


def transformer_file(path: str | Path) -> SingleFileKind | None:
    """The kind of a single file that holds a transformer alone (its other parts come from --model-config), or None
    for anything else (a whole checkpoint, a pickle, an unreadable file: loading says what is wrong with it)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from .sdxl_layout import checkpoint_kind

    try:
        kind = CHECKPOINT_KINDS.get(checkpoint_kind(checkpoint_keys(path)))
    except ModelLoadError:
        return None
    return kind if kind is not None and kind.transformer_class else None


def missing_config_message(path: str | Path, kind: SingleFileKind) -> str:
    """Why a transformer file cannot load without --model-config, and what to pass."""
    return (f"--model '{path}' is {kind.description} alone (Black Forest Labs' layout): pass --model-config with a "
            "diffusers Flux folder or hub id (e.g. black-forest-labs/FLUX.1-dev), which supplies the VAE, text "
            "encoders, tokenizers and scheduler.")


def load_kwargs_for(pipeline_class: str) -> dict:
    """from_pretrained / from_single_file keyword arguments of the family whose pipeline this is."""
    family_type = next(f for f in FAMILIES if f.pipeline_class == pipeline_class)
    return family_type.load_kwargs()


def distilled_note(name: str) -> str | None:
    """A note for few-step distilled models, whose pictures need other sampling settings than the defaults."""
    lowered = name.lower()
    marker = next((m for m in DISTILLED_MARKERS if m in lowered), None)
    if marker is None:
        return None
    return (f"'{name}' looks like a few-step distilled model ({marker}): it trains as its architecture does, but the "
            "defaults sample 20 steps with guidance 7.5; for its class images and grids pass e.g. --prior-steps 4 "
            "--prior-guidance 0 --validation-steps 4 --validation-guidance 0 (sample/eval: --steps 4 --guidance 0)")
