"""Model families: everything that differs between kinds of base model, behind one interface.

The training loop, the file writer, the memory plan, sampling, priors and eval ask the family; none of them
branches on the kind of model. A family is one class (ComfyUI's supported_models.py is the model for this):

| what | SD 1.x / 2.x (`sd.StableDiffusionFamily`) | SDXL (`sdxl.StableDiffusionXLFamily`) |
|---|---|---|
| detection | model_index / single-file keys (registry.py) | same |
| loading | `StableDiffusionPipeline` | `StableDiffusionXLPipeline` (no watermarker) |
| prompts | CLIP, last hidden state | CLIP-L + OpenCLIP-bigG penultimate states side by side, pooled bigG |
| added conditions | none | `time_ids` per image: original size, crop top-left, target size |
| objective | DDPM ε or v (objectives.DiffusionObjective) | DDPM ε |
| kohya names | `lora_unet_<diffusers path>`, `lora_te_` | `lora_unet_<SGM path>`, `lora_te1_`, `lora_te2_` |
| metadata | sd_v1 / sd_v2(_v), modelspec v1, v2-512, v2-768-v | sdxl_base_v1-0, stable-diffusion-xl-v1-base |
| single file | LDM layout (single_file.py) | SGM layout (sdxl_layout.py) |
| memory plan | meta UNet inputs: latents, timesteps, text states | + pooled text and time ids |

Adding a family is adding a class that implements `ModelFamily` and putting it in `registry.FAMILIES`.

The flow-matching transformer families (SD3: `sd3.StableDiffusion3Family`, Flux.1: `flux.FluxFamily`) use the same
interface: `detect` matches their model_index class or transformer class; `encode_prompts` runs CLIP-L + CLIP-G + T5
(SD3) or CLIP-L pooled + T5 (Flux), with T5's states cached in the family and never adapted (`adapted_text_encoders`);
`predict` is the loop's one denoiser call (Flux packs 2x2 latent patches and adds position ids and its guidance
there, identity packing for the others); `objective` is `objectives.FlowMatchingObjective`; `denoiser_prefix`
is `transformer`, so files say `transformer.…`; `meta_denoiser_inputs` serves the memory plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .configs import ModelConfigs


@dataclass
class PromptEmbeddings:
    """What the denoiser is conditioned on for a batch of prompts."""

    hidden_states: torch.Tensor  # (B, tokens, cross_attention_dim)
    added_conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds (B, pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        return PromptEmbeddings(
            self.hidden_states.to(device=device, dtype=dtype),
            {k: v.to(device=device, dtype=dtype) for k, v in self.added_conditions.items()},
        )

    def index(self, rows: torch.Tensor | list[int]) -> "PromptEmbeddings":
        return PromptEmbeddings(self.hidden_states[rows], {k: v[rows] for k, v in self.added_conditions.items()})

    @staticmethod
    def cat(parts: list["PromptEmbeddings"]) -> "PromptEmbeddings":
        keys = parts[0].added_conditions.keys()
        return PromptEmbeddings(
            torch.cat([p.hidden_states for p in parts]),
            {k: torch.cat([p.added_conditions[k] for p in parts]) for k in keys},
        )


@dataclass(frozen=True)
class ImageGeometry:
    """Where each training row's pixels came from: what size-conditioned models (SDXL) are told about an image."""

    original_sizes: list[tuple[int, int]]  # (height, width) of each source image before resizing
    crops: list[tuple[int, int]]  # (top, left) of each crop in the resized image, in pixels
    target: tuple[int, int]  # (height, width) of the training crop


@dataclass(frozen=True)
class TextEncoderNaming:
    """How LoRA files and the tools that load them name one text encoder (dreamlora.interop.keymaps reads it)."""

    kohya_prefix: str  # sd-scripts key prefix: lora_te (SD 1/2), lora_te1 / lora_te2 (SDXL)
    diffusers_prefix: str  # diffusers / peft key prefix: text_encoder, text_encoder_2
    a1111_prefix: str  # AUTOMATIC1111's module-name prefix of the encoder: transformer_ (SD 1), model_ (SD 2), 0_transformer_ / 1_model_ (SDXL)
    openclip: bool  # the original checkpoint holds it in OpenCLIP's layout (resblocks, q/k/v fused into in_proj)
    comfy_name: str  # ComfyUI's name of the encoder: clip_l, clip_h, clip_g


