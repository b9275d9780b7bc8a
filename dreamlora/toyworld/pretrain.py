"""Pretrain `builtin:toy`: a small Stable Diffusion 1.x-layout model of the toy world, on a CPU.

    python -m dreamlora.toyworld.pretrain --out runs/toy [--seed 0] [--ship]

It trains, in this order, with each stage saved in --out so a crash or a rerun resumes:

1. data: `--images` world pictures and captions (world.py; `--dotted-share 0.4` for the dotted world,
   `--noun-first-share 0.5` for captions that may start with the noun, "red ball on a blue background"),
   drawn once and kept in data.pt;
2. the VAE (AutoencoderKL, 64 px -> 16x16x4 latents; `--latent-size 32`: 32x32x4) on world pictures plus
   generic random-shape pictures (`--generic-images`). The generic ones (discs of every size, boxes, random colours)
   make the VAE a general image codec, as SD's VAE is, so it can also encode things the world never
   shows, like the sample subject's polka dots. The diffusion model never sees them. The latent
   scaling factor is then set so scaled latents have unit standard deviation. `--vae-from DIR` keeps a
   finished VAE instead (the shipped one: a new UNet and text encoder on the same latents);
3. the UNet and the CLIP text encoder together, from scratch, on the epsilon loss over cached
   latents, with 10% empty captions for classifier-free guidance, min-SNR-5 weighting, a little
   offset noise (the SD schedule leaves ~7% of the signal at t=999; a 16x16 latent's mean colour
   leaks through it unless the model learns to set that colour itself) and an EMA of the weights.
   `--unet-from DIR` starts both from a finished model folder instead (longer pretraining as a warm
   restart: a fresh optimizer, warm-up and cosine over `--unet-steps` more steps);
4. the pipeline folder (diffusers layout, fp16 safetensors, SD 1.5 PNDM schedule, dreamlora's
   CLIP tokenizer files) in --out/model, and with --ship copied to dreamlora/builtin_models/toy.

This is a script: it prints progress lines and final figures. The library never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import min_snr_weights, offset_noise
from ..models.builtin import SD_SCHEDULE
from ..models.tokenizer import load_tokenizer, write_tokenizer_files
from .openmp import restart_with_passive_openmp
from .world import caption, dataset

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "builtin_models" / "toy"

# Model configs, sized for a 2-core CPU (FLOPs per 64 px sample, forward: VAE 0.69 G, UNet 0.32 G).
# The UNet works on 16x16x4 latents with attention (self + cross) at every level, 16x16 included,
# so LoRA adapters on the attention layers reach the finest latent level, where small details live.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),  # three blocks: downsample x4; narrow at full size, where it costs most
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 64,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,  # all-convolutional, so it trains on crops and runs at any size
}
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3,
    "up_block_types": ("CrossAttnUpBlock2D",) * 3,
    # diffusers reads this as the number of heads per level (SD 1.x's naming quirk): 32 channels a
    # head everywhere. Four heads of 8 at 16x16 made CPU attention 35% slower for the same FLOPs.
    "attention_head_dim": (1, 2, 4),
    "norm_num_groups": 8,  # 32 groups of 32 channels would normalise away each channel's mean colour
    "cross_attention_dim": 128,  # = the text encoder's hidden size
}


# --latent-size 32: the same model on 32x32 latents. The VAE drops its last block (x2), so a subject's dots span two
# or three latent pixels instead of one. The UNet's three levels work at 32/16/8 and the 32x32 level has no
# attention: attention over 1,024 tokens would make a 32-batch pretraining step 1.7x slower (1.9 s against 1.1 s on
# 2 cores) and a DreamBooth step 1.25x; the convolutions there draw the details the levels below decide.
VAE_X2_CONFIG = {**VAE_CONFIG, "down_block_types": ("DownEncoderBlock2D",) * 2,
                 "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (16, 32)}
UNET_32_CONFIG = {**UNET_CONFIG, "sample_size": 32,
                  "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",)}
CONFIGS_BY_LATENT_SIZE = {16: (VAE_CONFIG, UNET_CONFIG), 32: (VAE_X2_CONFIG, UNET_32_CONFIG)}  # side -> (VAE, UNet)


def model_configs(latent_size: int, unet_top_channels: int = 0) -> tuple[dict, dict]:
    """The (VAE, UNet) configs for `latent_size`-sided latents of 64 px pictures; `unet_top_channels` > 0 widens
    the UNet's finest level (where a subject's dots are drawn) to that many channels, the other levels unchanged."""
    if latent_size not in CONFIGS_BY_LATENT_SIZE:
        raise ValueError(f"--latent-size must be one of {sorted(CONFIGS_BY_LATENT_SIZE)} (got {latent_size})")
    vae_config, unet_config = CONFIGS_BY_LATENT_SIZE[latent_size]
    if unet_top_channels:
        groups = unet_config["norm_num_groups"]
        if unet_top_channels < 0 or unet_top_channels % groups:
            raise ValueError(f"--unet-top-channels must be a positive multiple of {groups} (got {unet_top_channels})")
        unet_config = {**unet_config,
                       "block_out_channels": (unet_top_channels, *unet_config["block_out_channels"][1:])}
    return vae_config, unet_config


TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "max_position_embeddings": 77,
    "projection_dim": 128,
    "hidden_act": "quick_gelu",  # OpenAI CLIP, as in SD 1.x
}


@dataclass
class Settings:
    """Everything that determines a run (saved beside the model as pretrain_settings.json)."""

    seed: int = 0
    threads: int = 2
    images: int = 12000  # world pictures (each seen ~7 times by the UNet at the defaults)
    dotted_share: float = 0.0  # > 0: the dotted world (world.py), this share of objects with dots
    dotted_ball_share: float = 0.0  # > 0: this share of pictures more are dotted balls (world.random_scene)
    noun_first_share: float = 0.0  # > 0: this share of captions without "a photo of" start with the noun
    white_dots: int = 0  # 1: every dot white, black where white is not drawn (world.random_scene); an int for argparse
    generic_images: int = 4000  # random-shape pictures for the VAE only
    vae_from: str = ""  # a finished VAE folder (e.g. the shipped model's vae/) used as it is instead of training one
    size: int = 64
    latent_size: int = 16  # 32: a x2 VAE and a UNet on 32x32 latents (CONFIGS_BY_LATENT_SIZE)
    unet_top_channels: int = 0  # > 0: the UNet's finest level this wide (0: the config's 32)
    vae_steps: int = 2400
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_crop: int = 32  # crop side for the first vae_full_from share of the steps (cheaper)
    vae_full_from: float = 0.9  # from this fraction of the steps on, whole 64 px pictures
    vae_kl: float = 1e-4  # weight of the KL term (per latent element) against the pixel loss
    vae_edge: float = 1.0  # weight of the L1 loss on image gradients: keeps small details (dots) sharp
    unet_from: str = ""  # a finished model folder whose UNet and text encoder this stage starts from (longer pretraining)
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    cfg_dropout: float = 0.1  # share of empty captions, for classifier-free guidance
    offset_noise: float = 0.1
    min_snr: float = 5.0
    ema: float = 0.995
    checkpoint_every: int = 250
    log_every: int = 50


# --- data ----------------------------------------------------------------------------------------


def generic_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A random picture of discs and boxes (1 to 12, sizes from dots to half the image), (size, size, 3) uint8."""
    ss = 2
    n = size * ss
    coords = (np.arange(n) + 0.5) / ss
    xs, ys = np.meshgrid(coords, coords)
    top, bottom = rng.uniform(0, 255, size=(2, 3))
    img = top + (bottom - top) * (ys[..., None] / size)
    for _ in range(int(rng.integers(1, 13))):
        color = rng.uniform(0, 255, size=3)
        cx, cy = rng.uniform(0, size, size=2)
        r = size * float(np.exp(rng.uniform(np.log(0.02), np.log(0.35))))
        if rng.random() < 0.7:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        else:
            rx, ry = r * rng.uniform(0.5, 1.5, size=2)
            mask = (np.abs(xs - cx) <= rx) & (np.abs(ys - cy) <= ry)
        shade = 1.0 + rng.uniform(-0.3, 0.3) * ((xs - cx) + (ys - cy)) / max(r, 1.0) / 2
        img = np.where(mask[..., None], color * np.clip(shade, 0.5, 1.5)[..., None], img)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_data(s: Settings, path: Path) -> dict:
    """World pictures, their scenes, and generic pictures; cached in `path`."""
    if path.is_file():
        return torch.load(path, weights_only=True)  # our own cache: tensors, lists, dicts
    t0 = time.time()
    world = dataset(s.images, s.seed, s.size, s.dotted_share, s.dotted_ball_share, bool(s.white_dots))
    images = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in world])).permute(0, 3, 1, 2).contiguous()
    scenes = [asdict(scene) for _, _, scene in world]
    rng = np.random.default_rng([s.seed, 1])
    generic = np.stack([generic_image(rng, s.size) for _ in range(s.generic_images)]) if s.generic_images else \
        np.zeros((0, s.size, s.size, 3), np.uint8)
    data = {"images": images, "scenes": scenes, "generic": torch.from_numpy(generic).permute(0, 3, 1, 2).contiguous()}
    torch.save(data, path)
    log(f"data: {s.images} world + {s.generic_images} generic pictures in {time.time() - t0:.0f}s")
    return data


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0  # [-1, 1], as SD's VAE expects


