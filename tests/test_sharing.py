"""dreamlora push / --push-to-hub: the model card beside the file, and an upload that never reaches the hub here."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamlora import load_config
from dreamlora.config import to_portable_json
from dreamlora.errors import PushError
from dreamlora.interop.thumbnail import thumbnail_data_url
from dreamlora.lora import lora_metadata
from dreamlora.models.sd import StableDiffusionFamily
from dreamlora.sharing import push_lora, write_model_card


def lora_file(tmp_path, job="finetune", thumbnail=True):
    values = {"data.job": job, "data.instance_dir": str(tmp_path), "output.path": str(tmp_path / "style.safetensors"),
              "model.name": "stable-diffusion-v1-5/stable-diffusion-v1-5", "data.caption_prefix": "zzt style",
              "train.steps": 1500, "train.learning_rate": 1e-4}
    if job == "dreambooth":
        values = {**values, "data.class_word": "dog"}
    config = load_config(None, values)
    grid = tmp_path / "grid.png"
    Image.new("RGB", (96, 48), (200, 10, 10)).save(grid)
    trigger = "zzt style" if job == "finetune" else "sks dog"
    metadata = lora_metadata(family=StableDiffusionFamily("sd1", False, False), rank=4, alpha=4.0, resolution=512,
                             output_name="style", trigger_phrase=trigger, title="style",
                             config_json=to_portable_json(config), train_text_encoder=False,
                             thumbnail=thumbnail_data_url(grid) if thumbnail else None)
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(path), metadata=metadata)
    return path


def front_matter(text):
    head = text.split("---\n")[1]
    return head


def test_the_model_card_holds_the_base_model_trigger_words_settings_grid_and_tags(tmp_path):
    card = write_model_card(lora_file(tmp_path))
    assert card.path == tmp_path / "style.README.md" and card.path.read_text() == card.text
    head = front_matter(card.text)
    assert 'base_model: "stable-diffusion-v1-5/stable-diffusion-v1-5"' in head
    assert 'instance_prompt: "zzt style"' in head
    for tag in ("text-to-image", "lora", "diffusers", "template:sd-lora", "stable-diffusion", "finetune"):
        assert f'- "{tag}"' in head, tag
    assert '    url: "style.grid.png"' in head
    assert "Use `zzt style` in the prompt" in card.text
    assert "| `train.steps` | 1500 |" in card.text and "| `train.learning_rate` | 0.0001 |" in card.text
    assert "![validation grid](style.grid.png)" in card.text
    assert card.grid == tmp_path / "style.grid.png" and Image.open(card.grid).size[0] > 0  # from the thumbnail


def test_the_latest_run_grid_is_preferred_and_a_dreambooth_card_names_its_subject(tmp_path):
    path = lora_file(tmp_path, job="dreambooth", thumbnail=False)
    validation = tmp_path / "style-run" / "validation"
    validation.mkdir(parents=True)
    for step, colour in ((100, (0, 0, 255)), (200, (0, 255, 0))):
        Image.new("RGB", (8, 8), colour).save(validation / f"step-{step:06d}.png")
    card = write_model_card(path)
    assert Image.open(card.grid).getpixel((0, 0)) == (0, 255, 0)
    assert 'instance_prompt: "sks dog"' in card.text and '- "dreambooth"' in card.text
    assert '- text: "a photo of sks dog"' in card.text


def test_a_push_without_network_is_one_line_and_keeps_the_file_and_card(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach the hub from a test
    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = lora_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(PushError, match=r"upload to 'me/style' failed .* are kept\. Log in") as error:
        push_lora(path, "me/style")
    assert "\n" not in str(error.value)
    assert path.read_bytes() == before and (tmp_path / "style.README.md").is_file()


def test_cli_push_of_a_missing_file_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["push", str(tmp_path / "none.safetensors"), "--repo-id", "me/x"])
    assert result.exit_code == 1 and "none.safetensors' does not exist" in result.output
