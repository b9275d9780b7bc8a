"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained with rectified flow, three text encoders, a 16-channel VAE.

- Prompts, as StableDiffusion3Pipeline.encode_prompt builds them: the penultimate hidden states of CLIP-L and
  CLIP-G side by side (768 + 1280 wide), zero-padded to T5's width (4096) and followed along the sequence by T5's
  last hidden state (256 tokens): (B, 77 + 256, 4096); the pooled projections of both CLIPs side by side (2048).
- T5 never gets adapters and runs once a prompt: its states are cached in the family (`FrozenT5Cache`) even when
  the CLIPs train, so a step runs only the CLIPs.
- The transformer takes the latents as they are ((B, 16, h, w); it patches them itself) and timesteps σ·1000.
- Latents: (VAE mean - shift_factor) · scaling_factor (data.encode_latents reads both from the VAE's config).
- Files: diffusers/peft keys (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `text_encoder.`,
  `text_encoder_2.`), which StableDiffusion3Pipeline.load_lora_weights reads; kohya's SD3 names (MMDiT module
  paths with fused q/k/v) are not written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .family import ImageGeometry, PromptEmbeddings, TextEncoderNaming, tokenize

if TYPE_CHECKING:
    from .configs import ModelConfigs

CLIP_TOKENS = 77
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: training and sampling agree on it
# Attention projections of both streams: the image stream's to_q/k/v/out and the text stream's add_*_proj/to_add_out
# (what diffusers' train_dreambooth_lora_sd3.py adapts). --lora-targets can add the MLPs (ff.net.0.proj, ff.net.2,
# ff_context.net.0.proj, ff_context.net.2) or the modulations (norm1.linear, norm1_context.linear).
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FrozenT5Cache:
    """T5's output per (prompt, length): T5 is frozen, so each prompt runs through it once a run, wherever T5 is
    afterwards (training moves it off the accelerator once the run's prompts are cached)."""

    def __init__(self):
        self.states: dict[tuple[str, int], torch.Tensor] = {}

    def encode(self, encoder, tokenizer, prompts: list[str], tokens: int) -> torch.Tensor:
        """(B, tokens, d_model) T5 states of `prompts`, padded to `tokens` as the pipelines pad them."""
        missing = sorted({p for p in prompts if (p, tokens) not in self.states})
        if missing:
            device = next(encoder.parameters()).device
            ids = tokenizer(missing, padding="max_length", max_length=tokens, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
            with torch.no_grad():
                out = encoder(ids.to(device))[0]
            for prompt, row in zip(missing, out):
                self.states[(prompt, tokens)] = row
        return torch.stack([self.states[(p, tokens)] for p in prompts])


@dataclass(frozen=True)
class StableDiffusion3Family:
    """SD 3 Medium, SD 3.5 Medium/Large and models of their architecture."""

    variant: str = "m"  # kohya's modelspec suffix: m (3 Medium), 5-large (3.5 Large), 5-medium (3.5 Medium)
    name: str = "sd3"
    prediction_type: str = "flow"
    v2: bool = False
    pipeline_class: str = "StableDiffusion3Pipeline"
    kohya_text_prefixes: tuple[str, ...] = ("lora_te1", "lora_te2", "lora_te3")
    text_tokens: tuple[int, ...] = (CLIP_TOKENS, CLIP_TOKENS, T5_TOKENS)  # each encoder's prompt length
    denoiser_prefix: str = "transformer"  # the pipeline's name of the denoiser: keys `transformer.…`
    adapted_text_encoders: int = 2  # CLIP-L and CLIP-G get adapters with --train-text-encoder; T5 never
    default_targets: tuple[str, ...] = TRANSFORMER_TARGETS
    kohya_files: bool = False  # files in diffusers format only
    single_file_text_encoders: bool = False  # no single-file export
    named_samplers: bool = False  # samples with its own flow-matching Euler scheduler, whatever --sampler says
    cached_text_encoder: int | None = 2  # T5
    t5: FrozenT5Cache = field(default_factory=FrozenT5Cache, compare=False, hash=False, repr=False)

    @classmethod
    def detect(cls, configs: ModelConfigs) -> StableDiffusion3Family | None:
        """SD3 from its configs: the pipeline class, or an SD3Transformer2DModel with three text encoders."""
        pipeline = configs.index.get("_class_name", "")
        if pipeline != "StableDiffusion3Pipeline" and configs.unet.get("_class_name") != "SD3Transformer2DModel":
            return None
        if pipeline and pipeline != "StableDiffusion3Pipeline":
            return None  # img2img / inpaint / ControlNet variants
        layers = int(configs.unet.get("num_layers", 24))
        dual = bool(configs.unet.get("dual_attention_layers"))
        return cls(variant="5-large" if layers >= 38 else "5-medium" if dual else "m")

    @property
    def kohya_base_model_version(self) -> str:
        return f"sd3-{self.variant}" if self.variant != "m" else "sd3"

    def file_metadata(self, resolution: int) -> dict[str, str]:
        # sd-scripts' modelspec: stable-diffusion-3-<variant>/lora, implementation diffusers for SD3 LoRA.
        return {"ss_base_model_version": self.kohya_base_model_version, "ss_v2": "False",
                "modelspec.architecture": f"stable-diffusion-3-{self.variant}/lora",
                "modelspec.implementation": "diffusers", "modelspec.prediction_type": "flow"}

    def kohya_unet_key(self, module: str, unet_config: dict) -> str:
        return "lora_unet_" + module.replace(".", "_")

    @property
    def text_encoder_naming(self) -> tuple[TextEncoderNaming, ...]:
        return (TextEncoderNaming("lora_te1", "text_encoder", "clip_l_", False, "clip_l"),
                TextEncoderNaming("lora_te2", "text_encoder_2", "clip_g_", False, "clip_g"),
                TextEncoderNaming("lora_te3", "text_encoder_3", "t5xxl_", False, "t5xxl"))

    def original_unet_module(self, module: str, unet_config: dict) -> str:
        raise ValueError("SD3 LoRA files are written with diffusers module paths; no original-layout name is known")

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {}

    def make_pipeline(self, base: Any, scheduler: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        te1, te2, te3 = base.text_encoders
        tok1, tok2, tok3 = base.tokenizers
        pipe = StableDiffusion3Pipeline(transformer=base.unet, scheduler=scheduler, vae=base.vae, text_encoder=te1,
                                        tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3,
                                        tokenizer_3=tok3)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> PromptEmbeddings:
        clip_ids = tokenize(tokenizers[:2], text_encoders[:2], prompts)
        t5_states = self.t5.encode(text_encoders[2], tokenizers[2], prompts, T5_TOKENS)
        return self._combine(text_encoders, clip_ids, t5_states)

    def sampling_prompts(self, pipe: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        """StableDiffusion3Pipeline's prompt and negative-prompt embeddings (T5 through the cache); the negative is
        the empty prompt unless one is given, as the pipeline encodes it for classifier-free guidance."""
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        positive = self.encode_prompts(tokenizers, encoders, prompts)
        negative = self.encode_prompts(tokenizers, encoders, negative_prompts or [""] * len(prompts))
        return {"prompt_embeds": positive.hidden_states,
                "pooled_prompt_embeds": positive.added_conditions["pooled_projections"],
                "negative_prompt_embeds": negative.hidden_states,
                "negative_pooled_prompt_embeds": negative.added_conditions["pooled_projections"]}

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> PromptEmbeddings:
        return self._combine(text_encoders, ids[:2], text_encoders[2](ids[2])[0])

    @staticmethod
    def _combine(text_encoders: list, clip_ids: list[torch.Tensor], t5_states: torch.Tensor) -> PromptEmbeddings:
        states, pooled = [], []
        for encoder, ids in zip(text_encoders[:2], clip_ids):
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, 77, width): the penultimate layer, as the pipeline reads it
            pooled.append(out[0])  # text_embeds (B, projection_dim)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5_states.to(clip.device, clip.dtype)], dim=-2)  # (B, 77 + 256, T5 width)
        return PromptEmbeddings(hidden, {"pooled_projections": torch.cat(pooled, dim=-1)})

    def image_conditions(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]:
        return {}

    def denoiser_kwargs(self, embeddings: PromptEmbeddings, conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": embeddings.hidden_states,
                "pooled_projections": embeddings.added_conditions["pooled_projections"]}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The velocity for (B, 16, h, w) latents at timesteps σ·1000 (what the pipeline passes)."""
        return denoiser(hidden_states=noisy, timestep=timesteps.to(noisy.dtype), **kwargs).sample

    def for_training(self, settings: Any) -> Any:
        return self  # nothing of a run's settings changes how this family runs its denoiser

    def objective(self, scheduler_config: dict, settings: Any = None) -> Any:
        from ..objectives import FlowMatchingObjective

        return FlowMatchingObjective(scheduler_config, settings)

    def original_state_dict(self, base: Any) -> dict[str, torch.Tensor]:
        raise ConfigError("single-file export of SD3 models is not supported; save a diffusers folder instead.")

    def meta_denoiser_inputs(self, configs: ModelConfigs, rows: int, latent: int,
                             dtype: torch.dtype) -> tuple[list, dict]:
        cfg = configs.unet
        sample = torch.empty(rows, int(cfg.get("in_channels", 16)), latent, latent, dtype=dtype, device="meta")
        timesteps = torch.empty(rows, dtype=dtype, device="meta")
        hidden = torch.empty(rows, CLIP_TOKENS + T5_TOKENS, int(cfg["joint_attention_dim"]), dtype=dtype,
                             device="meta")
        pooled = torch.empty(rows, int(cfg["pooled_projection_dim"]), dtype=dtype, device="meta")
        return [sample, timesteps], {"encoder_hidden_states": hidden, "pooled_projections": pooled}
