"""The toy oracle checked against eyes: renders labelled by a person, and the oracle's precision and recall on them.

`--make` renders a labelling set from LoRA files of several training seeds (with and without prior
preservation): subject prompts of the report set, plain and red class prompts, each with the LoRA and
with the base model. The renders are stored as they are (64 px) in contact sheets of 50,
`benchmarks/oracle_labels/sheet-K.png`, listed in `renders.json`; enlarged, numbered copies for labelling
go to --view. A person labels each render in `labels.json`: 1 when it shows the subject (a round red ball
with separate white dots), 0 when not.

Scoring (the default) reads the committed sheets and labels and prints, against those labels, the
precision and recall of the oracle's "subject present" (what `dreamlora eval` counts) and of its dot
detector alone, for each committed set: `oracle_labels/` (the first, from files of the recipe without the
token embedding; the pixels' test of toyworld/shapes.py was written after it was labelled, and checked
on it), `oracle_labels/heldout/` (made and labelled after that test was set, from files of the
recipe with the token embedding), and builtin:toy-dots' `oracle_labels/toy-dots/` (constant rate; the rim-dot
and no-bar rules were checked on it) and `oracle_labels/toy-dots-heldout/` (cosine rate; labelled after them).
`--model builtin:toy-dots` renders a set from that model's files.

    python benchmarks/oracle_labels.py --make runs/toy-bench/seed{0,1,2}-{prior,noprior}.safetensors --view /tmp/view
    python benchmarks/oracle_labels.py                        # the four committed sets
    python benchmarks/oracle_labels.py --oracle runs/oracle   # an oracle from `train_oracle --out runs/oracle`
    python benchmarks/oracle_labels.py --make FILES --set runs/labels-2 --view /tmp/view   # a second set elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dreamlora, not another install

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "oracle_labels"  # the labelling set of the shipped builtin:toy
TILE, COLUMNS, PER_SHEET = 64, 10, 50
SEEDS = (2000, 2001, 2002, 2003)  # seeds of neither prompt set
COMMITTED = (HERE, HERE / "heldout", HERE / "toy-dots", HERE / "toy-dots-heldout")  # the labelled sets, in order


def make(files: list[Path], view: Path | None, folder: Path = HERE, seeds: tuple[int, ...] = SEEDS,
         model: str = "builtin:toy") -> None:
    import torch

    from dreamlora.evaluation import PROMPT_SETS, fill_subject
    from dreamlora.lora import read_lora_file
    from dreamlora.models import load_base_model
    from dreamlora.sampling import attach_lora, detach_lora, render_images

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_base_model(model)
    report = PROMPT_SETS["report"]
    subject = [fill_subject(p, "sks", "ball", bg) for p in report.phrasings for bg in report.backgrounds]
    classes = ["a photo of a ball", "a photo of a red ball"]
    entries, images = [], []
    for index, file in enumerate(files):
        pipe = base.pipeline("dpm++2m")
        attach_lora(pipe, base, file, read_lora_file(file).metadata, f"label{index}")
        pipe.set_adapters([f"label{index}"], adapter_weights=[1.0])
        for prompt in subject + classes:
            for seed, image in zip(seeds, render_images(pipe, prompt, list(seeds), steps=20, guidance=7.5,
                                                        resolution=64)):
                entries.append({"source": file.stem, "prompt": prompt, "seed": seed})
                images.append(image)
        detach_lora(pipe, base)  # the base model's renders below must not keep the last file's token
    pipe = base.pipeline("dpm++2m")  # the base model: the same prompts, never the subject
    for prompt in subject + classes:
        for seed, image in zip(seeds[:3], render_images(pipe, prompt, list(seeds[:3]), steps=20, guidance=7.5,
                                                         resolution=64)):
            entries.append({"source": "base", "prompt": prompt, "seed": seed})
            images.append(image)
    folder.mkdir(parents=True, exist_ok=True)
    for sheet in range(0, len(images), PER_SHEET):
        chunk = images[sheet:sheet + PER_SHEET]
        canvas = Image.new("RGB", (COLUMNS * TILE, -(-len(chunk) // COLUMNS) * TILE), "black")
        for i, image in enumerate(chunk):
            canvas.paste(image.convert("RGB").resize((TILE, TILE)), ((i % COLUMNS) * TILE, (i // COLUMNS) * TILE))
        canvas.save(folder / f"sheet-{sheet // PER_SHEET + 1}.png")
        if view:
            view.mkdir(parents=True, exist_ok=True)
            big = canvas.resize((canvas.width * 3, canvas.height * 3), Image.Resampling.NEAREST)
            draw = ImageDraw.Draw(big)
            for i in range(len(chunk)):
                draw.text(((i % COLUMNS) * TILE * 3 + 3, (i // COLUMNS) * TILE * 3 + 2), str(sheet + i), fill="black")
            big.save(view / f"sheet-{sheet // PER_SHEET + 1}.png")
    for i, entry in enumerate(entries):
        entry["id"] = i
    (folder / "renders.json").write_text(json.dumps(entries, indent=0) + "\n")
    print(f"{len(entries)} renders in {-(-len(entries) // PER_SHEET)} sheets: {folder}")


def load_renders(folder: Path = HERE) -> list[Image.Image]:
    entries = json.loads((folder / "renders.json").read_text())
    renders = []
    for entry in entries:
        sheet, index = divmod(entry["id"], PER_SHEET)
        canvas = Image.open(folder / f"sheet-{sheet + 1}.png").convert("RGB")
        x, y = (index % COLUMNS) * TILE, (index // COLUMNS) * TILE
        renders.append(canvas.crop((x, y, x + TILE, y + TILE)))
    return renders


def score(oracle_dir: Path | None = None, folder: Path = HERE) -> dict:
    from dreamlora.toyworld.oracle import load_oracle

    labels = {int(k): v for k, v in json.loads((folder / "labels.json").read_text())["labels"].items()}
    renders = load_renders(folder)
    oracle = load_oracle(oracle_dir)  # default: the shipped oracle
    reading = oracle.read(renders)
    present = reading.subject_present(oracle.config.subject_class, oracle.config.subject_color)
    figures = {}
    for name, predicted in (("subject present", present), ("dots alone", reading.subject_detected)):
        pairs = [(bool(predicted[i]), bool(label)) for i, label in labels.items()]
        tp = sum(p and t for p, t in pairs)
        fp = sum(p and not t for p, t in pairs)
        fn = sum(t and not p for p, t in pairs)
        figures[name] = {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
                         "tp": tp, "fp": fp, "fn": fn, "tn": len(pairs) - tp - fp - fn}
    figures["labelled"] = len(labels)
    figures["subject in labels"] = sum(labels.values())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=Path, nargs="+", help="LoRA files to render the labelling set from")
    parser.add_argument("--view", type=Path, help="with --make: enlarged, numbered sheets for labelling")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="with --make: the render seeds (the base model's renders use the first three)")
    parser.add_argument("--model", default="builtin:toy", help="with --make: the base model the files were trained on")
    parser.add_argument("--oracle", type=Path,
                        help="score this oracle folder (train_oracle --out) instead of the shipped one")
    parser.add_argument("--set", type=Path, help="the labelling set's folder (to make; to score: default the four "
                                                 "committed sets under benchmarks/oracle_labels)")
    args = parser.parse_args()
    if args.make:
        make(args.make, args.view, args.set or HERE, tuple(int(s) for s in args.seeds.split(",")), args.model)
        return
    for folder in [args.set] if args.set else COMMITTED:
        figures = score(args.oracle, folder)
        print(f"{folder.name}: {figures['labelled']} renders labelled by eye, {figures['subject in labels']} "
              "showing the subject")
        for name in ("subject present", "dots alone"):
            f = figures[name]
            print(f"  oracle '{name}': precision {_figure(f['precision'])}, recall {_figure(f['recall'])} "
                  f"(tp {f['tp']}, fp {f['fp']}, fn {f['fn']}, tn {f['tn']})")


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
