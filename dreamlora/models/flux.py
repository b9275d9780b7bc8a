"""Flux.1 [dev] and [schnell]: a double/single-stream transformer trained with rectified flow, CLIP-L + T5.

- Prompts, as FluxPipeline.encode_prompt builds them: T5's last hidden state (512 tokens, the pipeline's default)
  is the sequence the transformer attends to; CLIP-L's pooled output (B, 768) is `pooled_projections`.
- T5 never gets adapters and runs once a prompt (its states are cached, sd3.FrozenT5Cache); with
  --train-text-encoder only CLIP-L trains.
- Latents (B, 16, h, w) go in as 2x2 patches, (B, h/2 · w/2, 64), with their (0, row, column) position ids and the
  text's all-zero ids; the prediction comes back the same way and is unpacked (`pack_latents`/`unpack_latents`).
- Timesteps: the transformer takes σ (it multiplies by 1000 itself), so `predict` divides the objective's σ·1000.
- [dev] is guidance-distilled: its transformer embeds a guidance value. Training feeds it --flux-guidance (1.0 by
  default, as kohya's sd-scripts recommends for LoRA; diffusers' script uses 3.5); sampling gives it the
  --guidance / --validation-guidance / --prior-guidance value (FluxPipeline's guidance_scale: 3.5 is usual).
  [schnell] has no guidance embedding and samples in 4 steps.
- σ is shifted by image size (the scheduler's use_dynamic_shifting): exp(μ), μ from 0.5 at 256 px to 1.15 at 1024 px.
- Files: diffusers/peft keys (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `text_encoder.`), which
  FluxPipeline.load_lora_weights reads; `dreamlora convert --to kohya` writes BFL names (interop/bfl.py).
- Base models load from a diffusers folder or hub id, or from BFL's transformer file (`flux1-dev.safetensors`) with
  --model-config for the rest (loading.py); single-file export writes the transformer in that layout (flux_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .family import ImageGeometry, PromptEmbeddings, TextEncoderNaming, tokenize
from .sd3 import FrozenT5Cache

if TYPE_CHECKING:
    from .configs import ModelConfigs

CLIP_TOKENS = 77
T5_TOKENS = 512  # FluxPipeline's default max_sequence_length: training and sampling agree on it
# Attention projections of both streams of the double blocks, and the single blocks' q/k/v (what to_q/to_k/to_v
# reach there). --lora-targets adds the MLPs (ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2,
# proj_mlp, proj_out) or the modulations (norm1.linear, norm1_context.linear, norm.linear).
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4·C): each 2x2 patch one token, channels first then the patch's rows and
    columns (FluxPipeline._pack_latents' order)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 · w/2, 4·C) -> (B, C, h, w) for latents of `height` x `width` cells: `pack_latents` undone."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return patches.reshape(b, c, height, width)


def latent_position_ids(height: int, width: int) -> torch.Tensor:
    """(h/2 · w/2, 3) ids of the packed tokens: (0, row, column), as FluxPipeline._prepare_latent_image_ids."""
    rows = torch.arange(height // 2)[:, None].expand(height // 2, width // 2)
    columns = torch.arange(width // 2)[None, :].expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


@dataclass(frozen=True)
class FluxFamily:
    """Flux.1 dev (guidance-distilled) and schnell (timestep-distilled), and models of their architecture."""

    variant: str = "dev"  # "dev" (guidance embedding) or "schnell"
    guidance: float = 1.0  # the value the dev transformer's guidance embedding gets while training
    name: str = "flux"
    prediction_type: str = "flow"
    v2: bool = False
    pipeline_class: str = "FluxPipeline"
    kohya_text_prefixes: tuple[str, ...] = ("lora_te1", "lora_te2")
    text_tokens: tuple[int, ...] = (CLIP_TOKENS, T5_TOKENS)  # each encoder's prompt length
    denoiser_prefix: str = "transformer"
    adapted_text_encoders: int = 1  # CLIP-L; T5 never
    default_targets: tuple[str, ...] = TRANSFORMER_TARGETS
    kohya_files: bool = False  # training writes diffusers keys; `dreamlora convert --to kohya` writes BFL names
    single_file_text_encoders: bool = False  # its single file is BFL's transformer alone
    named_samplers: bool = False
    cached_text_encoder: int | None = 1  # T5
    t5: FrozenT5Cache = field(default_factory=FrozenT5Cache, compare=False, hash=False, repr=False)

    @classmethod
    def detect(cls, configs: ModelConfigs) -> FluxFamily | None:
        pipeline = configs.index.get("_class_name", "")
        if pipeline != "FluxPipeline" and configs.unet.get("_class_name") != "FluxTransformer2DModel":
            return None
        if pipeline and pipeline != "FluxPipeline":
            return None  # Fill / Kontext / ControlNet variants
        return cls(variant="dev" if configs.unet.get("guidance_embeds", False) else "schnell")

    def for_training(self, settings: Any) -> FluxFamily:
        """The family with a run's --flux-guidance."""
        return replace(self, guidance=settings.guidance) if settings is not None else self

    @property
    def guidance_embeds(self) -> bool:
        return self.variant == "dev"

    @property
    def kohya_base_model_version(self) -> str:
        return "flux1"  # sd-scripts' MODEL_VERSION_FLUX_V1

    def file_metadata(self, resolution: int) -> dict[str, str]:
        # sd-scripts: flux-1-dev / flux-1-schnell, BFL's implementation, and no prediction type for Flux.
        return {"ss_base_model_version": self.kohya_base_model_version, "ss_v2": "False",
                "modelspec.architecture": f"flux-1-{self.variant}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    def kohya_unet_key(self, module: str, unet_config: dict) -> str:
        return "lora_unet_" + module.replace(".", "_")

    @property
    def text_encoder_naming(self) -> tuple[TextEncoderNaming, ...]:
        return (TextEncoderNaming("lora_te1", "text_encoder", "clip_l_", False, "clip_l"),
                TextEncoderNaming("lora_te2", "text_encoder_2", "t5xxl_", False, "t5xxl"))

    def original_unet_module(self, module: str, unet_config: dict) -> str:
        raise ValueError("Flux modules fuse q/k/v in BFL's layout; see interop/bfl.py for the conversion")

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {}

    def make_pipeline(self, base: Any, scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        clip, t5 = base.text_encoders
        tok_clip, tok_t5 = base.tokenizers
        pipe = FluxPipeline(scheduler=scheduler, vae=base.vae, text_encoder=clip, tokenizer=tok_clip,
                            text_encoder_2=t5, tokenizer_2=tok_t5, transformer=base.unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, tokenizers: list, text_encoders: list, prompts: list[str]) -> PromptEmbeddings:
        (clip_ids,) = tokenize(tokenizers[:1], text_encoders[:1], prompts)
        t5_states = self.t5.encode(text_encoders[1], tokenizers[1], prompts, T5_TOKENS)
        pooled = text_encoders[0](clip_ids).pooler_output
        return PromptEmbeddings(t5_states.to(pooled.device, pooled.dtype), {"pooled_projections": pooled})

    def sampling_prompts(self, pipe: Any, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        """FluxPipeline's prompt_embeds (T5 through the cache) and pooled_prompt_embeds; no negative prompt:
        [dev]'s guidance is distilled into the transformer and [schnell] samples without guidance."""
        embeddings = self.encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                         prompts)
        return {"prompt_embeds": embeddings.hidden_states,
                "pooled_prompt_embeds": embeddings.added_conditions["pooled_projections"]}

    def encode_ids(self, text_encoders: list, ids: list[torch.Tensor]) -> PromptEmbeddings:
        return PromptEmbeddings(text_encoders[1](ids[1])[0], {"pooled_projections": text_encoders[0](ids[0]).pooler_output})

    def image_conditions(self, geometry: ImageGeometry) -> dict[str, torch.Tensor]:
        return {}

    def denoiser_kwargs(self, embeddings: PromptEmbeddings, conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": embeddings.hidden_states,
                "pooled_projections": embeddings.added_conditions["pooled_projections"]}

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Pack (B, 16, h, w) into 2x2 patches, run the transformer at σ = timesteps / 1000, unpack its velocity."""
        rows, _, height, width = noisy.shape
        text_tokens = kwargs["encoder_hidden_states"].shape[1]
        guidance = (torch.full((rows,), self.guidance, device=noisy.device, dtype=torch.float32)
                    if self.guidance_embeds else None)
        out = denoiser(hidden_states=pack_latents(noisy), timestep=(timesteps / 1000).to(noisy.dtype),
                       img_ids=latent_position_ids(height, width).to(noisy.device, noisy.dtype),
                       txt_ids=torch.zeros(text_tokens, 3, device=noisy.device, dtype=noisy.dtype),
                       guidance=guidance, **kwargs).sample
        return unpack_latents(out, height, width)

    def objective(self, scheduler_config: dict, settings: Any = None) -> Any:
        from ..objectives import FlowMatchingObjective

        return FlowMatchingObjective(scheduler_config, settings, patch_size=2)

    def original_state_dict(self, base: Any) -> dict[str, torch.Tensor]:
        """The transformer alone in BFL's layout, as flux1-dev.safetensors is (ComfyUI's "Load Diffusion Model" and
        `--model FILE --model-config <Flux folder>` read it); the VAE and text encoders stay in their own files."""
        from .flux_layout import bfl_transformer_state_dict

        return bfl_transformer_state_dict(base.unet.state_dict())

    def meta_denoiser_inputs(self, configs: ModelConfigs, rows: int, latent: int,
                             dtype: torch.dtype) -> tuple[list, dict]:
        """(latents (B, 16, h, w), timesteps) and the text states `predict` takes (it packs and adds the ids)."""
        cfg = configs.unet
        sample = torch.empty(rows, int(cfg.get("in_channels", 64)) // 4, latent, latent, dtype=dtype, device="meta")
        timesteps = torch.empty(rows, dtype=dtype, device="meta")
        hidden = torch.empty(rows, T5_TOKENS, int(cfg.get("joint_attention_dim", 4096)), dtype=dtype, device="meta")
        pooled = torch.empty(rows, int(cfg.get("pooled_projection_dim", 768)), dtype=dtype, device="meta")
        return [sample, timesteps], {"encoder_hidden_states": hidden, "pooled_projections": pooled}
