"""The built-in fine-tuning example: toy-world scenes drawn in a style `builtin:toy` never saw (horizontal stripes).

`python -m dreamlora.toyworld.style --out DIR` writes a captioned set (`DIR/data`: the world's scenes with
every row band of the picture alternately darkened, each with its ordinary content caption), fine-tunes
`builtin:toy` on it with `dreamlora.train` (the `finetune` job), and measures base against LoRA on full captions
the set never held (other seeds):

- style share: the renders whose rows show the stripe period (`stripe_strength` over STRIPED);
- prompt fidelity: the oracle's class, colour and background accuracy on the renders, the same read as
  `dreamlora eval` uses. The oracle never saw stripes: its accuracy on the striped *drawn* scenes says how
  much of a drop is the reader's.

Every caption is a plain content caption: the style comes from the images, so ordinary prompts should
render striped while the object, its colour and the background still follow the prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PERIOD = 8  # px at 64 px: 4 dark rows, then 4 light ones (two latent cells of the toy VAE)
DARKEN = 0.55  # the dark bands' brightness factor
STRIPED = 12.0  # a render is striped when its row bands differ by at least this much (0-255 grey)


def stylise(image: Image.Image) -> Image.Image:
    """Darken every other band of PERIOD // 2 rows, across the whole picture."""
    pixels = np.asarray(image, dtype=np.float64).copy()
    rows = (np.arange(pixels.shape[0]) * 64 // pixels.shape[0]) % PERIOD < PERIOD // 2
    pixels[rows] *= DARKEN
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def stripe_strength(image: Image.Image) -> float:
    """How strongly the picture's row brightness follows the stripe period (grey levels, 0 for plain scenes).

    The row means are detrended (a 2-period moving average removed) and matched against a square wave of
    the period at each phase; the best match's amplitude is the strength. Objects and shading vary slowly
    and average out; only a pattern at this period scores.
    """
    grey = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    profile = grey.mean(axis=1)  # (64,)
    kernel = np.ones(PERIOD) / PERIOD
    trend = np.convolve(np.pad(profile, PERIOD, mode="edge"), kernel, mode="same")[PERIOD:-PERIOD]
    detrended = profile - trend
    best = 0.0
    for phase in range(PERIOD):
        wave = np.where((np.arange(64) + phase) % PERIOD < PERIOD // 2, -1.0, 1.0)
        best = max(best, float(np.mean(detrended * wave)) * 2)  # the amplitude between dark and light bands
    return best


def write_style_set(folder: str | Path, n: int = 64, seed: int = 0) -> Path:
    """`n` striped toy scenes with their content captions (03.png + 03.txt), the first DATA form of finetune."""
    from .world import dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, text, _scene) in enumerate(dataset(n, seed)):
        stylise(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def full_captions(n: int, seed: int) -> tuple[list[str], list]:
    """`n` full captions of random scenes ("a photo of a red ball on a blue background") and their scenes."""
    from ..evaluation import _article
    from .world import random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [f"a photo of {_article(s.color)} {s.color} {s.cls} on {_article(s.background)} {s.background} background"
            for s in scenes], scenes


def render(model: str, prompts: list[str], lora: str | Path | None, *, seed: int = 1000, steps: int = 20,
           guidance: float = 7.5, batch_size: int = 16) -> list[Image.Image]:
    """One render a prompt (seed `seed + i`), with the LoRA at scale 1 or without it."""
    from ..models import load_base_model
    from ..sampling import decode_latents, initial_latents

    base = load_base_model(model)
    pipe = base.pipeline("dpm++2m")
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    resolution = base.default_resolution
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            latents = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                           width=resolution, generator=generators,
                           latents=initial_latents(pipe, generators, resolution),
                           output_type="latent").images
        images += decode_latents(pipe.vae, pipe.image_processor, latents)
    return images


def score(images: list[Image.Image], scenes: list) -> dict:
    """Style share and the oracle's reading of class, colour and background against the prompts' scenes."""
    from .oracle import load_oracle

    reading = load_oracle().read(images)
    n = len(images)
    return {"style_share": sum(stripe_strength(image) >= STRIPED for image in images) / n,
            "stripe_strength": float(np.mean([stripe_strength(image) for image in images])),
            "class": sum(c == s.cls for c, s in zip(reading.classes, scenes)) / n,
            "color": sum(c == s.color for c, s in zip(reading.colors, scenes)) / n,
            "background": sum(b == s.background for b, s in zip(reading.backgrounds, scenes)) / n}


def run(out: str | Path, *, images: int = 64, steps: int = 600, n: int = 64, log=print) -> dict:
    """Write the set, fine-tune builtin:toy on it, render base and LoRA, and score both; figures in out/style.json."""
    from .. import load_config, train
    from .world import draw_scene

    out = Path(out)
    data = write_style_set(out / "data", images)
    config = load_config(None, {
        "data.job": "finetune", "data.instance_dir": str(data), "output.path": str(out / "striped.safetensors"),
        "output.overwrite": True, "train.steps": steps, "train.batch_size": 4, "train.checkpoint_every": 0,
        "train.lr_scheduler": "cosine", "validation.seeds": [1000, 1001, 1002, 1003], "validation.prompts": [
            "a photo of a red ball on a blue background", "a photo of a yellow star on a purple background",
            "a photo of a green cup on a white background"]})
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    log(f"trained {steps} steps in {seconds:.0f} s")
    prompts, scenes = full_captions(n, seed=1)  # other scenes than the set's (seed 0)
    figures = {"images": images, "steps": steps, "train_seconds": round(seconds, 1), "n": n,
               "drawn_plain": score([draw_scene(s) for s in scenes], scenes),
               "drawn_striped": score([stylise(draw_scene(s)) for s in scenes], scenes),
               "base": score(render("builtin:toy", prompts, None), scenes),
               "lora": score(render("builtin:toy", prompts, result.output), scenes),
               "grid": str(result.validation_grid)}
    (out / "style.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the set, the run, the LoRA and style.json.")
    parser.add_argument("--images", type=int, default=64, help="Captioned images in the set.")
    parser.add_argument("--steps", type=int, default=600, help="Fine-tuning steps (batch 4).")
    parser.add_argument("--n", type=int, default=64, help="Full captions rendered for the scores.")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out, images=args.images, steps=args.steps, n=args.n), indent=2))


if __name__ == "__main__":
    main()
