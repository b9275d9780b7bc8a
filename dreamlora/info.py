"""What a LoRA file holds, as a plain dict (the `inspect` command prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .lora import read_lora_file


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
        "base_model_version": meta.get("ss_base_model_version"),
        "architecture": meta.get("modelspec.architecture"),
        "prediction_type": meta.get("modelspec.prediction_type"),
        "resolution": meta.get("modelspec.resolution"),
        "trigger_phrase": meta.get("modelspec.trigger_phrase"),
        "base_model": (config or {}).get("model", {}).get("name"),
        "config": config,
    }
