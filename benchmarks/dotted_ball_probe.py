"""Can a pretrained toy model draw a ball with separate round dots? The base model's side of the subject.

DreamBooth inherits how its base model draws a dotted ball: on every toy model so far the LoRA's subject looked
like the base model's own dotted balls (docs/proof-of-learning.md). This renders "a photo of a {colour} ball with
white dots on a {background} background" for the world's ball colours that carry white dots (the subject's red
never does), and reads each render with the pixels' test of `dreamlora eval` (dreamlora/toyworld/shapes.py: the
ball round, at least two separate small white dots), next to the same test on the world's own drawings of those
scenes (the test was set on red balls: on other colours a highlight or a lumpy rim can pass it, so read the
dot counts and the grid too). It reads a finished model folder, or a `pretrain` run folder while it trains
(the EMA weights of its last checkpoint), so a run can be judged before it ends.

    python benchmarks/dotted_ball_probe.py --model dreamlora/builtin_models/toy --out runs/probe.png
    python benchmarks/dotted_ball_probe.py --run runs/x32 --out runs/x32-probe.png --threads 1
    python benchmarks/dotted_ball_probe.py --model runs/wd/model --colours red --out runs/wd-red.png

`--colours red` asks for the subject itself from words alone ("a red ball with white dots", which no world
draws): how far a base model is from the subject before DreamBooth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLOURS = ("blue", "green", "orange", "purple")  # ball colours the world dots with white, nearest the subject
BACKGROUNDS = ("gray", "pink", "yellow")  # on white, background showing through a lumpy rim reads as a dot


def model_from_run(run: Path, folder: Path) -> tuple[Path, int]:
    """A pipeline folder made from a pretrain run's VAE and the EMA weights of its last UNet checkpoint."""
    from dreamlora.models.tokenizer import load_tokenizer
    from dreamlora.toyworld.pretrain import Settings, build_unet_and_text, save_pipeline
    from diffusers import AutoencoderKL

    settings = Settings(**json.loads((run / "pretrain_settings.json").read_text()))
    tokenizer = load_tokenizer(run / "tokenizer")
    unet, text = build_unet_and_text(settings, tokenizer)
    checkpoint = torch.load(run / "unet_ckpt.pt", weights_only=True)  # our own checkpoint: tensors and numbers
    unet.load_state_dict(checkpoint["ema_unet"])
    text.load_state_dict(checkpoint["ema_text"])
    save_pipeline(AutoencoderKL.from_pretrained(run / "vae"), unet, text, folder)
    return folder, int(checkpoint["step"])


def probe(model: Path, seeds: list[int], guidance: float, colours: tuple[str, ...] = COLOURS) -> tuple[dict, list]:
    """Share of renders and of drawings that pass the pixels' test, per colour; the renders by colour."""
    from dreamlora.models import load_base_model
    from dreamlora.sampling import render_images
    from dreamlora.toyworld.oracle import OracleConfig
    from dreamlora.toyworld.shapes import read_shape
    from dreamlora.toyworld.world import COLORS, Scene, draw_scene, random_placement

    config = OracleConfig()  # the subject test of `dreamlora eval`

    def readings(images) -> dict:
        shapes = [read_shape(np.asarray(im.convert("RGB"), np.float32) / 255.0, COLORS[colour]) for im in images]
        passes = [config.shows_subject_shape(s) for s in shapes]
        return {"pass": float(np.mean(passes)),
                "dots": float(np.mean([s.dots for s in shapes])),
                "roundness": float(np.mean([s.roundness for s in shapes]))}

    pipe = load_base_model(str(model)).pipeline("dpm++2m")
    figures, rows = {}, []
    rng = np.random.default_rng(0)
    for colour in colours:
        renders = []
        for background in BACKGROUNDS:
            article = "an" if colour == "orange" else "a"
            prompt = f"a photo of {article} {colour} ball with white dots on a {background} background"
            renders += render_images(pipe, prompt, seeds, steps=20, guidance=guidance, resolution=64)
        drawings = [draw_scene(Scene("ball", colour, background, *random_placement(rng), dots="white"))
                    for background in BACKGROUNDS for _ in seeds]
        figures[colour] = {"renders": readings(renders), "drawings": readings(drawings)}
        rows.append(renders)
    figures["all"] = {kind: {key: float(np.mean([figures[c][kind][key] for c in colours]))
                             for key in ("pass", "dots", "roundness")} for kind in ("renders", "drawings")}
    return figures, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a finished model folder (diffusers layout)")
    source.add_argument("--run", type=Path,
                        help="a `python -m dreamlora.toyworld.pretrain` run folder, mid-run or done")
    parser.add_argument("--out", type=Path, required=True, help="PNG: one row a colour, backgrounds x seeds")
    parser.add_argument("--seeds", type=int, default=4, help="render seeds per prompt (from 0)")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--colours", default=",".join(COLOURS),
                        help="comma-separated ball colours (default: those the world dots with white; red: the subject)")
    args = parser.parse_args()
    colours = tuple(args.colours.split(","))
    torch.set_num_threads(args.threads)
    from dreamlora.grid import make_grid

    with tempfile.TemporaryDirectory() as tmp:
        step = None
        model = args.model
        if args.run is not None:
            model, step = model_from_run(args.run, Path(tmp) / "model")
        figures, rows = probe(model, list(range(args.seeds)), args.guidance, colours)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, row_labels=[f"{c} ball, white dots" for c in colours],
              col_labels=[f"{b} / seed {s}" for b in BACKGROUNDS for s in range(args.seeds)]).save(args.out)
    where = f"{args.run} at step {step}" if step is not None else str(args.model)
    print(f"{where}, renders / the world's drawings of the same scenes:")
    print("  colour   pass (round, separate white dots)   separate dots   roundness")
    for colour, figure in figures.items():
        r, d = figure["renders"], figure["drawings"]
        print(f"  {colour:7s}  {r['pass']:.2f} / {d['pass']:.2f}{'':26s}{r['dots']:.1f} / {d['dots']:.1f}"
              f"       {r['roundness']:.2f} / {d['roundness']:.2f}")
    print(f"grid: {args.out}")


if __name__ == "__main__":
    main()
