"""DreamBooth on the default toy model over many training seeds, scored by `dreamlora eval`: the README's table.

For each training seed the sample subject (sample_instances/polkaball) is trained with each variant
(default: prior preservation, the default recipe; and --no-prior), every other setting the toy model's
recommended one, and each file is evaluated on both prompt sets (dreamlora.evaluation): the report set
(phrasings, backgrounds and seeds nothing was chosen on) is what the table shows. The table names the
commit it ran on; class images are generated once into a fresh cache, so the first run's time includes them.

    python benchmarks/dreambooth_toy.py                          # seeds 0-4, prior and no prior
    python benchmarks/dreambooth_toy.py --variants prior,prior-no-te --seeds 0,1,2
    python benchmarks/dreambooth_toy.py --readme                 # also rewrite the README's table
    python benchmarks/dreambooth_toy.py --model runs/nf-dots/model --seeds 0   # a rebuilt toy (pretrain.py)
    python benchmarks/dreambooth_toy.py --tuning-only --seeds 0,1 --variants prior-lr3e-4,prior-lr3e-4-init
    python benchmarks/dreambooth_toy.py --tuning-only --phrasings --seeds 1,2 --variants prior,prior-jitter4

The model is the default one (builtin:toy-dots since 2026-12-05; builtin:toy before) with its own recommended
recipe. `--model builtin:toy` trains the other shipped toy with its own; `--model DIR` trains a toy-world model
folder (a `dreamlora.toyworld.pretrain` run) with the default model's recipe, read by the shipped oracle. (Before
2026-12-05 `--model` gave builtin:toy's recipe to every model, builtin:toy-dots included: lr 1e-3, constant.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dreamlora, not another install

from dreamlora.config import DEFAULT_MODEL, LoraConfig  # settings only: no torch until a run starts

INSTANCES = ROOT / "sample_instances" / "polkaball"
DEFAULT_TARGETS = LoraConfig().target_modules  # to_q, to_k, to_v, to_out.0: the target lists below build on them
# LoCon-style targets: the attention projections plus every ResNet convolution, the transformer blocks' 1x1
# projections and their MLPs (where a UNet draws texture; the attention alone only routes it)
CONV_TARGETS = [*DEFAULT_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
# The attention projections plus the finest level's ResNet convolutions (down_blocks.0 and the last of a 3-level
# toy UNet's up blocks, up_blocks.2, which has layers_per_block + 1 = 2 ResNets), where a 32x32-latent toy draws
# dots and has no attention to adapt
TOP_CONV_TARGETS = [*DEFAULT_TARGETS,
                    *(f"{block}.resnets.{i}.{conv}" for block, n in (("down_blocks.0", 1), ("up_blocks.2", 2))
                      for i in range(n) for conv in ("conv1", "conv2"))]
MIRRORED = "<mirrored>"  # a variant's instance folder: the sample photos mirrored left to right, written into --out
MORE_PHOTOS = "<15 photos>"  # a variant's instance folder: the five sample photos and ten more of the same ball, drawn alike
NEAR_PHOTOS = "<near photos>"  # a variant's instance folder: the five photos redrawn with the ball filling more of the frame
CAPTIONED = "<captioned>"  # a variant's instance folder: the sample photos, each with a caption naming its background
COSINE = {"train.learning_rate": 3e-4, "train.lr_scheduler": "cosine"}  # builtin:toy-dots' recipe, given explicitly
# The attention projections of the 8x8 level and the middle only (a 3-level toy UNet's down_blocks.2, mid_block and
# up_blocks.0): the 16x16 level, where the marks' shape is decided, keeps the base model's weights
COARSE_TARGETS = [f"{block}.attentions.{i}.transformer_blocks.0.{attn}.{proj}"
                  for block, n in (("down_blocks.2", 1), ("mid_block", 1), ("up_blocks.0", 2)) for i in range(n)
                  for attn in ("attn1", "attn2") for proj in DEFAULT_TARGETS]
# Cross-attention alone: the adapters change what the words ask for, not how the picture's parts attend to each other
CROSS_TARGETS = [f"attn2.{proj}" for proj in DEFAULT_TARGETS]
VARIANTS = {  # name -> (label, config overrides)
    "prior": ("prior preservation (default)", {}),
    "noprior": ("`--no-prior`", {"prior.enabled": False}),
    "prior-no-te": ("prior, `--no-train-text-encoder`", {"lora.train_text_encoder": False}),
    "noprior-no-te": ("`--no-prior --no-train-text-encoder`, the UNet alone", {"prior.enabled": False,
                                                                             "lora.train_text_encoder": False}),
    "prior-no-pivotal": ("prior, `--no-train-token-embedding`", {"lora.train_token_embedding": False}),
    "prior-conv": ("prior, adapters on the convolutions and MLPs too", {"lora.target_modules": CONV_TARGETS}),
    "prior-lr3e-4": ("prior, `--lr 3e-4`", {"train.learning_rate": 3e-4}),
    "prior-top-conv-lr3e-4": ("prior, `--lr 3e-4`, adapters on the finest level's convolutions too",
                              {"train.learning_rate": 3e-4, "lora.target_modules": TOP_CONV_TARGETS}),
    # the recipe search around --lr 3e-4, one change each (docs/proof-of-learning.md, "Tried: the recipe around
    # `--lr 3e-4`")
    "prior-lr1e-4": ("prior, `--lr 1e-4`", {"train.learning_rate": 1e-4}),
    "prior-lr5e-4": ("prior, `--lr 5e-4`", {"train.learning_rate": 5e-4}),
    "prior-lr3e-4-emb5e-3": ("prior, `--lr 3e-4 --token-embedding-lr 5e-3`",
                             {"train.learning_rate": 3e-4, "lora.token_embedding_lr": 5e-3}),
    "prior-lr3e-4-init": ("prior, `--lr 3e-4 --token-init \"red white dots\"`",
                          {"train.learning_rate": 3e-4, "lora.token_init": "red white dots"}),
    "prior-text-side": ("prior, the text side alone (UNet 1e-5, text encoder 3e-4, embedding 5e-3 from words)",
                        {"train.learning_rate": 1e-5, "lora.text_encoder_lr": 3e-4,
                         "lora.token_embedding_lr": 5e-3, "lora.token_init": "red white dots"}),
    "prior-lr3e-4-no-te": ("prior, `--lr 3e-4 --no-train-text-encoder`, the UNet alone",
                           {"train.learning_rate": 3e-4, "lora.train_text_encoder": False,
                            "lora.train_token_embedding": False}),
    "prior-lr5e-4-rank8": ("prior, `--rank 8 --lr 5e-4`", {"lora.rank": 8, "train.learning_rate": 5e-4}),
    "prior-lr3e-4-lambda1": ("prior, `--lr 3e-4 --prior-loss-weight 1.0`",
                             {"train.learning_rate": 3e-4, "prior.loss_weight": 1.0}),
    "prior-lr3e-4-flip": ("prior, `--lr 3e-4 --random-flip`", {"train.learning_rate": 3e-4, "data.random_flip": True}),
    # builtin:toy-dots: what steadies the training seeds (docs/proof-of-learning.md, "Steadying the seeds")
    "prior-lr3e-4-batch4": ("prior, `--lr 3e-4 --batch-size 4 --steps 500`",
                            {"train.learning_rate": 3e-4, "train.batch_size": 4, "train.steps": 500}),
    "prior-lr3e-4-te1e-4": ("prior, `--lr 3e-4 --text-encoder-lr 1e-4`",
                            {"train.learning_rate": 3e-4, "lora.text_encoder_lr": 1e-4}),
    "prior-lr3e-4-cosine": ("prior, `--lr 3e-4 --lr-scheduler cosine`", COSINE),
    "noprior-lr3e-4-cosine": ("`--no-prior --lr 3e-4 --lr-scheduler cosine`", {**COSINE, "prior.enabled": False}),
    "prior-lr3e-4-cosine-600": ("prior, `--lr 3e-4 --lr-scheduler cosine --steps 600`", {**COSINE, "train.steps": 600}),
    "prior-lr3e-4-cosine-rank8": ("prior, `--lr 3e-4 --lr-scheduler cosine --rank 8`", {**COSINE, "lora.rank": 8}),
    "prior-lr3e-4-cosine-rank16": ("prior, `--lr 3e-4 --lr-scheduler cosine --rank 16`", {**COSINE, "lora.rank": 16}),
    "prior-lr3e-4-cosine-lambda1": ("prior, `--lr 3e-4 --lr-scheduler cosine --prior-loss-weight 1`",
                                    {**COSINE, "prior.loss_weight": 1.0}),
    "prior-lr3e-4-cosine-coarse": ("prior, `--lr 3e-4 --lr-scheduler cosine`, adapters on the 8x8 level and middle only",
                                   {**COSINE, "lora.target_modules": COARSE_TARGETS}),
    "prior-lr3e-4-cosine-cross": ("prior, `--lr 3e-4 --lr-scheduler cosine`, adapters on cross-attention only",
                                  {**COSINE, "lora.target_modules": CROSS_TARGETS}),
    "prior-lr3e-4-cosine-snr5": ("prior, `--lr 3e-4 --lr-scheduler cosine --snr-gamma 5`",
                                 {**COSINE, "train.snr_gamma": 5.0}),
    "prior-class50": ("prior, `--num-class-images 50`", {"prior.num_class_images": 50}),
    "prior-te1e-3": ("prior, `--text-encoder-lr 1e-3` (the UNet's adapters at the recipe's 3e-4)",
                     {"lora.text_encoder_lr": 1e-3}),
    "prior-te-still": ("prior, text-encoder adapters held still (`--text-encoder-lr 1e-8`), the token's embedding learnt",
                       {"lora.text_encoder_lr": 1e-8}),
    # the training prompt read at shifted token positions (docs/proof-of-learning.md, "prompt position jitter")
    "prior-jitter4": ("prior, `--position-jitter 4`", {"lora.position_jitter": 4}),
    "prior-jitter8": ("prior, `--position-jitter 8`", {"lora.position_jitter": 8}),
    "prior-jitter2": ("prior, `--position-jitter 2`", {"lora.position_jitter": 2}),
    # jitter with the rank that was steadier on the tuning set (rank 8: smaller marks, less drift?)
    "prior-jitter4-rank8": ("prior, `--position-jitter 4 --rank 8`", {"lora.position_jitter": 4, "lora.rank": 8}),
    "prior-lr3e-4-rank8": ("prior, `--lr 3e-4 --rank 8`", {"train.learning_rate": 3e-4, "lora.rank": 8}),
    # the toy world lights everything from the upper left: a mirrored photo is lit from a side it never shows
    "prior-flip": ("prior, `--random-flip`", {"data.random_flip": True}),
    "prior-mirrored": ("prior, the five photos mirrored once", {"data.instance_dir": MIRRORED}),
    # more views of the same ball (other turns, places and sizes on the photos' five backgrounds): fewer dot layouts to blend
    "prior-photos15": ("prior, 15 photos of the ball instead of 5", {"data.instance_dir": MORE_PHOTOS}),
    # the ball nearer the camera (diameter 0.53-0.66 of the side, the top of the world's range; the photos: 0.38-0.72),
    # so each dot covers more latent cells
    "prior-photos-near": ("prior, the five photos with the ball nearer", {"data.instance_dir": NEAR_PHOTOS}),
    # each photo trained with "a photo of sks ball on a blue background": the background named, not learnt as the subject
    "prior-lr3e-4-cosine-captions": ("prior, `--lr 3e-4 --lr-scheduler cosine`, captions naming each photo's background",
                                     {**COSINE, "data.instance_dir": CAPTIONED}),
}
# (field, column title) of the README table, report set
COLUMNS = (("subject_detected", "subject present"), ("dots_detected", "dots alone"),
           ("subject_similarity", "similarity"), ("background_match", "background match"),
           ("class_shows_subject", "class shows subject"), ("class_shift", "class shift"),
           ("other_classes_color_shift", "other classes: colour shift"),
           ("other_classes_background_shift", "other classes: bg shift"), ("attributes_obeyed", "attributes obeyed"))
START, END = "<!-- toy-table: start (benchmarks/dreambooth_toy.py --readme) -->", "<!-- toy-table: end -->"


def run(seed: int, variant: str, out: Path, grid: bool, reuse: bool = False, model: str | None = None,
        prompt_sets: tuple[str, ...] = ("tuning", "report")) -> dict:
    from dreamlora import load_config, train
    from dreamlora.config import DEFAULT_MODEL, recommended_settings
    from dreamlora.evaluation import evaluate

    tag = f"seed{seed}-{variant}"
    overrides = dict(VARIANTS[variant][1])
    photo_folders = {MIRRORED: (mirrored_photos, "mirrored-photos"), CAPTIONED: (captioned_photos, "captioned-photos"),
                     MORE_PHOTOS: (more_photos, "more-photos"), NEAR_PHOTOS: (near_photos, "near-photos")}
    if overrides.get("data.instance_dir") in photo_folders:  # a variant's own copy of the photos, made in --out
        make, name = photo_folders[overrides["data.instance_dir"]]
        overrides["data.instance_dir"] = str(make(out / name))
    # a built-in model brings its own recipe (recommendations follow the name); a rebuilt toy-world folder gets the
    # default model's, given explicitly
    rebuilt = {"model.name": model} if model else {}
    if model and not model.startswith("builtin:"):
        rebuilt.update(recommended_settings(DEFAULT_MODEL))
    config = load_config(None, {**rebuilt, "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
                                "output.path": str(out / f"{tag}.safetensors"), "output.overwrite": True,
                                "train.seed": seed, "validation.final": False, "validation.eval_every": 0,
                                **overrides})
    output, seconds = Path(config.output.path), None
    if not (reuse and output.is_file()):  # --reuse: a file an interrupted benchmark trained is scored as it is
        started = time.time()
        output = train(config).output
        seconds = round(time.time() - started, 1)
    report = evaluate(output, instance_dir=INSTANCES, grid=out / f"{tag}-eval.png" if grid else None,
                      prompt_sets=list(prompt_sets), **({"model": model, "oracle": True} if model else {}))
    sets = {s.name: {"lora": s.lora.__dict__, "base": s.base.__dict__, "per_background": s.per_background}
            for s in report.sets}
    return {"seed": seed, "variant": variant, "train_s": seconds, "sets": sets}


def captioned_photos(folder: Path) -> Path:
    """The sample photos as they are, each beside a caption naming its background (rewritten each run)."""
    import shutil

    from dreamlora.toyworld.world import BACKGROUNDS

    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(INSTANCES.glob("*.png"))
    # the world's first five backgrounds are the five sample photos', in file order (scripts/make_sample_instances.py)
    for photo, background in zip(photos, list(BACKGROUNDS)[:5], strict=True):
        shutil.copyfile(photo, folder / photo.name)
        (folder / photo.name).with_suffix(".txt").write_text(f"a photo of {{token}} {{class}} on a {background} background\n")
    return folder


def sample_photo_script():
    """scripts/make_sample_instances.py, which draws the sample photos (imported once; its folder added once)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import make_sample_instances

    return make_sample_instances


