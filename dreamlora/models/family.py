"""Model families: the seam between the training loop and one kind of base model.

A family says how prompts become UNet conditions, which extra conditions the UNet needs,
and how the family is named in LoRA metadata. SD 1.x and SD 2.x share one implementation
(one CLIP text encoder, no extra conditions); SDXL adds a second encoder and size conditions
and will get its own class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on for a batch of prompts."""

    hidden_states: torch.Tensor  # (B, tokens, cross_attention_dim)
    added_conditions: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids

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
class StableDiffusionFamily:
    """SD 1.x and 2.x: one CLIP text encoder, last hidden layer, no extra conditions."""

    name: str  # "sd1" | "sd2"
    v2: bool
    v_prediction: bool
    # Prefixes of text-encoder modules in kohya files, in the order of `text_encoders`.
    kohya_text_prefixes: tuple[str, ...] = ("lora_te",)

    @property
    def kohya_base_model_version(self) -> str:
        """ss_base_model_version as kohya's sd-scripts writes it: sd_v1, sd_v2, sd_v2_v (v-parameterization)."""
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if self.v_prediction else "")

    def modelspec_architecture(self, resolution: int) -> str:
        """modelspec.architecture for a LoRA on this family (Stability's model-spec names).

        Named by the model, not the training resolution: an SD 2 v-prediction LoRA trained at 512 px is still
        a LoRA of the 768-v model (the 512 name is the epsilon model's, another architecture to a loader).
        """
        if not self.v2:
            return "stable-diffusion-v1/lora"
        return "stable-diffusion-v2-768-v/lora" if self.v_prediction else "stable-diffusion-v2-512/lora"

    def encode_prompts(self, tokenizers, text_encoders, prompts: list[str]) -> PromptEmbeddings:
        """Tokenize to the encoder's full length (as the pipelines do) and take the last hidden state."""
        tokenizer, text_encoder = tokenizers[0], text_encoders[0]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(next(text_encoder.parameters()).device)  # works through a DDP wrapper too
        hidden = text_encoder(ids)[0]  # (B, 77, D)
        return PromptEmbeddings(hidden)

    def unet_kwargs(self, embeddings: PromptEmbeddings) -> dict:
        """Keyword arguments for UNet2DConditionModel.forward besides sample and timestep."""
        return {"encoder_hidden_states": embeddings.hidden_states}


def detect_family(unet_config: dict, text_encoder_config, scheduler_config: dict, has_second_text_encoder: bool):
    """Pick the family from the loaded components' configs.

    Raises:
        NotImplementedError is never raised here; the loader turns an SDXL model into a ModelLoadError.
    """
    if has_second_text_encoder:
        return None  # SDXL: not supported yet, the loader explains
    # SD 2.x uses OpenCLIP ViT-H (plain gelu); SD 1.x uses OpenAI CLIP ViT-L (quick_gelu).
    v2 = getattr(text_encoder_config, "hidden_act", "quick_gelu") == "gelu"
    v_prediction = scheduler_config.get("prediction_type", "epsilon") == "v_prediction"
    return StableDiffusionFamily(name="sd2" if v2 else "sd1", v2=v2, v_prediction=v_prediction)
