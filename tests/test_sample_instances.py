"""The shipped sample subject: well-formed, distinct, and exactly what the script draws."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "sample_instances" / "polkaball"


def load_script() -> ModuleType:
    # scripts/ is not a package, so import the file by path.
    path = ROOT / "scripts" / "make_sample_instances.py"
    spec = importlib.util.spec_from_file_location("make_sample_instances", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped() -> list[Image.Image]:
    return [Image.open(p) for p in sorted(FOLDER.glob("*.png"))]


def test_folder_holds_a_few_distinct_128px_rgb_pngs():
    images = shipped()
    assert 4 <= len(images) <= 6
    for image in images:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (128, 128)
    pixels = [image.tobytes() for image in images]
    assert len(set(pixels)) == len(pixels)


def test_script_reproduces_shipped_images_exactly():
    module = load_script()
    drawn = module.draw_instances(module.DEFAULT_SEED)
    images = shipped()
    assert len(drawn) == len(images)
    for got, want in zip(drawn, images):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.convert("RGB")))


def test_config_points_at_the_images():
    config = tomllib.loads((FOLDER / "dreamlora.toml").read_text())
    assert config["data"]["token"] == "sks" and config["data"]["class_word"] == "ball"
    assert config["model"]["name"] == "builtin:toy-dots"
    instance_dir = (FOLDER / config["data"]["instance_dir"]).resolve()
    assert instance_dir == FOLDER.resolve() and len(list(instance_dir.glob("*.png"))) >= 4


def test_config_loads_with_the_toy_models_recommended_settings():
    from dreamlora import load_config

    config = load_config(FOLDER / "dreamlora.toml", {"output.path": "s.safetensors"})
    assert Path(config.data.instance_dir) == FOLDER.resolve()
    assert (config.train.steps, config.lora.rank, config.lora.train_text_encoder) == (1000, 32, True)
