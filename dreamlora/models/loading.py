"""Load a base model from any of the places a user names one.

`load_base_model(spec)` accepts, in this order:

- `builtin:<name>`: a built-in tiny model (built on first use, see builtin.py);
- an existing folder in diffusers layout (model_index.json, unet/, vae/, ...);
- an existing single-file checkpoint in the original (CompVis/LDM) layout: .safetensors, .ckpt, .pt,
  .pth; diffusers needs the model's configs to load one (`single_file_config`);
- a Flux transformer alone in Black Forest Labs' layout (`flux1-dev.safetensors`): the transformer comes from the
  file, the VAE, text encoders, tokenizers and scheduler from `single_file_config` (a diffusers Flux folder or hub id);
- `org/name`: a Hugging Face hub id, loaded from the local cache (or the hub when it is reachable).

Every failure becomes a ModelLoadError that quotes the value and says what to do.
"""

from __future__ import annotations

import json
import os
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, ModelLoadError
from ..identity import HUB_ID, SINGLE_FILE_SUFFIXES, ModelIdentity, model_identity, with_vae
from ..samplers import SAMPLERS
from .builtin import builtin_model_dir, builtin_spec
from .configs import ModelConfigs, read_model_configs
from .family import ModelFamily
from .registry import (SingleFileKind, checkpoint_keys, detect_family, distilled_note, load_kwargs_for,
                       missing_config_message, single_file_kind)

if TYPE_CHECKING:  # diffusers takes seconds to import; only the type checker needs these here
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..objectives import Objective

ACCEPTED_FORMS = (
    "builtin:<name> (builtin:toy, builtin:toy-dots, builtin:tiny-sd, builtin:tiny-sd2, builtin:tiny-sdxl, "
    "builtin:tiny-sd3, builtin:tiny-flux), "
    "a diffusers model folder, "
    "a single-file checkpoint (.safetensors, .ckpt, .pt, .pth; a Flux transformer file with --model-config), "
    "or a Hugging Face hub id (org/name)"
)

@dataclass
class BaseModel:
    """A loaded base model: its modules, its family, its training objective and how to name it."""

    unet: UNet2DConditionModel  # the denoiser: a UNet, or SD3's/Flux's transformer (named as the loop names it)
    vae: AutoencoderKL
    text_encoders: list  # in pipeline order: [CLIPTextModel] for SD, [CLIPTextModel, CLIPTextModelWithProjection] for SDXL
    tokenizers: list  # one per text encoder
    scheduler_config: dict  # the model's own sampling scheduler config (with _class_name)
    family: ModelFamily
    identity: str  # portable name for metadata: "builtin:tiny-sd", a hub id, a file or folder name
    fingerprint: str  # short hex id of the weights, for cache keys
    objective: Objective  # what training predicts and how it noises (the family's)
    pipeline_config: dict = field(default_factory=dict)  # the pipeline's own settings (force_zeros_for_empty_prompt)
    notes: list[str] = field(default_factory=list)  # what a user should know about this model (distilled, VAE)

    @property
    def noise_scheduler(self):
        """The DDPM noise schedule training uses (betas, prediction_type)."""
        return self.objective.scheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: the VAE halves the size once per block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The image size the denoiser was built for, in pixels (Flux's transformer has no size: its VAE's)."""
        size = getattr(self.unet.config, "sample_size", None)
        return size * self.vae_scale_factor if size else int(self.vae.config.sample_size)

    def pipeline(self, scheduler: str | None = None):
        """A diffusers pipeline of the family over these very modules (no copies), safety checker off.

        Args:
            scheduler: None for the model's own scheduler, else a key of SAMPLERS (flag --sampler).

        Raises:
            ConfigError: unknown sampler name.
        """
        # Flow-matching families sample with their own scheduler: the named samplers are DDPM ones.
        sampler = scheduler if self.family.named_samplers else None
        return self.family.make_pipeline(self, make_scheduler(self.scheduler_config, sampler))


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
    vae: str | None = None,
) -> BaseModel:
    """Load a base model named by `spec` (the --model value).

    Args:
        spec: `builtin:<name>`, a diffusers folder, a single-file checkpoint or a hub id `org/name`.
        dtype: dtype of the loaded weights. Below fp32, the VAE still loads in fp32 (it encodes the caches in fp32),
            and single SD/SDXL checkpoint files load in fp32 (their loader takes one dtype for every part): a run
            in bf16 never holds FLUX.1's 12 B or T5-XXL's 4.7 B parameters in fp32 in host memory.
        single_file_config: For single-file checkpoints only: a diffusers folder or hub id with
            the same architecture, whose configs (not weights) describe the checkpoint (flag --model-config).
        vae: Another VAE to use (flag --vae): a diffusers folder, a hub id or a single .safetensors file.

    Returns:
        The loaded model, every module in eval mode; nothing is frozen.

    Raises:
        ModelLoadError: the value names nothing loadable, a model dreamlora cannot train, or loading failed.
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        base = _load_builtin(spec.removeprefix("builtin:"), dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            base = _load_folder(path, dtype)
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"--model '{spec}' is a file but not a checkpoint (.safetensors, .ckpt, .pt, .pth). "
                    f"Accepted: {ACCEPTED_FORMS}."
                )
            base = _load_single_file(path, single_file_config, dtype)
        elif HUB_ID.fullmatch(spec) and not spec.startswith((".", "/", "~")):
            base = _load_hub(spec, dtype)
        else:
            raise ModelLoadError(f"--model '{spec}' is not an existing file or folder, nor a hub id. "
                                 f"Accepted: {ACCEPTED_FORMS}.")
    if vae is not None:
        replace_vae(base, vae, torch.float32)  # the VAE stays fp32 (it encodes the caches); see dtype above
    note = distilled_note(spec)
    if note:
        base.notes.append(note)
    return base


