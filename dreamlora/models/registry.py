"""The families the loader walks, and the models it knows it cannot train (refused with the reason).

Detection reads configs only (model_index.json, the UNet, VAE, text-encoder and scheduler configs), or, for a
single-file checkpoint, its key names (sdxl_layout.checkpoint_kind): no weight is read to decide.
"""

from __future__ import annotations

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

# Single-file kinds (sdxl_layout.checkpoint_kind) -> the diffusers pipeline that loads them.
CHECKPOINT_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                        "sdxl": "StableDiffusionXLPipeline"}
CHECKPOINT_REFUSALS = {
    "sdxl-refiner": "an SDXL refiner checkpoint (one OpenCLIP encoder, aesthetic-score conditions); refiners are "
                    "not supported: train on the SDXL base model",
    "sd3": "a single-file Stable Diffusion 3 checkpoint; SD3 trains from a diffusers folder or hub id "
           "(e.g. stabilityai/stable-diffusion-3.5-medium)",
    "flux": "a single-file Flux checkpoint; Flux trains from a diffusers folder or hub id "
            "(e.g. black-forest-labs/FLUX.1-dev)",
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


def checkpoint_pipeline(keys: list[str], path: str) -> str:
    """The diffusers pipeline class that loads a single-file checkpoint with these keys.

    Raises:
        ModelLoadError: the file is a kind dreamlora cannot train.
    """
    from .sdxl_layout import checkpoint_kind

    kind = checkpoint_kind(keys)
    if kind in CHECKPOINT_PIPELINES:
        return CHECKPOINT_PIPELINES[kind]
    raise ModelLoadError(f"--model '{path}' is {CHECKPOINT_REFUSALS[kind]}.")


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