@runtime_checkable
class ModelFamily(Protocol):
    """The interface every model family implements (see the module docstring for the table and for SD3/Flux)."""

    name: str  # "sd1", "sd2", "sdxl"
    prediction_type: str  # the denoiser's target: "epsilon" or "v_prediction"
    pipeline_class: str  # the diffusers pipeline that loads and samples this family
    kohya_text_prefixes: tuple[str, ...]  # kohya key prefix of each text encoder, in pipeline order
    text_tokens: tuple[int, ...]  # each encoder's prompt length, as the pipeline pads it (CLIP 77, T5 256/512)
    denoiser_prefix: str  # the pipeline's name of the denoiser, diffusers' key prefix: unet, transformer
    adapted_text_encoders: int | None  # how many encoders (from the first) take adapters; None: all (T5 never does)
    default_targets: tuple[str, ...]  # denoiser modules adapted when --lora-targets is left at its default
    kohya_files: bool  # whether LoRA files can be written in kohya naming (else --format diffusers only)
    single_file_text_encoders: bool  # whether its single-file layout holds the text encoders (Flux's: the transformer)
    named_samplers: bool  # whether --sampler applies (flow-matching families sample with their own scheduler)
    cached_text_encoder: int | None  # the frozen encoder whose states the family caches (T5): it encodes the run's
    # prompts once and then stays off the accelerator, sampling included; None when every encoder runs as needed

    @property
    def kohya_base_model_version(self) -> str:
        """ss_base_model_version as kohya's sd-scripts writes it (sd_v1, sd_v2_v, sdxl_base_v1-0)."""

    def file_metadata(self, resolution: int) -> dict[str, str]:
        """The family's entries of a LoRA file's header: ss_base_model_version, ss_v2, modelspec architecture,
        implementation and prediction type."""

    def kohya_unet_key(self, module: str, unet_config: dict) -> str:
        """The kohya/AUTOMATIC1111 key stem of a denoiser module: `lora_unet_...`."""

    @property
    def text_encoder_naming(self) -> tuple[TextEncoderNaming, ...]:
        """How files and tools name each text encoder, in pipeline order."""

    def original_unet_module(self, module: str, unet_config: dict) -> str:
        """A denoiser module's path in the original single-file layout (without `model.diffusion_model.`).

        Raises:
            ValueError: no module of a denoiser with this config has that path.
        """

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline class's from_pretrained / from_single_file (parts to leave out)."""

    def make_pipeline(self, base: Any, scheduler: Any) -> Any:
        """A diffusers pipeline over the very modules of `base` (no copies), progress bar off."""

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> PromptEmbeddings:
        """Tokenize to the encoders' full length (as the pipelines do) and run them (`encode_ids`)."""

    def sampling_prompts(self, pipe: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        """The prompt arguments of a call to the family's pipeline: the texts for families whose pipelines encode
        them; embeddings made through the family's T5 cache for SD3/Flux, so T5 need not be on the accelerator."""

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> PromptEmbeddings:
        """Run the encoders on token ids (one (B, tokens) tensor an encoder); the memory plan calls it on meta ids."""

    def image_conditions(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]:
        """Per-row conditions that come from the images rather than the prompts ({} when there are none)."""

    def denoiser_kwargs(self, embeddings: PromptEmbeddings, conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward besides the noisy latents and the timesteps."""

    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor,
                kwargs: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction, shaped as `noisy`: the one call the training loop makes (Flux packs the
        latents into 2x2 patches and unpacks the prediction here)."""

    def for_training(self, settings: Any) -> ModelFamily:
        """The family with a run's settings (objectives.FlowSettings) it needs to run the denoiser: Flux dev's
        guidance value; the others return themselves."""

    def objective(self, scheduler_config: dict, settings: Any = None) -> Any:
        """The training objective (objectives.Objective): timesteps, noising, target and loss weights.

        `settings` (objectives.FlowSettings) are a run's flow-matching flags; DDPM families ignore them."""

    def original_state_dict(self, base: Any) -> dict[str, torch.Tensor]:
        """Every weight under its original single-file name (what AUTOMATIC1111 and ComfyUI load)."""

    def meta_denoiser_inputs(self, configs: ModelConfigs, rows: int, latent: int,
                             dtype: torch.dtype) -> tuple[list, dict]:
        """Meta-device inputs of one denoiser forward, for the memory plan: (args, kwargs)."""


def text_widths(configs: ModelConfigs) -> int:
    """The width of the encoders' hidden states side by side."""
    return sum(int(c.get("hidden_size", 768)) for c in configs.text_encoders)


def cross_attention_width(unet_config: dict) -> int:
    """The width of the text states the denoiser attends to (the encoders' states side by side)."""
    width = unet_config.get("cross_attention_dim", 768)
    return int(width[0] if isinstance(width, (list, tuple)) else width)


def tokenize(tokenizers: list, text_encoders: list, prompts: list[str]) -> list[torch.Tensor]:
    """Each encoder's token ids, padded to its tokenizer's full length as the pipelines pad them, on its device."""
    out = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out.append(ids.to(next(encoder.parameters()).device))  # works through a DDP wrapper too
    return out
