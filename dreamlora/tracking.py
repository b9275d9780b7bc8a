"""Experiment tracking through accelerate's trackers (--report-to tensorboard|wandb|none).

A run logs its loss parts and learning rate at every --log-every step, each validation grid as an image, and
the resolved config as hyper-parameters. TensorBoard writes event files under <run folder>/logs and works
offline; Weights & Biases follows its own login and WANDB_MODE settings.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import ConfigError

# The package each tracker needs (accelerate's TensorBoard tracker writes through torch.utils.tensorboard, which
# needs the tensorboard package).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
PROJECT = "dreamlora"


def tracker_names(report_to: str) -> list[str]:
    """accelerate's `log_with` for a --report-to value ([] for none).

    Raises:
        ConfigError: the tracker's package is not installed (one line naming it).
    """
    if report_to == "none":
        return []
    package = PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to} needs the '{package}' package: pip install {package}")
    return [report_to]


def hyperparameters(config_json: str) -> dict[str, bool | int | float | str]:
    """The resolved config as flat `section.key` values that every tracker stores (lists joined, None empty)."""
    flat = {}
    for section, values in json.loads(config_json).items():
        for key, value in values.items():
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            flat[f"{section}.{key}"] = "" if value is None else value
    return flat


def start_tracking(accelerator, config_json: str) -> None:
    """Open the run's trackers (every process calls it; accelerate writes from the main one)."""
    if accelerator.log_with:
        accelerator.init_trackers(PROJECT, config=hyperparameters(config_json))


def log_grid(accelerator, path: Path, step: int) -> None:
    """Send a validation grid (a PNG the main process wrote) to every tracker of the run."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": pixels[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"validation": [pixels]}, step=step)