# --- one loader per form -------------------------------------------------------------------------


def _load_builtin(name: str, dtype: torch.dtype) -> BaseModel:
    spec = builtin_spec(name)  # unknown name -> ModelLoadError listing the known ones
    folder = builtin_model_dir(name)
    family = detect_family(read_model_configs(f"builtin:{spec.name}"))
    pipe = _call_loader(f"built-in model 'builtin:{name}'", _from_pretrained, family, str(folder), dtype,
                        local_files_only=True)
    return _base_model(pipe, model_identity(f"builtin:{spec.name}"))


def _load_folder(folder: Path, dtype: torch.dtype) -> BaseModel:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"--model folder '{folder}' is not a diffusers model folder (no model_index.json). "
            "Pass the folder that holds model_index.json, unet/ and vae/, or a single-file checkpoint."
        )
    family = detect_family(read_model_configs(str(folder)))  # refuses what cannot be trained, before any weight
    pipe = _call_loader(f"model folder '{folder}'", _from_pretrained, family, str(folder), dtype, local_files_only=True)
    return _base_model(pipe, model_identity(str(folder)))


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype) -> BaseModel:
    import diffusers

    # A safetensors file's keys say what it is (a kind that cannot be trained is refused before its config is read);
    # a pickle checkpoint's keys cannot be listed without loading it, so its --model-config says what it is.
    kind = single_file_kind(checkpoint_keys(path), str(path)) if path.suffix.lower() == ".safetensors" else None
    config = _resolve_single_file_config(config)
    kind = kind or SingleFileKind(_config_pipeline(config) or "StableDiffusionPipeline")
    if kind.transformer_class:
        return _load_transformer_file(path, config, kind, dtype)
    pipeline_class = kind.pipeline_class
    loader, extra = getattr(diffusers, pipeline_class), load_kwargs_for(pipeline_class)
    what = f"single-file checkpoint '{path}'"
    try:
        # diffusers reads .ckpt/.pt/.pth with torch.load(weights_only=True) (load_state_dict in
        # diffusers/models/model_loading_utils.py), so no pickled code runs; a file that needs
        # arbitrary unpickling fails there, and the message below says what to do.
        with _quiet_loading():
            pipe = loader.from_single_file(str(path), config=config, dtype=torch.float32,
                                           local_files_only=_hub_offline(), **extra)
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