# --- stage 1: the VAE ----------------------------------------------------------------------------


def train_vae(s: Settings, data: dict, out: Path):
    """Train the VAE (or load the finished one) and set its scaling factor."""
    from diffusers import AutoencoderKL

    folder = out / "vae"
    if (folder / "config.json").is_file():
        log(f"vae: loading the finished stage from {folder}")
        return AutoencoderKL.from_pretrained(folder)
    held_out = data["images"][-256:]
    if s.vae_from:  # its latents, scaling factor included, stay those of the model it came from
        vae = AutoencoderKL.from_pretrained(s.vae_from).eval()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if s.size // factor != s.latent_size:
            raise ValueError(f"--vae-from {s.vae_from} makes {s.size // factor}-sided latents of {s.size} px "
                             f"pictures, not --latent-size {s.latent_size}")
        with torch.no_grad():
            stats = vae_stats(vae, held_out)
        log(f"vae: {s.vae_from} kept as it is: held-out PSNR {stats['psnr']:.2f} dB on this world")
        vae.save_pretrained(folder)
        # the scaling factor recorded is the one the VAE keeps, not the one this world's latents would give it
        kept = {**stats, "scaling_factor": vae.config.scaling_factor, "from": s.vae_from}
        (out / "vae_stats.json").write_text(json.dumps(kept, indent=2))
        return vae
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**model_configs(s.latent_size)[0])
    pool = torch.cat([data["images"], data["generic"]])  # (N, 3, 64, 64) uint8
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = cosine(opt, s.vae_steps, warmup=50)
    gen = torch.Generator().manual_seed(s.seed)
    t0, full_from = time.time(), int(s.vae_steps * s.vae_full_from)
    vae.train()
    for step in range(s.vae_steps):
        idx = torch.randint(0, len(pool) - 256, (s.vae_batch,), generator=gen)
        x = to_pixels(pool[idx])
        if step < full_from:  # random crops: a quarter of the pixels, same local statistics
            c = s.vae_crop
            i, j = torch.randint(0, s.size - c + 1, (2,), generator=gen).tolist()
            x = x[:, :, i:i + c, j:j + c]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + s.vae_edge * edge_loss(recon, x) + s.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % s.log_every == 0 or step + 1 == s.vae_steps:
            log(f"vae step {step + 1}/{s.vae_steps} loss {loss.item():.4f} kl {kl.item():.2f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
    vae.eval()
    with torch.no_grad():
        stats = vae_stats(vae, held_out)
        vae.register_to_config(scaling_factor=stats["scaling_factor"])
    log(f"vae done in {time.time() - t0:.0f}s: held-out PSNR {stats['psnr']:.2f} dB, latent std "
        f"{stats['latent_std']:.3f} -> scaling_factor {stats['scaling_factor']:.4f}")
    vae.save_pretrained(folder)
    (out / "vae_stats.json").write_text(json.dumps({**stats, "seconds": time.time() - t0}, indent=2))
    save_reconstructions(vae, held_out[:16], out / "vae_recon.png")
    return vae


def edge_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: plain L1/MSE let small details blur away."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


@torch.no_grad()
def vae_stats(vae, images_u8: torch.Tensor) -> dict:
    x = to_pixels(images_u8)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    latents = posterior.sample(generator=torch.Generator().manual_seed(0))
    std = latents.std().item()
    return {"psnr": 10 * math.log10(1 / mse), "latent_std": std, "latent_mean": latents.mean().item(),
            "scaling_factor": 1.0 / std}


@torch.no_grad()
def save_reconstructions(vae, images_u8: torch.Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions below, for checking by eye."""
    from PIL import Image

    recon = vae.decode(vae.encode(to_pixels(images_u8)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rows = [torch.cat(list(images_u8), dim=2), torch.cat(list(recon), dim=2)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)


@torch.no_grad()
def encode_all(vae, images_u8: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Each world picture's latent distribution (mean, std), unscaled, (N, 4, L, L) each; cached."""
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["mean"], cached["std"]
    t0 = time.time()
    means, stds = [], []
    for start in range(0, len(images_u8), 256):
        dist = vae.encode(to_pixels(images_u8[start:start + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, path)
    log(f"latents: encoded {len(mean)} pictures in {time.time() - t0:.0f}s")
    return mean, std


# --- stage 2: UNet + text encoder ----------------------------------------------------------------


def build_unet_and_text(s: Settings, tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(s.seed + 1)
    unet = UNet2DConditionModel(**model_configs(s.latent_size, s.unet_top_channels)[1])
    torch.manual_seed(s.seed + 2)
    text = CLIPTextModel(CLIPTextConfig(
        **TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return unet, text


def start_from_model(folder: str, unet, text) -> None:
    """Load a finished model's UNet and text encoder (its EMA weights, fp16 in a shipped folder) into the
    fp32 modules built from this run's settings: a warm restart, since the weights a finished cosine run ends
    on are the ones it would have continued from. Raises ValueError if the architectures differ."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    for module, loaded in ((unet, UNet2DConditionModel.from_pretrained(folder, subfolder="unet")),
                           (text, CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))):
        state = loaded.state_dict()
        mine = module.state_dict()
        if state.keys() != mine.keys() or any(state[k].shape != mine[k].shape for k in mine):
            raise ValueError(f"--unet-from {folder}: its {type(loaded).__name__} is not the one these settings "
                             "build (pass the --latent-size and --unet-top-channels it was pretrained with)")
        module.load_state_dict({k: v.float() for k, v in state.items()})


class Captions:
    """Caption token ids for a batch of scenes, memoised by caption (there are a few thousand)."""

    def __init__(self, tokenizer, scenes: list[dict], cfg_dropout: float, noun_first_share: float = 0.0):
        from .world import Scene

        self.tokenizer, self.cfg_dropout, self.noun_first_share = tokenizer, cfg_dropout, noun_first_share
        self.scenes = [Scene(**scene) for scene in scenes]
        self.ids: dict[str, torch.Tensor] = {}

    def batch(self, indices: list[int], rng: np.random.Generator) -> torch.Tensor:
        texts = ["" if rng.random() < self.cfg_dropout else caption(self.scenes[i], rng, self.noun_first_share)
                 for i in indices]
        return torch.stack([self._ids(t) for t in texts])  # (B, 77)

    def _ids(self, text: str) -> torch.Tensor:
        if text not in self.ids:
            self.ids[text] = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                            truncation=True, return_tensors="pt").input_ids[0]
        return self.ids[text]


def train_unet(s: Settings, data: dict, latents: tuple[torch.Tensor, torch.Tensor], scaling: float, tokenizer,
               out: Path):
    """Train the UNet and text encoder jointly; resumes from --out/unet_ckpt.pt. Returns EMA modules."""
    from diffusers import DDPMScheduler

    unet, text = build_unet_and_text(s, tokenizer)
    ema_unet, ema_text = build_unet_and_text(s, tokenizer)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text.state_dict())
    params = list(unet.parameters()) + list(text.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = cosine(opt, s.unet_steps, warmup=s.unet_warmup)
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    num_timesteps = len(noise_scheduler.alphas_cumprod)
    captions = Captions(tokenizer, data["scenes"], s.cfg_dropout, s.noun_first_share)
    mean, std = latents
    n = len(mean)
    ckpt_path = out / "unet_ckpt.pt"
    start, elapsed_before = 0, 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=True)
        for module, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"),
                            (opt, "opt"), (sched, "sched")):
            module.load_state_dict(ckpt[key])
        start, elapsed_before = ckpt["step"], ckpt["seconds"]
        log(f"unet: resuming at step {start}")
    elif s.unet_from:
        start_from_model(s.unet_from, unet, text)
        ema_unet.load_state_dict(unet.state_dict())
        ema_text.load_state_dict(text.state_dict())
        log(f"unet: starting from {s.unet_from} (a fresh optimizer and a warm-up, then cosine over {s.unet_steps} steps)")
    unet.train()
    text.train()
    t0 = time.time() - elapsed_before
    running = []
    for step in range(start, s.unet_steps):
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)  # each step's draws from (seed, step)
        rng = np.random.default_rng([s.seed, 2, step])
        idx = torch.randint(0, n, (s.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling  # (B, 4, L, L)
        noise = offset_noise(torch.randn(x0.shape, generator=gen), s.offset_noise, gen)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        ids = captions.batch(idx.tolist(), rng)
        hidden = text(ids).last_hidden_state  # (B, 77, 128)
        pred = unet(noisy, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights("epsilon", noise_scheduler.alphas_cumprod, t, s.min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running.append(per_sample.mean().item())
        done = step + 1
        if done % s.log_every == 0 or done == s.unet_steps:
            log(f"unet step {done}/{s.unet_steps} eps-mse {np.mean(running):.4f} weighted {loss.item():.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
            running = []
        if done % s.checkpoint_every == 0 and done < s.unet_steps:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": done, "seconds": time.time() - t0}, ckpt_path)
    seconds = time.time() - t0
    ema_unet.eval()
    ema_text.eval()
    return ema_unet, ema_text, seconds


@torch.no_grad()
def eval_unet(s: Settings, unet, text, vae, tokenizer, n: int = 256) -> dict:
    """Unweighted epsilon MSE on fresh world pictures at fixed timesteps (a held-out figure)."""
    from diffusers import DDPMScheduler

    world = dataset(n, s.seed + 10_000, s.size, s.dotted_share, s.dotted_ball_share, bool(s.white_dots))
    x = to_pixels(torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in world])).permute(0, 3, 1, 2))
    gen = torch.Generator().manual_seed(1234)
    x0 = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=gen)
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    figures = {}
    for t_value in (100, 500, 900):
        t = torch.full((n,), t_value)
        ids = torch.cat([tokenizer([c for _, c, _ in world], padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids])
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, text(ids).last_hidden_state).sample
        figures[f"eps_mse_t{t_value}"] = F.mse_loss(pred, noise).item()
    return figures


# --- assembly ------------------------------------------------------------------------------------


def save_pipeline(vae, unet, text, folder: Path) -> None:
    """Write the StableDiffusionPipeline folder in fp16 safetensors, with the plain CLIP tokenizer files."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if folder.exists():
        shutil.rmtree(folder)
    tok_tmp = folder.parent / f".{folder.name}-tokenizer"
    write_tokenizer_files(tok_tmp)
    scheduler = PNDMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(tok_tmp), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)  # halves the shipped size; loaders upcast to the dtype they are asked for
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    # As builtin.py does: the plain CLIP tokenizer files, which every transformers version reads.
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer_files(folder / "tokenizer")
    shutil.rmtree(tok_tmp)
    for path in folder.rglob("*"):
        if path.name == "config.json":  # a component loaded from the run folder records that path
            config = json.loads(path.read_text())
            if config.pop("_name_or_path", None) is not None:
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if path.is_file():
            path.chmod(0o644)  # safetensors are written through private (0600) temporary files


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_grid(model: str, path: Path, seed: int = 0, guidance: float = 6.0, dotted: bool = False) -> None:
    """Samples into one PNG, DPM-Solver++ 20 steps: 4 classes x 8 colour/background prompts, and with `dotted`
    (a dotted-world model) the same with dots of a third colour."""
    from ..grid import make_grid
    from ..models import load_base_model
    from ..sampling import render_images

    base = load_base_model(model)
    pipe = base.pipeline("dpm++2m")
    combos = [("red", "blue", "yellow"), ("green", "yellow", "white"), ("blue", "white", "white"),
              ("yellow", "purple", "blue"), ("orange", "gray", "black"), ("purple", "pink", "white"),
              ("white", "green", "red"), ("black", "orange", "yellow")]
    rows, row_labels = [], []
    for with_dots in (False, True) if dotted else (False,):
        for cls in ("ball", "cube", "cup", "star"):
            prompts = [f"a photo of a {c} {cls}{f' with {d} dots' if with_dots else ''} on a {b} background"
                       .replace("a orange", "an orange") for c, b, d in combos]
            row = []
            for i, prompt in enumerate(prompts):
                row += render_images(pipe, prompt, [seed + i], steps=20, guidance=guidance, resolution=64)
            rows.append(row)
            row_labels.append(f"{cls}, dots" if with_dots else cls)
    col_labels = [f"{c} / {b}{f' / {d} dots' if dotted else ''}" for c, b, d in combos]
    make_grid(rows, row_labels=row_labels, col_labels=col_labels).save(path)


def cosine(opt, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


_START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _START:7.0f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        restart_with_passive_openmp("dreamlora.toyworld.pretrain")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (resumes what is there)")
    parser.add_argument("--ship", action="store_true", help=f"copy the finished model into {SHIPPED_DIR}")
    parser.add_argument("--no-grid", action="store_true", help="skip the check grid (32 samples; 64 in the dotted world)")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        model_configs(s.latent_size, s.unet_top_channels)
        if s.unet_from:  # the folder's weights must fit these settings: checked now, not after the data and VAE stages
            for part in ("unet", "text_encoder"):
                if not (Path(s.unet_from) / part / "config.json").is_file():
                    raise ValueError(f"--unet-from {s.unet_from}: not a finished model folder (no {part}/config.json)")
            with tempfile.TemporaryDirectory() as tokenizer_dir:  # the tokenizer the UNet stage builds on
                write_tokenizer_files(Path(tokenizer_dir))
                start_from_model(s.unet_from, *build_unet_and_text(s, load_tokenizer(tokenizer_dir)))
    except ValueError as error:  # before anything is written
        parser.error(str(error))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    (out / "pretrain_settings.json").write_text(json.dumps(asdict(s), indent=2))
    log(f"settings: {json.dumps(asdict(s))}")

    data = make_data(s, out / "data.pt")
    vae = train_vae(s, data, out)
    vae.requires_grad_(False)
    latents = encode_all(vae, data["images"], out / "latents.pt")
    tokenizer_dir = out / "tokenizer"
    write_tokenizer_files(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    unet, text, unet_seconds = train_unet(s, data, latents, vae.config.scaling_factor, tokenizer, out)
    figures = eval_unet(s, unet, text, vae, tokenizer)
    model_dir = out / "model"
    save_pipeline(vae, unet, text, model_dir)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text))}
    summary = {"unet_seconds": unet_seconds, "total_seconds": time.time() - _START, "params": counts,
               "size_bytes": folder_size(model_dir), **figures,
               "vae": json.loads((out / "vae_stats.json").read_text())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"final: {json.dumps(summary)}")
    if args.ship:
        if SHIPPED_DIR.exists():
            for child in SHIPPED_DIR.iterdir():  # keep PRETRAIN_LOG.md and any other notes
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.suffix in (".json", ".txt", ".safetensors"):
                    child.unlink()
        shutil.copytree(model_dir, SHIPPED_DIR, dirs_exist_ok=True)
        log(f"shipped to {SHIPPED_DIR}")
    if not args.no_grid:
        check_grid(str(model_dir), out / "grid.png", dotted=s.dotted_share > 0)
        log(f"check grid: {out / 'grid.png'}")


if __name__ == "__main__":
    main()
