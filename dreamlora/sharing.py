"""Sharing a LoRA file on the Hugging Face hub with a model card (`dreamlora push`, `--push-to-hub`).

The card is written beside the file first (`<stem>.README.md`, and the last validation grid as
`<stem>.grid.png`), so it exists whether or not the upload works. It is built from what the file says about
itself (its header: base model, trigger phrase, the resolved config), in the form the hub and the UIs read:
YAML front matter with `base_model`, `tags`, `instance_prompt` and a `widget` showing the grid.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import ModelLoadError, PushError

# Settings shown on the card: what someone reproducing or judging the LoRA asks first.
CARD_SETTINGS = ("data.job", "data.resolution", "data.buckets", "data.caption_dropout", "data.shuffle_tags",
                 "lora.rank", "lora.alpha", "lora.train_text_encoder", "lora.dora", "train.steps", "train.batch_size",
                 "train.gradient_accumulation_steps", "train.learning_rate", "train.lr_scheduler",
                 "train.max_grad_norm", "train.mixed_precision", "train.seed", "prior.enabled", "output.format")
ARCHITECTURE_TAGS = {"stable-diffusion-xl": "stable-diffusion-xl", "stable-diffusion-v2": "stable-diffusion",
                     "stable-diffusion-v1": "stable-diffusion"}


@dataclass
class ModelCard:
    text: str  # the README.md of the hub repo
    path: Path  # where it was written, beside the LoRA file
    grid: Path | None  # the validation grid written beside it (shown on the card), if any


def write_model_card(lora_file: str | Path, grid: str | Path | None = None) -> ModelCard:
    """Write the model card of `lora_file` (and its last validation grid) beside it.

    Args:
        lora_file: a .safetensors LoRA written by dreamlora (or any file with modelspec metadata).
        grid: the validation grid to show; default: the latest in the file's run folder (<stem>-run/validation),
            else the thumbnail stored in the file.

    Raises:
        ModelLoadError: the file cannot be read as safetensors.
    """
    lora_file = Path(lora_file)
    metadata = read_metadata(lora_file)
    card_grid = lora_file.with_name(f"{lora_file.stem}.grid.png")
    source = Path(grid) if grid else latest_grid(lora_file)
    if source is not None and source.is_file():
        write_bytes_atomic(card_grid, source.read_bytes())
    elif not _write_thumbnail(metadata.get("modelspec.thumbnail"), card_grid):
        card_grid = None
    text = model_card_text(metadata, lora_file.name, card_grid.name if card_grid else None)
    path = lora_file.with_name(f"{lora_file.stem}.README.md")
    write_text_atomic(path, text)
    return ModelCard(text, path, card_grid)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except Exception as exc:  # noqa: BLE001  (missing, truncated or not safetensors)
        raise ModelLoadError(f"'{path}' cannot be read as a safetensors file ({exc}). Check the path.") from exc


def latest_grid(lora_file: Path) -> Path | None:
    grids = sorted((lora_file.parent / f"{lora_file.stem}-run" / "validation").glob("step-*.png"))
    return grids[-1] if grids else None


def _write_thumbnail(data_url: str | None, target: Path) -> bool:
    """The file's modelspec.thumbnail (a data URL of the final grid) as an image file; False when there is none."""
    if not data_url or not data_url.startswith("data:image/") or ";base64," not in data_url:
        return False
    import io

    from PIL import Image

    raw = base64.b64decode(data_url.split(";base64,", 1)[1])
    buffer = io.BytesIO()
    Image.open(io.BytesIO(raw)).save(buffer, format="PNG")
    write_bytes_atomic(target, buffer.getvalue())
    return True


