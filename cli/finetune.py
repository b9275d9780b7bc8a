"""`dreamlora finetune`: `train`'s loop, file and checkpoints on captioned images (a style or a domain)."""

from __future__ import annotations

from dreamlora.config import DreamLoraConfig

from .options import with_settings
from .train import ConfigOpt, DryRunOpt, run

# A fine-tune names what each image shows in its caption: no token, and no generated class images.
DREAMBOOTH_ONLY = ("data.token", "data.instance_prompt", "prior.num_class_images", "prior.sampler", "prior.steps",
                   "prior.guidance", "prior.negative_prompt", "prior.batch_size", "prior.seed")
DATA_HELP = ("Captioned images: a folder of images with same-named .txt captions, a folder with metadata.jsonl or "
             "metadata.csv (file_name, text), a datasets save_to_disk folder, parquet file(s) or a hub id.")


@with_settings(DreamLoraConfig, skip=DREAMBOOTH_ONLY, argument=("DATA", DATA_HELP))
def command(settings: dict, config: ConfigOpt = None, dry_run: DryRunOpt = False) -> None:
    """Fine-tune a LoRA on the captioned images in DATA (a style or a domain) and write one .safetensors file.

    The loop, checkpoints, --resume, validation grids and memory plan are train's; prior preservation only
    with --class-dir (regularisation images).
    """
    run(settings, config, dry_run, "finetune")