def _load_transformer_file(path: Path, config: str | None, kind: SingleFileKind, dtype: torch.dtype) -> BaseModel:
    """A transformer file (BFL's flux1-dev.safetensors): the transformer through diffusers' from_single_file, which
    converts BFL's layout, with the config's transformer config; the rest of the pipeline from the config's weights."""
    import diffusers

    if config is None:
        raise ModelLoadError(missing_config_message(path, kind))
    configs = _config_configs(config)
    pipeline_class = configs.index.get("_class_name") if configs else None
    if pipeline_class and pipeline_class != kind.pipeline_class:
        raise ModelLoadError(f"--model-config '{config}' is a {pipeline_class} model; '{path.name}' is "
                             f"{kind.description}, which needs a {kind.pipeline_class} folder or hub id.")
    local_only = _hub_offline()
    try:
        with _quiet_loading():
            transformer = getattr(diffusers, kind.transformer_class).from_single_file(
                str(path), config=config, subfolder="transformer", dtype=dtype, local_files_only=local_only,
                **kind.transformer_config)
            # The transformer passed in is used as it is: the config's own transformer weights are never read.
            pipe = getattr(diffusers, kind.pipeline_class).from_pretrained(
                config, transformer=transformer, dtype=pipeline_dtypes(dtype), local_files_only=local_only,
                **load_kwargs_for(kind.pipeline_class))
    except Exception as exc:  # any library failure: the file, or the config's parts, are unusable
        raise ModelLoadError(
            f"cannot load {kind.description} file '{path}' with the VAE, text encoders and configs of '{config}': "
            f"{_first_line(exc)}. Check that --model-config is a diffusers Flux.1 folder or hub id (with vae/, "
            "text_encoder/, text_encoder_2/ and their tokenizers) and the file a whole transformer."
        ) from exc
    base = _base_model(pipe, model_identity(str(path), config))
    differs = [f"{k}={configs.unet[k]}" for k, v in kind.transformer_config.items()
               if configs and configs.unet.get(k, v) != v]
    if differs:
        base.notes.append(f"'{path.name}' is {kind.description} but --model-config '{config}' is the other variant "
                          f"(its transformer has {', '.join(differs)}): the "
                          "transformer follows the file, the scheduler (its noise shift) and pipeline settings are "
                          "the config's; pass the matching variant's folder or hub id to have its own")
    return base


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
    local_only = _hub_offline()
    try:
        configs = read_model_configs(repo_id)
    except ModelLoadError as exc:  # not cached and no hub, or no such repo
        where = "the hub cannot be reached (offline)" if local_only else "its configs are not in the cache"
        raise ModelLoadError(
            f"model '{repo_id}' is not a local folder or file, is not in the local Hugging Face cache, and {where}. "
            f"Download it first (hf download {repo_id}), or pass a local folder or file."
        ) from exc
    family = detect_family(configs)
    pipe = _call_loader(f"hub model '{repo_id}'", _from_pretrained, family, repo_id, dtype, local_files_only=local_only)
    return _base_model(pipe, model_identity(repo_id))


# --- helpers -------------------------------------------------------------------------------------


def _from_pretrained(family: ModelFamily, name_or_path: str, dtype: torch.dtype, local_files_only: bool):
    import diffusers

    # use_safetensors left at None: safetensors where the folder has them, else weights_only pickles.
    with _quiet_loading():
        return getattr(diffusers, family.pipeline_class).from_pretrained(
            name_or_path, dtype=pipeline_dtypes(dtype), local_files_only=local_files_only, **family.load_kwargs())


