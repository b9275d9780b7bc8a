"""What a run is made of, as content fingerprints: the base model's weights and the image sets.

One module answers "is this the same model / the same photos?" for everyone who asks: loading (the
BaseModel's fingerprint), the class-image cache key, the memory plan (how many class images are cached)
and resume (a checkpoint is only continued on the same weights and images).

A model file is hashed whole (a safetensors file is its header and its tensor data; a pickle checkpoint
its bytes), so two fine-tunes that differ anywhere differ here. Hashing a multi-GB checkpoint takes
seconds, so the digest is remembered in `cache_dir()/fingerprints.json` under the file's path, size,
modification time and inode: a second run pays one `stat`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .paths import cache_dir

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = SINGLE_FILE_SUFFIXES + (".bin", ".gguf")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DIGEST_CACHE = "fingerprints.json"
_CHUNK = 1 << 24  # 16 MiB reads: hashing runs at disk or SHA-256 speed, not at Python's


@dataclass(frozen=True)
class ModelIdentity:
    """A base model as people name it and as its weights are."""

    name: str  # portable, for metadata and messages: "builtin:toy", a hub id, a file or folder name
    fingerprint: str  # 16 hex digits of the weights and configs (not of where they are)


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Files


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered by (path, size, mtime, inode) so an unchanged file is hashed once.

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache = _read_digest_cache()
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if stat.st_size >= 1 << 20:  # small files are cheaper to hash again than to remember
        _remember_digest(key, digest, str(path))
    return digest


def _digest_cache_path() -> Path:
    return cache_dir() / DIGEST_CACHE


def _read_digest_cache() -> dict[str, str]:
    try:
        data = json.loads(_digest_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache


def _remember_digest(key: str, digest: str, path: str) -> None:
    from .atomic import write_text_atomic

    cache = {k: v for k, v in _read_digest_cache().items() if not k.startswith(path + "|")}  # the file's old entries
    cache[key] = digest
    try:
        write_text_atomic(_digest_cache_path(), json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only cache folder costs a re-hash next time, nothing else


def files_fingerprint(files: list[tuple[str, Path]], extra: str = "") -> str:
    """Fingerprint of named files: each name and whole-content digest (names make it independent of location).

    Args:
        files: (name to record, path) pairs.
        extra: other text that identifies the model (e.g. a config hub id).
    """
    h = hashlib.sha256(extra.encode())
    for name, path in sorted(files, key=lambda item: item[0]):
        h.update(f"\0{name}\0{file_digest(path)}\0".encode())
    return h.hexdigest()[:16]


def folder_fingerprint(folder: str | Path) -> str:
    """Fingerprint of a diffusers folder: its weight files and its JSON configs."""
    folder = Path(folder)
    files = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")
             if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json")]
    return files_fingerprint(files)


def config_files(config: str | None) -> list[tuple[str, Path]]:
    """The JSON configs of a local --model-config folder (they shape how a single-file checkpoint loads)."""
    if config is None or not Path(config).is_dir():
        return []
    return [(f"config/{p.relative_to(config).as_posix()}", p) for p in Path(config).rglob("*.json")]


def config_weights_fingerprint(config: str) -> str:
    """The weights a --model-config supplies beside a transformer file (its VAE and text encoders): a folder's weight
    files but its transformer's own (never read), or a hub id's cached snapshot."""
    folder = Path(config).expanduser()
    if not folder.is_dir():
        return hub_fingerprint(config)
    return files_fingerprint([(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*")
                              if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                              and p.relative_to(folder).parts[0] != "transformer"])


def hub_fingerprint(repo_id: str, marker: str = "model_index.json") -> str:
    """Repo id + the snapshot commit the local cache resolved (found through `marker`), which pins the weights."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, marker)
    commit = Path(cached).parent.name if isinstance(cached, str) else "unknown"
    return short_hash(f"hub:{repo_id}@{commit}".encode())


# ----------------------------------------------------------------------------------------------
# Models


def model_identity(name: str, single_file_config: str | None = None, vae: str | None = None) -> ModelIdentity:
    """The identity of the model a --model value names (with another --vae), from its files alone.

    Raises:
        ModelLoadError: a built-in name that does not exist.
    """
    identity = _model_identity(name, single_file_config)
    return with_vae(identity, vae) if vae else identity


def with_vae(model: ModelIdentity, vae: str) -> ModelIdentity:
    """A model whose VAE was replaced (flag --vae): other latents, so another identity."""
    path = Path(vae).expanduser()
    if path.is_dir():
        vae_id = ModelIdentity(path.resolve().name, folder_fingerprint(path))
    elif path.is_file():
        vae_id = ModelIdentity(path.name, files_fingerprint([("", path)]))
    else:  # a hub id
        vae_id = ModelIdentity(vae, hub_fingerprint(vae, "config.json"))
    return ModelIdentity(f"{model.name} + VAE {vae_id.name}",
                         short_hash(f"{model.fingerprint}|vae:{vae_id.fingerprint}".encode()))


def _model_identity(name: str, single_file_config: str | None) -> ModelIdentity:
    from .models.builtin import BUILDER_VERSION, SHIPPED_DIR, builtin_spec
    from .models.registry import transformer_file

    name = str(name)
    if name.startswith("builtin:"):
        spec = builtin_spec(name.removeprefix("builtin:"))
        if spec.shipped:  # trained weights, not rebuilt from a seed: their files are what identifies them
            return ModelIdentity(name, folder_fingerprint(SHIPPED_DIR / spec.name))
        return ModelIdentity(name, short_hash(f"{name}:{BUILDER_VERSION}".encode()))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelIdentity(path.resolve().name, folder_fingerprint(path))
    if path.is_file():
        extra = single_file_config or ""
        if single_file_config and transformer_file(path):  # the config's VAE and text encoders are the model too
            extra += f"|weights:{config_weights_fingerprint(single_file_config)}"
        return ModelIdentity(path.name, files_fingerprint([("", path)] + config_files(single_file_config), extra))
    if HUB_ID.fullmatch(name):
        return ModelIdentity(name, hub_fingerprint(name))
    raise ModelLoadError(f"--model '{name}' is not an existing file or folder, nor a hub id.")


# ----------------------------------------------------------------------------------------------
# Image sets


def images_fingerprint(paths: list[Path], prompts: list[str] | None = None) -> str:
    """Fingerprint of an image set: each image's bytes and the prompt it is trained with, in order.

    File names are left out, so a renamed or moved folder is the same set; a changed pixel or caption is not.
    """
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        h.update(file_digest(path).encode())
        if prompts is not None:
            h.update(b"\0" + prompts[i].encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]