def save_photos(folder: Path, images) -> Path:
    """`images` as 01.png, 02.png, ... in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images, start=1):
        image.save(folder / f"{i:02d}.png", format="PNG")
    return folder


def more_photos(folder: Path, count: int = 15) -> Path:
    """The five sample photos and more drawn by the same script from the next seeds (rewritten each run)."""
    import math

    script = sample_photo_script()
    seeds = range(script.DEFAULT_SEED, script.DEFAULT_SEED + math.ceil(count / 5))  # five photos a seed
    photos = [image for seed in seeds for image in script.draw_instances(seed)]
    return save_photos(folder, photos[:count])  # the first five are the sample photos, byte for byte


def near_photos(folder: Path, radii: tuple[float, ...] = (38.0, 36.0, 42.0, 40.0, 34.0)) -> Path:
    """The five sample photos redrawn from the same seed with other ball radii (px at 128 px; rewritten each run)."""
    return save_photos(folder, sample_photo_script().draw_instances(radii=radii))


def mirrored_photos(folder: Path) -> Path:
    """The sample photos mirrored left to right, as PNGs in `folder` (rewritten each run: the same pixels)."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted(INSTANCES.glob("*.png")):
        with Image.open(photo) as image:
            ImageOps.mirror(image.convert("RGB")).save(folder / photo.name)
    return folder


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # what decides the figures: the library, the CLI and the photos (this script's own edits do not)
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "dreamlora", "cli", "sample_instances")
    return head + ("+changes" if changed else "")