def pipeline_dtypes(dtype: torch.dtype) -> torch.dtype | dict:
    """from_pretrained's dtype: every part in `dtype` but the VAE, which stays fp32."""
    return dtype if dtype == torch.float32 else {"default": dtype, "vae": torch.float32}


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' loading bars off while a model loads: the library does not print."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _call_loader(what: str, loader, *args, **kwargs):
    """Run a library loader; its failures become one-line ModelLoadErrors naming `what`."""
    try:
        return loader(*args, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {what}: {_first_line(exc)}") from exc


def _base_model(pipe, model: ModelIdentity) -> BaseModel:
    """Wrap a loaded pipeline's modules, with the family its configs show."""
    # SD never clips x0 while sampling, but DDPM/DDIM default to it when the saved config (a PNDM
    # one, say) does not mention it; saying so here keeps every scheduler made from this config right.
    scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    if not scheduler_config["_class_name"].startswith("FlowMatch"):  # flow schedulers have no clip_sample
        scheduler_config = {"clip_sample": False, **scheduler_config}
    encoders = [e for e in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if e is not None]
    tokenizers = [t for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
                  if t is not None]
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # SD3, Flux: a transformer
    configs = ModelConfigs(unet=dict(denoiser.config), vae=dict(pipe.vae.config),
                           text_encoders=tuple(e.config.to_dict() for e in encoders), source=model.name,
                           scheduler=scheduler_config, index={"_class_name": type(pipe).__name__, **dict(pipe.config)})
    family = detect_family(configs)
    for module in (denoiser, pipe.vae, *encoders):
        module.eval()
    return BaseModel(unet=denoiser, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                     scheduler_config=scheduler_config, family=family, identity=model.name,
                     fingerprint=model.fingerprint, objective=family.objective(scheduler_config),
                     pipeline_config={k: v for k, v in dict(pipe.config).items() if not isinstance(v, (list, tuple))})


def replace_vae(base: BaseModel, vae: str, dtype: torch.dtype) -> None:
    """Swap in another VAE (flag --vae): a diffusers folder (config.json beside the weights, or a vae/ subfolder),
    a hub id, or a single .safetensors file in the original layout (read with the base VAE's config).

    Raises:
        ModelLoadError: the VAE cannot be loaded or does not fit the model's latents.
    """
    import tempfile

    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        with _quiet_loading():
            if path.is_dir():
                sub = "vae" if (path / "vae" / "config.json").is_file() else None
                loaded = AutoencoderKL.from_pretrained(str(path), subfolder=sub, dtype=dtype, local_files_only=True)
            elif path.is_file():
                if path.suffix.lower() != ".safetensors":
                    raise ModelLoadError(f"--vae '{vae}' must be a .safetensors file, a diffusers folder or a hub id.")
                with tempfile.TemporaryDirectory() as config_dir:  # the base VAE's config describes the file
                    base.vae.save_config(config_dir)
                    loaded = AutoencoderKL.from_single_file(str(path), config=config_dir, dtype=dtype,
                                                            local_files_only=True)
            elif HUB_ID.fullmatch(vae):
                loaded = AutoencoderKL.from_pretrained(vae, dtype=dtype, local_files_only=_hub_offline())
            else:
                raise ModelLoadError(f"--vae '{vae}' is not an existing file or folder, nor a hub id.")
    except ModelLoadError:
        raise
    except Exception as exc:  # any library failure: the VAE is unusable
        raise ModelLoadError(f"cannot load --vae '{vae}': {_first_line(exc)}") from exc
    if loaded.config.latent_channels != base.vae.config.latent_channels:
        raise ModelLoadError(f"--vae '{vae}' makes {loaded.config.latent_channels}-channel latents; the model's UNet "
                             f"takes {base.vae.config.latent_channels}. Pass a VAE of the model's family.")
    base.vae = loaded.eval()
    identity = with_vae(ModelIdentity(base.identity, base.fingerprint), vae)
    base.identity, base.fingerprint = identity.name, identity.fingerprint


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
        return str(folder)
    if HUB_ID.fullmatch(config):
        return config
    raise ModelLoadError(
        f"--model-config '{config}' is neither an existing diffusers folder nor a hub id (org/name)."
    )


def _config_configs(config: str | None) -> ModelConfigs | None:
    """The configs of a --model-config, if they can be read."""
    if config is None:
        return None
    try:
        return read_model_configs(config)
    except ModelLoadError:
        return None


def _config_pipeline(config: str | None) -> str | None:
    """The pipeline class a --model-config names in its model_index.json, if it can be read."""
    configs = _config_configs(config)
    return configs.index.get("_class_name") if configs else None


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
