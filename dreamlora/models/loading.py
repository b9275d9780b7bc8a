"""Load a base model from any of the places a user names one.

`load_base_model(spec)` accepts, in this order:

- `builtin:<name>`: a built-in tiny model (built on first use, see builtin.py);
- an existing folder in diffusers layout (model_index.json, unet/, vae/, ...);
- an existing single-file checkpoint in the original (CompVis/LDM) layout: .safetensors, .ckpt, .pt,
  .pth; diffusers needs the model's configs to load one (`single_file_config`);
- `org/name`: a Hugging Face hub id, loaded from the local cache (or the hub when it is reachable).

Every failure becomes a ModelLoadError that quotes the value and says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, ModelLoadError
from ..identity import HUB_ID, SINGLE_FILE_SUFFIXES, ModelIdentity, model_identity
from .builtin import builtin_model_dir, builtin_spec
from ..samplers import SAMPLERS
from .family import StableDiffusionFamily, detect_family

if TYPE_CHECKING:  # diffusers takes seconds to import; only the type checker needs these here
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

ACCEPTED_FORMS = (
    "builtin:<name> (builtin:tiny-sd, builtin:tiny-sd2), a diffusers model folder, "
    "a single-file checkpoint (.safetensors, .ckpt, .pt, .pth), or a Hugging Face hub id (org/name)"
)

@dataclass
class BaseModel:
    """A loaded SD 1.x / 2.x base model: its modules, its schedule and how to name it."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list  # [CLIPTextModel]; a list so SDXL can add its second encoder
    tokenizers: list  # [CLIPTokenizer], in the order of text_encoders
    noise_scheduler: DDPMScheduler  # for training: add_noise, get_velocity
    scheduler_config: dict  # the model's own sampling scheduler config (with _class_name)
    family: StableDiffusionFamily
    identity: str  # portable name for metadata: "builtin:tiny-sd", a hub id, a file or folder name
    fingerprint: str  # short hex id of the weights, for cache keys

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: the VAE halves the size once per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The image size the UNet was built for, in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def pipeline(self, scheduler: str | None = None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline over these very modules (no copies), safety checker off.

        Args:
            scheduler: None for the model's own scheduler, else a key of SAMPLERS (flag --sampler).

        Returns:
            A `diffusers.StableDiffusionPipeline` with its progress bar disabled.

        Raises:
            ConfigError: unknown sampler name.
        """
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=self.unet,
            scheduler=make_scheduler(self.scheduler_config, scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def make_scheduler(scheduler_config: dict, sampler: str | None = None):
    """A fresh sampling scheduler (schedulers keep per-run state) from the model's config.

    Raises:
        ConfigError: `sampler` is not a key of SAMPLERS.
    """
    import diffusers

    if sampler is None:
        return getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r} (flag --sampler). Choose one of: {', '.join(SAMPLERS)}.")
    class_name, settings = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(scheduler_config, **settings)


def load_base_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
) -> BaseModel:
    """Load a base model named by `spec` (the --model value).

    Args:
        spec: `builtin:<name>`, a diffusers folder, a single-file checkpoint or a hub id `org/name`.
        dtype: dtype of the loaded weights.
        single_file_config: For single-file checkpoints only: a diffusers folder or hub id with
            the same architecture, whose configs (not weights) describe the checkpoint (flag --model-config).

    Returns:
        The loaded model, every module in eval mode; nothing is frozen.

    Raises:
        ModelLoadError: the value names nothing loadable, the model is SDXL, or loading failed.
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        return _load_builtin(spec.removeprefix("builtin:"), dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"--model '{spec}' is a file but not a checkpoint (.safetensors, .ckpt, .pt, .pth). "
                f"Accepted: {ACCEPTED_FORMS}."
            )
        return _load_single_file(path, single_file_config, dtype)
    if HUB_ID.fullmatch(spec) and not spec.startswith((".", "/", "~")):
        return _load_hub(spec, dtype)
    raise ModelLoadError(f"--model '{spec}' is not an existing file or folder, nor a hub id. Accepted: {ACCEPTED_FORMS}.")


# --- one loader per form -------------------------------------------------------------------------


def _load_builtin(name: str, dtype: torch.dtype) -> BaseModel:
    spec = builtin_spec(name)  # unknown name -> ModelLoadError listing the known ones
    folder = builtin_model_dir(name)
    pipe = _call_loader(f"built-in model 'builtin:{name}'", _from_pretrained, str(folder), dtype, local_files_only=True)
    return _base_model(pipe, model_identity(f"builtin:{spec.name}"))


def _load_folder(folder: Path, dtype: torch.dtype) -> BaseModel:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"--model folder '{folder}' is not a diffusers model folder (no model_index.json). "
            "Pass the folder that holds model_index.json, unet/ and vae/, or a single-file checkpoint."
        )
    _reject_sdxl(_read_json(index, folder), folder)
    pipe = _call_loader(f"model folder '{folder}'", _from_pretrained, str(folder), dtype, local_files_only=True)
    return _base_model(pipe, model_identity(str(folder)))


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype) -> BaseModel:
    from diffusers import StableDiffusionPipeline

    config = _resolve_single_file_config(config)
    if path.suffix.lower() == ".safetensors":
        _check_checkpoint_keys(path)
    what = f"single-file checkpoint '{path}'"
    try:
        # diffusers reads .ckpt/.pt/.pth with torch.load(weights_only=True) (load_state_dict in
        # diffusers/models/model_loading_utils.py), so no pickled code runs; a file that needs
        # arbitrary unpickling fails there, and the message below says what to do.
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            dtype=dtype,
            local_files_only=_hub_offline(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # any library failure: the file or its configs are unusable
        refusal = _weights_only_refusal(path)
        if refusal:
            raise ModelLoadError(
                f"{what} holds pickled objects besides tensors, which are never loaded (they can run code): "
                f"{refusal}. Re-save its state_dict as .safetensors with a tool you trust."
            ) from exc
        if config is None:
            raise ModelLoadError(
                f"{what} cannot be loaded without the model's diffusers configs, and they are not in the "
                f"local Hugging Face cache ({_first_line(exc)}). Pass --model-config with a diffusers folder "
                "or hub id of the same architecture (it supplies configs and tokenizer, not weights)."
            ) from exc
        raise ModelLoadError(
            f"cannot load {what} with configs from '{config}': {_first_line(exc)}. Check that --model-config "
            "has the same architecture; a .ckpt must hold plain tensors (re-save it as .safetensors if not)."
        ) from exc
    return _base_model(pipe, model_identity(str(path), config))


def _weights_only_refusal(path: Path) -> str | None:
    """Why torch.load(weights_only=True) refuses a pickle checkpoint, or None if it does not.

    diffusers hides that reason behind a generic OSError, so on failure we ask torch once more.
    """
    if path.suffix.lower() == ".safetensors":
        return None
    import pickle
    import zipfile

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        return _first_line(exc, limit=160)
    except Exception:  # unreadable for another reason; the caller's message covers it
        return None
    return None


def _load_hub(repo_id: str, dtype: torch.dtype) -> BaseModel:
    from diffusers import StableDiffusionPipeline

    local_only = _hub_offline()
    try:
        index = StableDiffusionPipeline.load_config(repo_id, local_files_only=local_only)
    except Exception as exc:  # not cached and no hub, or no such repo
        where = "the hub cannot be reached (offline)" if local_only else "it could not be fetched from the hub"
        raise ModelLoadError(
            f"model '{repo_id}' is not a local folder or file, is not in the local Hugging Face cache, and {where} "
            f"({_first_line(exc)}). Download it first (hf download {repo_id}), or pass a local folder or file."
        ) from exc
    _reject_sdxl(index, repo_id)
    pipe = _call_loader(f"hub model '{repo_id}'", _from_pretrained, repo_id, dtype, local_files_only=local_only)
    return _base_model(pipe, model_identity(repo_id))


# --- helpers -------------------------------------------------------------------------------------


def _from_pretrained(name_or_path: str, dtype: torch.dtype, local_files_only: bool):
    from diffusers import StableDiffusionPipeline

    # use_safetensors left at None: safetensors where the folder has them, else weights_only pickles.
    return StableDiffusionPipeline.from_pretrained(
        name_or_path,
        dtype=dtype,
        local_files_only=local_files_only,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _call_loader(what: str, loader, *args, **kwargs):
    """Run a library loader; its failures become one-line ModelLoadErrors naming `what`."""
    try:
        return loader(*args, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what}: {_first_line(exc)}") from exc


def _base_model(pipe, model: ModelIdentity) -> BaseModel:
    """Wrap a loaded pipeline's modules; SDXL is refused here too in case the checks before missed it."""
    from diffusers import DDPMScheduler

    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ModelLoadError(f"--model '{model.name}' is an SDXL model; SDXL is not supported yet (SD 1.x and 2.x are).")
    # SD never clips x0 while sampling, but DDPM/DDIM default to it when the saved config (a PNDM
    # one, say) does not mention it; saying so here keeps every scheduler made from this config right.
    scheduler_config = {"clip_sample": False, **pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    family = detect_family(dict(pipe.unet.config), pipe.text_encoder.config, scheduler_config, False)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)  # keeps prediction_type and betas
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    return BaseModel(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=[pipe.text_encoder],
        tokenizers=[pipe.tokenizer],
        noise_scheduler=noise_scheduler,
        scheduler_config=scheduler_config,
        family=family,
        identity=model.name,
        fingerprint=model.fingerprint,
    )


def _reject_sdxl(model_index: dict, where: str | Path) -> None:
    if (model_index.get("text_encoder_2") or [None])[0] is not None or "XL" in model_index.get("_class_name", ""):
        raise ModelLoadError(
            f"--model '{where}' is an SDXL model (it has a second text encoder); SDXL is not supported yet. "
            "Use an SD 1.x or 2.x base model."
        )


def _resolve_single_file_config(config: str | None) -> str | None:
    """Check --model-config: a diffusers folder (not SDXL) or a hub id; None stays None."""
    if config is None:
        return None
    folder = Path(config).expanduser()
    if folder.is_dir():
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"--model-config '{config}' is not a diffusers model folder (no model_index.json). "
                "Pass the folder of a diffusers model with the checkpoint's architecture."
            )
        _reject_sdxl(_read_json(index, folder), config)
        return str(folder)
    if HUB_ID.fullmatch(config):
        return config
    raise ModelLoadError(
        f"--model-config '{config}' is neither an existing diffusers folder nor a hub id (org/name)."
    )


def _check_checkpoint_keys(path: Path) -> None:
    """Refuse, from the key names alone, safetensors files that are not SD 1.x/2.x checkpoints."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise ModelLoadError(f"--model '{path}' cannot be read as safetensors: {_first_line(exc)}") from exc
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        raise ModelLoadError(f"--model '{path}' is an SDXL checkpoint; SDXL is not supported yet.")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            f"--model '{path}' has no model.diffusion_model.* weights, so it is not a full Stable Diffusion "
            "checkpoint (a LoRA or a VAE alone?). Pass a base model."
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # constants.HF_HUB_OFFLINE is read once at import; the environment may have been set since.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _read_json(path: Path, where: str | Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read '{path}' of model '{where}': {_first_line(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters, for one-line errors."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