def model_card_text(metadata: dict[str, str], file_name: str, grid_name: str | None) -> str:
    """The card (markdown with the hub's YAML front matter) from a LoRA file's header. Pure."""
    config = _config(metadata)
    base = config.get("model", {}).get("name") or metadata.get("modelspec.architecture", "unknown")
    trigger = metadata.get("modelspec.trigger_phrase", "").strip()
    job = config.get("data", {}).get("job", "dreambooth")
    architecture = metadata.get("modelspec.architecture", "")
    tags = ["text-to-image", "lora", "diffusers", "template:sd-lora", "dreamlora", job]
    tags += sorted({tag for prefix, tag in ARCHITECTURE_TAGS.items() if architecture.startswith(prefix)})
    data = config.get("data", {})
    prompts = [p.replace("{token}", data.get("token", "")).replace("{class}", data.get("class_word", "")).strip()
               for p in (config.get("validation", {}).get("prompts") or [])] if job == "dreambooth" else []
    prompts = prompts or [trigger or "a picture"]  # a fine-tune's grids show its captions, which the file lacks
    front = ["---", f"base_model: {_yaml(base)}", "library_name: diffusers", "tags:"]
    front += [f"- {_yaml(tag)}" for tag in tags]
    if trigger:
        front.append(f"instance_prompt: {_yaml(trigger)}")
    if grid_name:
        front += ["widget:", f"- text: {_yaml(prompts[0])}", "  output:", f"    url: {_yaml(grid_name)}"]
    front.append("---")
    title = metadata.get("modelspec.title") or Path(file_name).stem
    what = "a subject (DreamBooth)" if job == "dreambooth" else "a style or domain from captioned images"
    body = [f"# {title}", "", f"A LoRA for `{base}` that teaches {what}, trained with dreamlora.", ""]
    body += ["## Trigger words", ""]
    body += [f"Use `{trigger}` in the prompt to call it up.", ""] if trigger else \
        ["None: the LoRA applies to any prompt.", ""]
    body += ["## Settings", "", "| setting | value |", "|---|---|"]
    for key in CARD_SETTINGS:
        section, _, name = key.partition(".")
        if name in config.get(section, {}):
            body.append(f"| `{key}` | {_cell(config[section][name])} |")
    body.append("")
    if grid_name:
        body += ["## Last validation grid", "", "Rows: prompts at LoRA scale 0 (the base model) and 1; "
                 "columns: seeds.", "", f"![validation grid]({grid_name})", ""]
    body += ["## Use it", "", "```python", "from diffusers import AutoPipelineForText2Image", "",
             f"pipe = AutoPipelineForText2Image.from_pretrained({base!r})",
             f"pipe.load_lora_weights('<repo id>', weight_name={file_name!r})",
             f"image = pipe({(trigger + ', ' if trigger else '') + 'a picture'!r}).images[0]", "```", "",
             "ComfyUI, AUTOMATIC1111 and Forge load the file from their `loras` folder.", ""]
    return "\n".join(front + body)


def _config(metadata: dict[str, str]) -> dict:
    try:
        config = json.loads(metadata.get("dreamlora.config", "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _yaml(value: str) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML scalar: quotes and colons are safe


def _cell(value) -> str:
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return "default" if value is None else str(value).replace("|", "/")


def push_lora(lora_file: str | Path, repo_id: str, *, private: bool = False,
              grid: str | Path | None = None) -> str:
    """Write the model card beside `lora_file`, then upload the file, the card (as README.md) and the grid in one
    commit to the hub model repo `repo_id` (created if missing).

    Returns:
        The repo's URL.

    Raises:
        PushError: the upload failed (no network, no token, no permission); the local file and card stay.
        ModelLoadError: the file cannot be read.
    """
    lora_file = Path(lora_file)
    card = write_model_card(lora_file, grid)
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(lora_file.name, str(lora_file)),
                  CommitOperationAdd("README.md", card.text.encode("utf-8"))]
    if card.grid:
        operations.append(CommitOperationAdd(card.grid.name, str(card.grid)))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=f"Upload {lora_file.name} (dreamlora)")
    except Exception as exc:  # noqa: BLE001  (offline, no token, forbidden, network: the upload did not happen)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PushError(f"upload to '{repo_id}' failed ({type(exc).__name__}: {first}); '{lora_file}' and its model "
                        f"card '{card.path}' are kept. Log in with `hf auth login` (or set HF_TOKEN) and run "
                        f"`dreamlora push {lora_file} --repo-id {repo_id}`.") from exc
    return str(url)
