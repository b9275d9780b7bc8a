"""A base model's JSON configs, read without its weights: enough to tell its family and to build it on the meta device.

The loader detects the family from them before it loads a weight; the memory plan builds the model from
them on the meta device. A single-file checkpoint has no configs of its own: its --model-config folder
or hub id supplies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ModelLoadError

TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # in pipeline order


@dataclass(frozen=True)
class ModelConfigs:
    """The JSON configs of a base model (diffusers layout)."""

    unet: dict  # the denoiser's config (a UNet's, or SD3's/Flux's transformer's)
    vae: dict
    text_encoders: tuple[dict, ...]  # transformers text-model configs, in pipeline order
    source: str  # where they were read, for messages
    scheduler: dict = field(default_factory=dict)  # the sampling scheduler's config (prediction_type, betas)
    index: dict = field(default_factory=dict)  # model_index.json: the pipeline class and its components

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", (128, 256, 512, 512))) - 1)

    @property
    def default_resolution(self) -> int:
        if "sample_size" not in self.unet and "sample_size" in self.vae:  # Flux's transformer has no size
            return int(self.vae["sample_size"])
        return int(self.unet.get("sample_size", 64)) * self.vae_scale_factor


def read_model_configs(name: str, single_file_config: str | None = None) -> ModelConfigs:
    """The configs of the model `name` (a --model value) from its files alone; no weights are read.

    Raises:
        ModelLoadError: the configs cannot be found (a hub model not in the cache, a single-file
            checkpoint without --model-config).
    """
    name = str(name)
    if name.startswith("builtin:"):
        return _builtin_configs(name.removeprefix("builtin:"))
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_configs(path)
    if path.is_file():
        from .registry import missing_config_message, transformer_file

        kind = transformer_file(path)
        if not single_file_config:
            if kind:
                raise ModelLoadError(missing_config_message(name, kind))
            raise ModelLoadError(f"--model '{name}' is a single-file checkpoint: its memory can only be estimated "
                                 "from a diffusers folder or hub id with its configs. Pass --model-config.")
        configs = read_model_configs(single_file_config)
        # A transformer file decides what its keys show (Flux: the guidance embedding), as loading does.
        return replace(configs, unet={**configs.unet, **kind.transformer_config}) if kind else configs
    return _hub_configs(name)


def _builtin_configs(name: str) -> ModelConfigs:
    from .builtin import SHIPPED_DIR, builtin_config_values, builtin_spec

    spec = builtin_spec(name)
    if spec.shipped:  # trained weights inside the package: its folder has the configs
        return _folder_configs(SHIPPED_DIR / name)
    values = builtin_config_values(spec)
    return ModelConfigs(values["unet"], values["vae"], tuple(values["text_encoders"]), f"builtin:{name}",
                        values["scheduler"], values["index"])


def _folder_configs(folder: Path) -> ModelConfigs:
    def read(part: str) -> dict | None:
        path = folder / part / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    unet, vae = read("unet") or read("transformer"), read("vae")  # SD3 and Flux: a transformer, not a UNet
    if unet is None or vae is None:
        raise ModelLoadError(f"--model folder '{folder}' has no unet/ (or transformer/) config.json or "
                             "vae/config.json; pass a diffusers model folder.")
    texts = tuple(c for c in (read(f) for f in TEXT_ENCODER_FOLDERS) if c is not None)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text(encoding="utf-8")) if scheduler_path.is_file() else {}
    return ModelConfigs(unet, vae, texts, str(folder), scheduler, index)


def _hub_configs(repo_id: str) -> ModelConfigs:
    from huggingface_hub import try_to_load_from_cache

    def read(part: str, file: str = "config.json") -> dict | None:
        cached = try_to_load_from_cache(repo_id, f"{part}/{file}" if part else file)
        return json.loads(Path(cached).read_text(encoding="utf-8")) if isinstance(cached, str) else None

    unet, vae = read("unet") or read("transformer"), read("vae")
    if unet is None or vae is None:
        raise ModelLoadError(f"model '{repo_id}' is not a local folder or file and its configs are not in the local "
                             f"Hugging Face cache. Download it first (hf download {repo_id}).")
    texts = tuple(c for c in (read(f) for f in TEXT_ENCODER_FOLDERS) if c is not None)
    return ModelConfigs(unet, vae, texts, repo_id, read("scheduler", "scheduler_config.json") or {},
                        read("", "model_index.json") or {})