def table(rows: list[dict], revision: str) -> str:
    """The README table: per variant mean [min–max] over seeds, report set; the base model's row; per-seed line."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [f"| report set, commit `{revision}`: mean [min–max] over training seeds | "
             + " | ".join(title for _, title in COLUMNS) + " | train time |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    base = rows[0]["sets"]["report"]["base"]
    lines.append("| base model | " + " | ".join(_cell(base[f]) for f, _ in COLUMNS) + " | |")
    for variant in variants:
        chosen = [r for r in rows if r["variant"] == variant]
        cells = []
        for field, _ in COLUMNS:
            values = [r["sets"]["report"]["lora"][field] for r in chosen]
            cells.append("-" if None in values else f"{statistics.mean(values):.2f} [{min(values):.2f}–{max(values):.2f}]")
        times = [r["train_s"] for r in chosen if r["train_s"] is not None]
        timing = f"{min(times):.0f}–{max(times):.0f} s" if times else ""
        used = ", ".join(str(r["seed"]) for r in sorted(chosen, key=lambda r: r["seed"]))
        lines.append(f"| LoRA, {VARIANTS[variant][0]}, seeds {used} | " + " | ".join(cells) + f" | {timing} |")
    floor = [(r["sets"]["report"]["lora"]["base_color_spread"], r["sets"]["report"]["lora"]["base_background_spread"])
             for r in rows[:1]]
    lines += ["", f"The base model's own spread (its renders of the other classes from two seed sets): colour "
              f"{floor[0][0]:.2f}, background {floor[0][1]:.2f}.", ""]
    for variant in variants:
        chosen = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['seed']}: {r['sets']['report']['lora']['subject_detected']:.2f}" for r in chosen)
        tuning = statistics.mean(r["sets"]["tuning"]["lora"]["subject_detected"] for r in chosen)
        backgrounds = chosen[0]["sets"]["report"]["per_background"]
        per_bg = ", ".join(f"{bg} {statistics.mean(r['sets']['report']['per_background'][bg]['lora'] for r in chosen):.2f}"
                           for bg in backgrounds)
        lines.append(f"- {VARIANTS[variant][0]}: subject present per seed {per_seed}; per background {per_bg}; "
                     f"on the tuning set {tuning:.2f}.")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants", default="prior,noprior", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table with this run's")
    parser.add_argument("--reuse", action="store_true", help="score files already in --out instead of training them")
    parser.add_argument("--tables", type=Path, nargs="+", help="no runs: the table of these results.json files")
    parser.add_argument("--model", help="builtin:toy, or a rebuilt toy-world model folder, instead of the default")
    parser.add_argument("--tuning-only", action="store_true",
                        help="score the tuning set alone and write no table: for choosing a recipe without "
                             "looking at the report set")
    parser.add_argument("--phrasings", action="store_true",
                        help="with --tuning-only: also the phrasings set (the tuning set's backgrounds and seeds, "
                             "phrasings one word off the training prompt)")
    args = parser.parse_args()
    if args.tuning_only and (args.readme or args.tables):
        parser.error("--tuning-only writes no table: leave out --readme and --tables")
    if args.phrasings and not args.tuning_only:
        parser.error("--phrasings goes with --tuning-only (the table is the report set's)")
    if args.tables:
        loaded = [json.loads(path.read_text()) for path in args.tables]
        revisions = sorted({data["commit"] for data in loaded})
        write_table(table([r for data in loaded for r in data["runs"]], ", ".join(revisions)), args.readme)
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="dreambooth-toy-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DREAMLORA_CACHE", str(out / "cache"))  # fresh: class images are part of the time
    revision = f"{commit()}, model {args.model or DEFAULT_MODEL}"
    sets = (("tuning", "phrasings") if args.phrasings else ("tuning",)) if args.tuning_only else ("tuning", "report")
    results_name = "results-tuning.json" if args.tuning_only else "results.json"  # never mixed in one table
    rows = []
    results = out / results_name
    # --reuse: rows an interrupted benchmark of the same commit finished are kept as they are
    previous = json.loads(results.read_text())["runs"] if args.reuse and results.is_file() and \
        json.loads(results.read_text())["commit"] == revision else []
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in args.variants.split(","):
            done = [r for r in previous if (r["seed"], r["variant"]) == (seed, variant)]
            rows.append(done[0] if done else run(seed, variant, out, grid=seed == 0, reuse=args.reuse,
                                                          model=args.model, prompt_sets=sets))
            results.write_text(json.dumps({"commit": revision, "runs": rows}, indent=1))
            scored = ", ".join(f"{name} {rows[-1]['sets'][name]['lora']['subject_detected']:.2f}" for name in sets)
            print(f"seed {seed} {variant}: subject present {scored} (trained in {rows[-1]['train_s']} s)", flush=True)
    print(f"files, eval grids and {results_name}: {out}")
    if not args.tuning_only:
        write_table(table(rows, revision), args.readme)


def write_table(text: str, readme: bool) -> None:
    print(text)
    if readme:
        path = ROOT / "README.md"
        head, _, rest = path.read_text(encoding="utf-8").partition(START)
        _, _, tail = rest.partition(END)
        path.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
