"""What `dreamlora train --dry-run --memory-budget N` picks for SD 1.5 and SDXL on a CUDA card, without a GPU.

The plan reads configs only, so a folder holding the published architectures' configs and no weights is
enough: this script writes such folders (benchmarks/models.py's "sd15" and "sdxl") and prints, for each
budget, the settings the plan chose and its estimate. The README's "SDXL on 8, 12 and 24 GB" table is this
output.

    python benchmarks/plan_examples.py --readme        # the README's SDXL table
    python benchmarks/plan_examples.py --flux --readme # the README's Flux table (FLUX.1 [dev], 512/1024 px)
    python benchmarks/plan_examples.py --models sd15,sdxl --budgets 8,12,16,24 --rank 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import (CLIP_L, FLUX_DEV_TRANSFORMER, FLUX_VAE, MODELS, SD_SCHEDULER, T5_XXL,  # noqa: E402
                    bench_dir)

ROOT = Path(__file__).resolve().parents[1]


# FLUX.1 [dev]'s published configs (black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/ CLIP ViT-L,
# text_encoder_2/ T5 v1.1 XXL encoder, scheduler/), the parts the plan reads.
FLUX_DEV = {
    "transformer": {"_class_name": "FluxTransformer2DModel", **FLUX_DEV_TRANSFORMER},
    "vae": {"_class_name": "AutoencoderKL", **FLUX_VAE},
    "text_encoder": {"architectures": ["CLIPTextModel"], "max_position_embeddings": 77, **CLIP_L},
    "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, **T5_XXL},
}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}


def flux_folder() -> Path:
    """FLUX.1 [dev]'s configs, no weights."""
    folder = bench_dir() / "configs-only" / "flux-dev"
    for part, config in FLUX_DEV.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLUX_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return folder


def config_folder(name: str) -> Path:
    """A diffusers folder of `name` with every config and no weight (enough for the memory plan)."""
    if name == "flux-dev":
        return flux_folder()
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


def rows(names: list[str], budgets: list[float], rank: int, resolutions: tuple[int | None, ...] = (None,),
         text_modes: tuple[bool, ...] = (False, True), quantizations: tuple[str, ...] = ("none",),
         start: dict | None = None) -> list[str]:
    """One markdown row a (model, resolution, frozen weights, encoders, budget): the settings the plan picked and
    what it needs. `start`: settings the runs begin from (the ladder only adds savers to them)."""
    from dreamlora import load_config
    from dreamlora.errors import ConfigError
    from dreamlora.memory import plan

    out = ["| model | px | frozen denoiser | text encoders | budget | settings the plan picks | needs (peak + slack + "
           "CUDA context) |", "|---|---|---|---|---|---|---|"]
    for name in names:
        folder = config_folder(name)
        for resolution, quantization, text, budget in itertools.product(resolutions, quantizations, text_modes,
                                                                        budgets):
            config = load_config(None, {
                "model.name": str(folder), "data.instance_dir": str(ROOT / "sample_instances" / "polkaball"),
                "data.class_word": "dog", "output.path": "/tmp/plan.safetensors", "lora.rank": rank,
                "lora.train_text_encoder": text, "train.memory_budget": budget, "prior.num_class_images": 100,
                "data.resolution": resolution, "train.base_quantization": quantization, **(start or {}),
                "output.format": "diffusers" if name == "flux-dev" else "kohya"})
            px = resolution or (1024 if name in ("sdxl", "flux-dev") else 512)
            weights = {"none": "half precision" if (start or {}).get("train.mixed_precision") else "as loaded",
                       "int8": "int8", "nf4": "NF4 (QLoRA)"}[quantization]
            head = f"| {name} | {px} | {weights} | {'trained' if text else 'frozen'} | {budget:g} GiB |"
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
                "T5 on the CPU" if t.t5_on_cpu else "",
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
    parser.add_argument("--flux", action="store_true",
                        help="FLUX.1 [dev] at 512 and 1024 px, bf16/int8/NF4, on 10, 12, 16 and 24 GiB (the README's "
                             "Flux table)")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    args = parser.parse_args()
    if args.flux:
        # From the settings (bf16, checkpointing, 8-bit AdamW), bf16 / int8 / NF4 transformer.
        table = "\n".join(rows(["flux-dev"], [10, 12, 16, 24], args.rank, resolutions=(512, 1024), text_modes=(False,),
                               quantizations=("none", "int8", "nf4"),
                               start={"train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
                                      "train.optimizer": "adamw8bit"}))
        start, end = FLUX_START, FLUX_END
    else:
        table = "\n".join(rows(args.models.split(","), [float(b) for b in args.budgets.split(",")], args.rank))
        start, end = START, END
    print(table)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text(encoding="utf-8")
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        readme.write_text(f"{head}{start}\n{table}\n{end}{tail}", encoding="utf-8")


START, END = "<!-- plan: start -->", "<!-- plan: end -->"
FLUX_START, FLUX_END = "<!-- plan-flux: start -->", "<!-- plan-flux: end -->"


if __name__ == "__main__":
    main()
