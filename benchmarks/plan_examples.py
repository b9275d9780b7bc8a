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
from models import MODELS, SD_SCHEDULER, bench_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# FLUX.1 [dev]'s published configs (black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/ CLIP ViT-L,
# text_encoder_2/ T5 v1.1 XXL encoder, scheduler/), the parts the plan reads.
FLUX_DEV = {
    "transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
                    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                    "axes_dims_rope": [16, 56, 56]},
    "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False},
    "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
                     "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
                     "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240,
                       "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
                       "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                       "relative_attention_max_distance": 128, "is_encoder_decoder": False},
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
         text_modes: tuple[bool, ...] = (False, True)) -> list[str]:
    """One markdown row a (model, encoders, budget): the settings the plan picked and what it needs."""
    from dreamlora import load_config
    from dreamlora.errors import ConfigError
    from dreamlora.memory import plan

    out = ["| model | px | text encoders | budget | settings the plan picks | needs (peak + slack + CUDA context) |",
           "|---|---|---|---|---|---|"]
    for name in names:
        folder = config_folder(name)
        for resolution, text, budget in itertools.product(resolutions, text_modes, budgets):
            config = load_config(None, {
                "model.name": str(folder), "data.instance_dir": str(ROOT / "sample_instances" / "polkaball"),
                "data.class_word": "dog", "output.path": "/tmp/plan.safetensors", "lora.rank": rank,
                "lora.train_text_encoder": text, "train.memory_budget": budget, "prior.num_class_images": 100,
                "data.resolution": resolution,
                "output.format": "diffusers" if name == "flux-dev" else "kohya"})
            px = resolution or (1024 if name in ("sdxl", "flux-dev") else 512)
            head = f"| {name} | {px} | {'trained' if text else 'frozen'} | {budget:g} GiB |"
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
    parser.add_argument("--flux", action="store_true",
                        help="FLUX.1 [dev] at 512 and 1024 px on 12, 16 and 24 GiB (the README's Flux table)")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    args = parser.parse_args()
    if args.flux:
        table = "\n".join(rows(["flux-dev"], [12, 16, 24], args.rank, resolutions=(512, 1024), text_modes=(False,)))
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
