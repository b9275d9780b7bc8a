"""What `dreamlora train --dry-run --memory-budget N` picks for SD 1.5 and SDXL on a CUDA card, without a GPU.

The plan reads configs only, so a folder holding the published architectures' configs and no weights is
enough: this script writes such folders (benchmarks/models.py's "sd15" and "sdxl") and prints, for each
budget, the settings the plan chose and its estimate. The README's "SDXL on 8, 12 and 24 GB" table is this
output.

    python benchmarks/plan_examples.py --readme        # the README's SDXL table
    python benchmarks/plan_examples.py --models sd15,sdxl --budgets 8,12,16,24 --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, SD_SCHEDULER, bench_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config_folder(name: str) -> Path:
    """A diffusers folder of `name` with every config and no weight (enough for the memory plan)."""
    spec = MODELS[name]
    sdxl = bool(spec.get("text_2"))
    folder = bench_dir() / "configs-only" / name
    parts = {"unet": dict(spec["unet"]), "vae": dict(spec["vae"]),
             "text_encoder": {"max_position_embeddings": 77, "architectures": ["CLIPTextModel"], **spec["text"]}}
    if sdxl:
        parts["text_encoder_2"] = {"max_position_embeddings": 77, **spec["text_2"]}
    for part, config in parts.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "EulerDiscreteScheduler" if sdxl else "PNDMScheduler", **SD_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def rows(names: list[str], budgets: list[float], rank: int) -> list[str]:
    """One markdown row a (model, encoders, budget): the settings the plan picked and what it needs."""
    from dreamlora import load_config
    from dreamlora.errors import ConfigError
    from dreamlora.memory import plan

    out = ["| model | text encoders | budget | settings the plan picks | needs (peak + slack + CUDA context) |",
           "|---|---|---|---|---|"]
    for name in names:
        folder = config_folder(name)
        for text in (False, True):
            for budget in budgets:
                config = load_config(None, {
                    "model.name": str(folder), "data.instance_dir": str(ROOT / "sample_instances" / "polkaball"),
                    "data.class_word": "dog", "output.path": "/tmp/plan.safetensors", "lora.rank": rank,
                    "lora.train_text_encoder": text, "train.memory_budget": budget, "prior.num_class_images": 100})
                head = f"| {name} | {'trained' if text else 'frozen'} | {budget:g} GiB |"
                try:
                    p = plan(config, device_type="cuda")
                except ConfigError as exc:
                    needs = str(exc).split("the run needs ")[-1].split(" ")[0]
                    out.append(f"{head} does not fit even with the leanest settings | {needs} GiB |")
                    continue
                t = p.config.train
                chosen = ", ".join(x for x in (
                    t.mixed_precision if t.mixed_precision != "no" else "fp32",
                    "gradient checkpointing" if t.gradient_checkpointing else "",
                    "8-bit AdamW" if t.optimizer == "adamw8bit" else "",
                    f"batch {t.batch_size} x accumulation {t.gradient_accumulation_steps}"
                    if t.gradient_accumulation_steps > 1 else "",
                    "text encoders frozen to fit" if text and not p.config.lora.train_text_encoder else "") if x)
                out.append(f"{head} {chosen} | {p.memory.needs():.2f} GiB ({p.memory.peak_phase} "
                           f"{p.memory.peak / 2**30:.2f} GiB) |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="8,12,24", help="GiB, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--models", default="sdxl")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    args = parser.parse_args()
    table = "\n".join(rows(args.models.split(","), [float(b) for b in args.budgets.split(",")], args.rank))
    print(table)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text(encoding="utf-8")
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        readme.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")


START, END = "<!-- plan: start -->", "<!-- plan: end -->"


if __name__ == "__main__":
    main()
