"""What a LoRA file holds, as a plain dict (the `inspect` command prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .interop.thumbnail import describe_thumbnail
from .lora import read_lora_file

TAGS_SHOWN = 10  # the most frequent training-caption tags listed as trigger words


def describe_lora(path: str | Path) -> dict[str, Any]:
    """Format, rank, alpha, module counts, dtype, size, base model version, trigger phrase and training config.

    Raises:
        ModelLoadError: the file is missing, not safetensors, or holds no LoRA weights.
    """
    lora = read_lora_file(path)  # checks the structure and the stored config's shape
    meta, config = lora.metadata, lora.config
    return {
        "file": Path(path).name,
        "format": lora.format,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "unet_modules": lora.unet_modules,
        "text_encoder_modules": lora.text_modules,
        "dtype": str(lora.dtype).removeprefix("torch."),
        "size_bytes": lora.file_size,
        "size": f"{lora.file_size / 1e6:.2f} MB",
        "base_model_version": meta.get("ss_base_model_version") or _kohya_entry(meta, "ss_base_model_version"),
        "architecture": meta.get("modelspec.architecture"),
        "prediction_type": meta.get("modelspec.prediction_type"),
        "resolution": meta.get("modelspec.resolution"),
        "trigger_phrase": meta.get("modelspec.trigger_phrase"),
        "trigger_words": trigger_words(meta),
        "dora": any(k.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".dora_scale"))
                    for k in lora.tensors),
        "sshs_model_hash": meta.get("sshs_model_hash"),
        "sshs_legacy_hash": meta.get("sshs_legacy_hash"),
        "thumbnail": describe_thumbnail(meta.get("modelspec.thumbnail")),
        "base_model": (config or {}).get("model", {}).get("name"),
        "config": config,
    }


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """The words a user types to call the subject: the trigger phrase's comma-separated parts, then the most
    frequent caption tags kohya's sd-scripts records (`ss_tag_frequency`: {dataset folder: {tag: count}})."""
    import json

    words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or _kohya_entry(metadata, "ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        frequency = {}
    counts: dict[str, int] = {}
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        for tag, count in (tags.items() if isinstance(tags, dict) else ()):
            if isinstance(count, (int, float)):
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    top = sorted(counts, key=lambda t: -counts[t])[:TAGS_SHOWN]
    return words + [t for t in top if t and t not in words]


def _kohya_entry(metadata: dict[str, str], key: str) -> str | None:
    """A kohya entry a diffusers-format file keeps under dreamlora.kohya_metadata (see interop.formats)."""
    import json

    try:
        stash = json.loads(metadata.get("dreamlora.kohya_metadata", "{}"))
    except json.JSONDecodeError:
        return None
    value = stash.get(key) if isinstance(stash, dict) else None
    return value if isinstance(value, str) else None
