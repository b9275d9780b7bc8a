"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden state, no added conditions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .family import ImageGeometry, PromptEmbeddings, TextEncoderNaming, cross_attention_width, tokenize

if TYPE_CHECKING:
    from .configs import ModelConfigs

TEXT_TOKENS = 77  # CLIP's context: prompts are padded to it


@dataclass(frozen=True)
class StableDiffusionFamily:
    """SD 1.x (OpenAI CLIP ViT-L) and SD 2.x (OpenCLIP ViT-H, ε or v prediction)."""

    name: str  # "sd1" | "sd2"
    v2: bool
    v_prediction: bool
    kohya_text_prefixes: tuple[str, ...] = ("lora_te",)
    pipeline_class: str = "StableDiffusionPipeline"
    text_tokens: tuple[int, ...] = (77,)  # each encoder's prompt length
    denoiser_prefix: str = "unet"
    adapted_text_encoders: int | None = None  # every encoder gets adapters with --train-text-encoder
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    kohya_files: bool = True
    single_file_text_encoders: bool = True
    named_samplers: bool = True  # --sampler picks any of SAMPLERS over the model's DDPM schedule
    cached_text_encoder: int | None = None

    @classmethod
    def detect(cls, configs: ModelConfigs) -> StableDiffusionFamily | None:
        """SD 1.x/2.x from its configs: one text encoder and a UNet without added conditions."""
        if len(configs.text_encoders) != 1 or configs.unet.get("addition_embed_type"):
            return None
        if configs.index.get("_class_name", "StableDiffusionPipeline") != "StableDiffusionPipeline":
            return None
        # SD 2.x uses OpenCLIP ViT-H (plain gelu); SD 1.x uses OpenAI CLIP ViT-L (quick_gelu).
        v2 = configs.text_encoders[0].get("hidden_act", "quick_gelu") == "gelu"
        v_prediction = configs.scheduler.get("prediction_type", "epsilon") == "v_prediction"
        return cls(name="sd2" if v2 else "sd1", v2=v2, v_prediction=v_prediction)

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    @property
    def kohya_base_model_version(self) -> str:
        """sd_v1, sd_v2, sd_v2_v (v-parameterization), as kohya's sd-scripts writes them."""
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if self.v_prediction else "")

    def modelspec_architecture(self, resolution: int) -> str:
        """modelspec.architecture for a LoRA on this family (Stability's model-spec names).

        Named by the model, not the training resolution: an SD 2 v-prediction LoRA trained at 512 px is still
        a LoRA of the 768-v model (the 512 name is the epsilon model's, another architecture to a loader).
        """
        if not self.v2:
            return "stable-diffusion-v1/lora"
        return "stable-diffusion-v2-768-v/lora" if self.v_prediction else "stable-diffusion-v2-512/lora"

    def file_metadata(self, resolution: int) -> dict[str, str]:
        return {
            "ss_base_model_version": self.kohya_base_model_version,
            "ss_v2": str(bool(self.v2)),
            "modelspec.architecture": self.modelspec_architecture(resolution),
            # sd-scripts writes "diffusers" for SD 1.x/2.x LoRA (its UNet uses diffusers module names).
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if self.v_prediction else "epsilon",
        }

    def kohya_unet_key(self, module: str, unet_config: dict) -> str:
        """kohya's SD 1.x/2.x files name UNet modules by their diffusers path: `lora_unet_down_blocks_1_...`."""
        return "lora_unet_" + module.replace(".", "_")

    @property
    def text_encoder_naming(self) -> tuple[TextEncoderNaming, ...]:
        """SD 1's OpenAI CLIP ViT-L and SD 2's OpenCLIP ViT-H, as sd-scripts, AUTOMATIC1111, ComfyUI and diffusers name them.

        AUTOMATIC1111 names the encoder by its module path in the original checkpoint (`cond_stage_model`'s
        `transformer.text_model...` for CLIP, `model.transformer.resblocks...` for OpenCLIP); ComfyUI calls them
        clip_l and clip_h.
        """
        if self.v2:
            return (TextEncoderNaming("lora_te", "text_encoder", "model_", True, "clip_h"),)
        return (TextEncoderNaming("lora_te", "text_encoder", "transformer_", False, "clip_l"),)

    def original_unet_module(self, module: str, unet_config: dict) -> str:
        """The LDM path of a UNet module (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`)."""
        from .sdxl_layout import sgm_unet_module_name  # SGM's UNet numbers its blocks as LDM's does

        return sgm_unet_module_name(module, unet_config)

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def make_pipeline(self, base: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                       unet=base.unet, scheduler=scheduler, **self.load_kwargs())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sampling_prompts(self, pipe: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        return {"prompt": prompts, "negative_prompt": negative_prompts}

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> PromptEmbeddings:
        """Tokenize to the encoder's full length (as the pipelines do) and take the last hidden state."""
        return self.encode_ids(text_encoders, tokenize(tokenizers, text_encoders, prompts))

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> PromptEmbeddings:
        return PromptEmbeddings(text_encoders[0](ids[0])[0])  # (B, 77, D)

    def image_conditions(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]:
        return {}

    def denoiser_kwargs(self, embeddings: PromptEmbeddings, conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": embeddings.hidden_states}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return denoiser(noisy, timesteps, **kwargs).sample

    def for_training(self, settings: Any) -> Any:
        return self  # nothing of a run's settings changes how this family runs its denoiser

    def objective(self, scheduler_config: dict, settings: Any = None) -> Any:  # flow settings do not apply
        from ..objectives import DiffusionObjective

        return DiffusionObjective(scheduler_config)

    def original_state_dict(self, base: Any) -> dict[str, torch.Tensor]:
        from .single_file import sd_original_state_dict

        return sd_original_state_dict(base)

    def meta_denoiser_inputs(self, configs: ModelConfigs, rows: int, latent: int,
                             dtype: torch.dtype) -> tuple[list, dict]:
        channels = int(configs.unet.get("in_channels", 4))
        sample = torch.empty(rows, channels, latent, latent, dtype=dtype, device="meta")
        timesteps = torch.empty(rows, dtype=torch.long, device="meta")
        hidden = torch.empty(rows, TEXT_TOKENS, cross_attention_width(configs.unet), dtype=dtype, device="meta")
        return [sample, timesteps], {"encoder_hidden_states": hidden}
