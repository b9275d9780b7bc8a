"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with projection) and size conditions.

- Prompts: both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide), and the
  pooled, projected embedding of the second (`text_embeds`), as StableDiffusionXLPipeline.encode_prompt does.
- Size conditions (`time_ids`), one row an image: original (height, width) before resizing, the crop's
  (top, left) in the resized image, and the target (height, width). A flipped image keeps the crop
  coordinates it was cut at, as SDXL's training scripts and pipelines expect.
- Files: kohya's sd-scripts trains SDXL on the SGM UNet, so its files (and what AUTOMATIC1111 and ComfyUI read)
  name UNet modules by SGM path (`lora_unet_input_blocks_4_1_...`); the encoders are `lora_te1_`/`lora_te2_`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .family import ImageGeometry, PromptEmbeddings, TextEncoderNaming, cross_attention_width, tokenize

if TYPE_CHECKING:
    from .configs import ModelConfigs

TEXT_TOKENS = 77
TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


@dataclass(frozen=True)
class StableDiffusionXLFamily:
    """SDXL base (1.0) and models of its architecture."""

    prediction_type: str = "epsilon"
    name: str = "sdxl"
    v2: bool = False  # kohya's ss_v2 is about SD 2's text encoder; SDXL files say False
    kohya_text_prefixes: tuple[str, ...] = ("lora_te1", "lora_te2")
    pipeline_class: str = "StableDiffusionXLPipeline"
    text_tokens: tuple[int, ...] = (77, 77)  # each encoder's prompt length
    denoiser_prefix: str = "unet"
    adapted_text_encoders: int | None = None  # every encoder gets adapters with --train-text-encoder
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    kohya_files: bool = True
    single_file_text_encoders: bool = True
    named_samplers: bool = True  # --sampler picks any of SAMPLERS over the model's DDPM schedule
    cached_text_encoder: int | None = None

    @classmethod
    def detect(cls, configs: ModelConfigs) -> StableDiffusionXLFamily | None:
        """SDXL from its configs: a UNet with text-and-size added conditions and two text encoders."""
        if configs.unet.get("addition_embed_type") != "text_time" or len(configs.text_encoders) != 2:
            return None
        if configs.index.get("_class_name", "StableDiffusionXLPipeline") != "StableDiffusionXLPipeline":
            return None
        return cls(prediction_type=configs.scheduler.get("prediction_type", "epsilon"))

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    @property
    def kohya_base_model_version(self) -> str:
        return "sdxl_base_v1-0"

    def file_metadata(self, resolution: int) -> dict[str, str]:
        return {
            "ss_base_model_version": self.kohya_base_model_version,
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            # sd-scripts names its SDXL LoRA by Stability's implementation: the keys are SGM module paths.
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if self.v_prediction else "epsilon",
        }

    def kohya_unet_key(self, module: str, unet_config: dict) -> str:
        from .sdxl_layout import kohya_unet_module_name

        return kohya_unet_module_name(module, unet_config)

    @property
    def text_encoder_naming(self) -> tuple[TextEncoderNaming, ...]:
        """CLIP ViT-L and OpenCLIP ViT-bigG: AUTOMATIC1111 names them by their index among the conditioner's embedders."""
        return (TextEncoderNaming("lora_te1", "text_encoder", "0_transformer_", False, "clip_l"),
                TextEncoderNaming("lora_te2", "text_encoder_2", "1_model_", True, "clip_g"))

    def original_unet_module(self, module: str, unet_config: dict) -> str:
        from .sdxl_layout import sgm_unet_module_name

        return sgm_unet_module_name(module, unet_config)

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {"add_watermarker": False}  # the invisible-watermark package is not a dependency

    def make_pipeline(self, base: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=bool(base.pipeline_config.get("force_zeros_for_empty_prompt", True)),
            **self.load_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sampling_prompts(self, pipe: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        return {"prompt": prompts, "negative_prompt": negative_prompts}

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> PromptEmbeddings:
        """Penultimate hidden states of both encoders side by side; the pooled projection of the last one."""
        return self.encode_ids(text_encoders, tokenize(tokenizers, text_encoders, prompts))

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> PromptEmbeddings:
        states, pooled = [], None
        for encoder, encoder_ids in zip(text_encoders, ids):
            out = encoder(encoder_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, 77, width): SDXL conditions on the penultimate layer
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, projection_dim)
                pooled = out[0]
        return PromptEmbeddings(torch.cat(states, dim=-1), {"text_embeds": pooled})

    def image_conditions(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]:
        """time_ids (B, 6): (original h, w, crop top, left, target h, w) of each row, as floats."""
        rows = [(*size, *crop, *geometry.target) for size, crop in zip(geometry.original_sizes, geometry.crops)]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def denoiser_kwargs(self, embeddings: PromptEmbeddings, conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": embeddings.hidden_states,
                "added_cond_kwargs": {"text_embeds": embeddings.added_conditions["text_embeds"],
                                      "time_ids": conditions["time_ids"]}}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy, timesteps, **kwargs).sample

    def for_training(self, settings: Any) -> Any:
        return self  # nothing of a run's settings changes how this family runs its denoiser

    def objective(self, scheduler_config: dict, settings: Any = None) -> Any:  # flow settings do not apply
        from ..objectives import DiffusionObjective

        return DiffusionObjective(scheduler_config)

    def original_state_dict(self, base: Any) -> dict[str, torch.Tensor]:
        from .sdxl_layout import sdxl_original_state_dict

        return sdxl_original_state_dict(base.unet, base.vae, *base.text_encoders)

    def meta_denoiser_inputs(self, configs: ModelConfigs, rows: int, latent: int,
                             dtype: torch.dtype) -> tuple[list, dict]:
        unet = configs.unet
        channels = int(unet.get("in_channels", 4))
        sample = torch.empty(rows, channels, latent, latent, dtype=dtype, device="meta")
        timesteps = torch.empty(rows, dtype=torch.long, device="meta")
        hidden = torch.empty(rows, TEXT_TOKENS, cross_attention_width(unet), dtype=dtype, device="meta")
        pooled = int(unet["projection_class_embeddings_input_dim"]) - TIME_IDS * int(unet["addition_time_embed_dim"])
        added = {"text_embeds": torch.empty(rows, pooled, dtype=dtype, device="meta"),
                 "time_ids": torch.empty(rows, TIME_IDS, dtype=dtype, device="meta")}
        return [sample, timesteps], {"encoder_hidden_states": hidden, "added_cond_kwargs": added}
