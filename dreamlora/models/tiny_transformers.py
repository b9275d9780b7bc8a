"""Random-weight tiny transformer built-ins: `builtin:tiny-sd3` and `builtin:tiny-flux` (dev layout).

The layout is the real model's at toy widths, so every code path (three encoders, the padded CLIP states, T5's
sequence, the 16-channel VAE with shift and scale, the flow-matching scheduler) runs on a CPU in seconds. The CLIPs
use the project's word-list BPE tokenizer, T5 a word-list Unigram one (tokenizer.write_t5_tokenizer_files).
"""

from __future__ import annotations

import os

import torch

from .tokenizer import load_t5_tokenizer, load_tokenizer, write_t5_tokenizer_files, write_tokenizer_files

WEIGHTS_SEED = 20240601

TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
               "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32}
TINY_CLIP_G = {"hidden_size": 64, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
               "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 32}
# T5 is wider than the CLIPs side by side (32 + 64), as T5-XXL (4096) is wider than CLIP-L + CLIP-G (2048): the
# pipeline zero-pads the CLIP states to T5's width.
TINY_T5 = {"d_model": 128, "d_ff": 64, "d_kv": 16, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
           "is_encoder_decoder": False, "use_cache": False}
TINY_SD3_TRANSFORMER = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 128,
                        "caption_projection_dim": 32, "pooled_projection_dim": 64, "pos_embed_max_size": 32}
# SD3's VAE: 16 latent channels, no quant convs, and its shift and scale (vae/config.json of SD 3 Medium).
TINY_FLOW_VAE = {"block_out_channels": (32, 64), "in_channels": 3, "out_channels": 3, "latent_channels": 16,
                 "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"), "sample_size": 64,
                 "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609,
                 "scaling_factor": 1.5305}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def _clip_ids(tokenizer) -> dict:
    # CLIP pools the hidden state at the first eos_token_id, so the ids must be the tokenizer's.
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def tiny_sd3_config_values(clip_vocab: int) -> dict:
    """The configs of builtin:tiny-sd3 without building it (the memory plan and detection read them)."""
    t5_vocab = _t5_vocab_size()
    texts = [{**TINY_CLIP_L, "vocab_size": clip_vocab, "architectures": ["CLIPTextModelWithProjection"]},
             {**TINY_CLIP_G, "vocab_size": clip_vocab, "architectures": ["CLIPTextModelWithProjection"]},
             {**TINY_T5, "vocab_size": t5_vocab, "architectures": ["T5EncoderModel"], "model_type": "t5"}]
    return {"unet": {"_class_name": "SD3Transformer2DModel", **TINY_SD3_TRANSFORMER}, "vae": dict(TINY_FLOW_VAE),
            "text_encoders": texts,
            "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER},
            "index": {"_class_name": "StableDiffusion3Pipeline"}}


def _tiny_encoders(tokenizer_dir: str | os.PathLike, seed: int):
    """CLIP-L and CLIP-G with projections, a T5 encoder, and their tokenizers (the CLIPs share one vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    write_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    t5_dir = os.path.join(tokenizer_dir, "t5")
    t5_vocab = write_t5_tokenizer_files(t5_dir)
    ids = _clip_ids(tokenizer)
    torch.manual_seed(seed)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_L, **ids))
    torch.manual_seed(seed + 1)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G, **ids))
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(**TINY_T5, vocab_size=t5_vocab, pad_token_id=0, eos_token_id=1))
    return (clip_l, clip_g, t5), (tokenizer, load_tokenizer(tokenizer_dir), load_t5_tokenizer(t5_dir))


def build_tiny_sd3_pipeline(tokenizer_dir: str | os.PathLike):
    """A random-weight StableDiffusion3Pipeline at the TINY_* sizes, the same weights on every call."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    # fork_rng: seeding must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
        torch.manual_seed(WEIGHTS_SEED + 1)
        vae = AutoencoderKL(**TINY_FLOW_VAE)
        (clip_l, clip_g, t5), (tok_l, tok_g, tok_t5) = _tiny_encoders(tokenizer_dir, WEIGHTS_SEED + 2)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                    vae=vae, text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                    tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Flux ---------------------------------------------------------------------------------------------------------

TINY_FLUX_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32}
# in_channels 64 = 16 latent channels x one 2x2 patch; the rotary axes (4 + 6 + 6) add up to the head width.
TINY_FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
                         "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 128,
                         "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}
# Flux's VAE: 16 channels, its own shift and scale (ae of FLUX.1-dev), no quant convs.
TINY_FLUX_VAE = {**TINY_FLOW_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _t5_vocab_size() -> int:
    from .tokenizer import DEFAULT_WORDS, T5_SPECIALS

    return len(T5_SPECIALS) + len(DEFAULT_WORDS) + 1 + len(
        set("".join(DEFAULT_WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"))


def tiny_flux_config_values(clip_vocab: int) -> dict:
    """The configs of builtin:tiny-flux without building it."""
    texts = [{**TINY_FLUX_CLIP, "vocab_size": clip_vocab, "architectures": ["CLIPTextModel"]},
             {**TINY_T5, "vocab_size": _t5_vocab_size(), "architectures": ["T5EncoderModel"], "model_type": "t5"}]
    return {"unet": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_TRANSFORMER}, "vae": dict(TINY_FLUX_VAE),
            "text_encoders": texts,
            "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER},
            "index": {"_class_name": "FluxPipeline"}}


def build_tiny_flux_pipeline(tokenizer_dir: str | os.PathLike, *, transformer_config: dict = TINY_FLUX_TRANSFORMER,
                             vae_config: dict = TINY_FLUX_VAE, clip_config: dict = TINY_FLUX_CLIP,
                             t5_config: dict = TINY_T5):
    """A random-weight FluxPipeline (dev layout: with a guidance embedding) at the TINY_* sizes, or at others
    (benchmarks/models.py builds FLUX.1-dev's sizes with it), on the current default device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    write_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    t5_dir = os.path.join(tokenizer_dir, "t5")
    t5_vocab = write_t5_tokenizer_files(t5_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        transformer = FluxTransformer2DModel(**transformer_config)
        torch.manual_seed(WEIGHTS_SEED + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(WEIGHTS_SEED + 2)
        clip = CLIPTextModel(CLIPTextConfig(**clip_config, **_clip_ids(tokenizer)))
        torch.manual_seed(WEIGHTS_SEED + 3)
        t5 = T5EncoderModel(T5Config(**t5_config, vocab_size=t5_vocab, pad_token_id=0, eos_token_id=1))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=load_t5_tokenizer(t5_dir),
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
