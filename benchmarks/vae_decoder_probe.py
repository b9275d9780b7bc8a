"""Is the subject lost in the toy VAE? Its decoder fine-tuned on the dotted world, and what that changes.

DreamBooth on builtin:toy learns the instance photos' latents; what a render can look like is what the VAE
decodes from them. This measures the shipped VAE's round trip of the five photos (64 px) against that of the
world's own pictures, then fine-tunes the decoder alone (encoder frozen, so the latent space, the UNet and every
trained LoRA file stay valid, as with SD's ft-MSE VAE) on the dotted world (world.py: objects with dots of other
colours, never the subject's red with white) and generic shapes, and measures again. The photos are never in
its training data. With --lora FILES it also scores those files with `dreamlora eval` through the new decoder.

    python benchmarks/vae_decoder_probe.py --out runs/vae-decoder --threads 1        # about 25 min
    python benchmarks/vae_decoder_probe.py --out runs/vae-decoder --lora runs/toy-bench/seed0-prior.safetensors

Writes OUT/ (the fine-tuned VAE, diffusers layout) and OUT.png: the photos, the shipped VAE's round trip and
the fine-tuned one's, 3x.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dreamlora, not another install
INSTANCES = ROOT / "sample_instances" / "polkaball"


def pictures(n_world: int, n_generic: int, seed: int, dotted_share: float, generic_seed: int = 8):
    import numpy as np
    import torch

    from dreamlora.toyworld.pretrain import generic_image
    from dreamlora.toyworld.world import dataset

    world = [np.asarray(image) for image, _, _ in dataset(n_world, seed, 64, dotted_share)]
    rng = np.random.default_rng(generic_seed)
    generic = [generic_image(rng, 64) for _ in range(n_generic)]
    return torch.from_numpy(np.stack(world + generic)).permute(0, 3, 1, 2).contiguous()


def photos():
    import numpy as np
    import torch
    from PIL import Image

    images = [Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
              for p in sorted(INSTANCES.glob("*.png"))]
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()


def round_trip(vae, images_u8):
    """(PSNR in dB, reconstructions in [-1, 1]) of the latent means, as DreamBooth's cached latents are."""
    import torch
    import torch.nn.functional as F

    from dreamlora.toyworld.pretrain import to_pixels

    with torch.no_grad():
        x = to_pixels(images_u8)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(1 / F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()), recon


def finetune_decoder(vae, pool, steps: int, lr: float, batch: int, seed: int, log=print):
    """The pretraining's VAE loss (MSE + L1 + edge L1), the encoder frozen, whole 64 px pictures."""
    import torch
    import torch.nn.functional as F

    from dreamlora.toyworld.pretrain import edge_loss, to_pixels

    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    vae.train()
    for step in range(steps):
        x = to_pixels(pool[torch.randint(0, len(pool), (batch,), generator=generator)])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=generator)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + edge_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"decoder step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s")
    vae.eval()
    return vae


def evaluate_with(vae_folder: Path, files: list[Path]) -> None:
    """`dreamlora eval` of each file, builtin:toy's VAE replaced by the one in `vae_folder`."""
    from diffusers import AutoencoderKL

    import dreamlora.models
    from dreamlora.evaluation import evaluate

    state = AutoencoderKL.from_pretrained(vae_folder).state_dict()
    load = dreamlora.models.load_base_model

    def with_decoder(*args, **kwargs):
        base = load(*args, **kwargs)
        if base.identity == "builtin:toy":
            base.vae.load_state_dict(state)
        return base

    dreamlora.models.load_base_model = with_decoder  # evaluate() imports it from the package when called
    try:
        for file in files:
            report = evaluate(file, instance_dir=INSTANCES, grid=vae_folder.parent / f"{vae_folder.name}-{file.stem}.png")
            for s in report.sets:
                figures = ", ".join(f"{k} {v:.2f}" for k, v in s.lora.__dict__.items() if isinstance(v, float))
                print(f"{file.name} {s.name}: {figures}")
    finally:
        dreamlora.models.load_base_model = load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned VAE")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", type=Path, nargs="*", default=[], help="LoRA files to score through the new decoder")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from dreamlora.models import load_base_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = load_base_model("builtin:toy").vae.float()
    if not (args.out / "config.json").is_file():
        pool = pictures(4000, 1000, seed=7, dotted_share=0.5)
        held_out = pictures(256, 0, seed=99, dotted_share=0.0)  # the plain world, as the UNet learnt it
        photos_u8 = photos()
        before_world, _ = round_trip(vae, held_out)
        before_photos, shipped = round_trip(vae, photos_u8)
        finetune_decoder(vae, pool, args.steps, args.lr, batch=32, seed=0)
        after_world, _ = round_trip(vae, held_out)
        after_photos, tuned = round_trip(vae, photos_u8)
        print(f"round-trip PSNR, shipped VAE -> decoder fine-tuned ({args.steps} steps): plain-world pictures "
              f"{before_world:.2f} -> {after_world:.2f} dB, the five instance photos {before_photos:.2f} -> "
              f"{after_photos:.2f} dB")
        vae.save_pretrained(args.out)

        def row(images):
            return torch.cat(list(((images + 1) * 127.5).round().to(torch.uint8)), dim=2)

        grid = torch.cat([torch.cat(list(photos_u8), dim=2), row(shipped), row(tuned)], dim=1).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(grid)).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                                           Image.Resampling.NEAREST).save(args.out.with_suffix(".png"))
    if args.lora:
        evaluate_with(args.out, args.lora)


if __name__ == "__main__":
    main()
