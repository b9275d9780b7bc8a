"""Class prior images: generated with the frozen base model, cached, and only made when missing.

Image i is drawn from its own generator seeded from (seed, i), so the set does not depend on the
batch size or on how many processes share the work. A folder's manifest records everything that
determines its images (the cache key); a folder made with other settings is never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_text_atomic
from .config import DreamLoraConfig, PriorConfig, fill_prompt
from .data import derive_seed
from .errors import DataError
from .paths import cache_dir
from .progress import ProgressCallback, ProgressEvent, ignore_progress, note

if TYPE_CHECKING:
    from .identity import ModelIdentity

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PriorSpec:
    """Everything that determines the class images (the count only says how many). Built by `prior_spec`."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    resolution: int
    model: str  # the base model's portable identity, for people
    model_fingerprint: str  # what the key really depends on
    dtype: str  # "fp32" | "fp16" | "bf16", "+int8" / "+nf4" when quantized: the denoiser and text encoders
    vae_dtype: str  # the VAE while decoding
    device: str  # "cpu" | "cuda" | "mps": kernels differ, and so do the last bits of every pixel

    def manifest(self) -> dict:
        """The fields, and the scheduler settings behind the sampler's name (they changed once: a name is not enough)."""
        from .models.loading import SAMPLERS

        class_name, settings = SAMPLERS.get(self.sampler, (self.sampler, {}))
        return {**asdict(self), "sampler_settings": {"class": class_name, **settings}}

    def key(self) -> str:
        fields = self.manifest()
        fields.pop("model")  # the fingerprint identifies the weights; the name is for display
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


DTYPE_NAMES = {"no": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def prior_spec(prior: PriorConfig, prompt: str, model: ModelIdentity, resolution: int, *, device: str, dtype: str,
               vae_dtype: str = "fp32", quantization: str = "none") -> PriorSpec:
    """The one constructor of PriorSpec: the class images of `prior`'s settings on this model, precision and device.

    Args:
        prior: sampler, steps, guidance, negative prompt and seed (dreamlora.config.PriorConfig).
        prompt: the filled class prompt, e.g. "a photo of dog".
        model: the base model's identity (dreamlora.identity).
        resolution: image side in pixels.
        device: the device type the images are rendered on.
        dtype: the denoiser's and text encoders' dtype ("fp32", "fp16", "bf16"; "no" means fp32).
        vae_dtype: the VAE's dtype while decoding.
        quantization: the denoiser's linear layers' storage (--base-quantization): int8 or nf4 weights render
            other images than full-precision ones.
    """
    denoiser_dtype = DTYPE_NAMES[dtype] + ("" if quantization == "none" else f"+{quantization}")
    return PriorSpec(prompt=prompt, negative_prompt=prior.negative_prompt, seed=prior.seed, steps=prior.steps,
                     guidance=prior.guidance, sampler=prior.sampler, resolution=resolution, model=model.name,
                     model_fingerprint=model.fingerprint, dtype=denoiser_dtype, vae_dtype=DTYPE_NAMES[vae_dtype],
                     device=device)


def training_prior_spec(config: DreamLoraConfig, model: ModelIdentity, resolution: int, device: str) -> PriorSpec:
    """The class images a training run of `config` renders: frozen weights in its precision, the VAE in fp32."""
    prompt = fill_prompt(config.data.class_prompt, config.data.token, config.data.class_word)
    return prior_spec(config.prior, prompt, model, resolution, device=device, dtype=config.train.mixed_precision,
                      quantization=config.train.base_quantization)


def image_seed(seed: int, index: int) -> int:
    """The seed of class image `index`: independent of batch size and process count."""
    return derive_seed(seed, "prior", index)


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def cached_prior_dir(spec: PriorSpec) -> Path:
    """Where the training command keeps class images for this spec."""
    return cache_dir() / "priors" / spec.key()


def missing_indices(out_dir: Path, num_images: int) -> list[int]:
    return [i for i in range(num_images) if not (out_dir / image_name(i)).is_file()]


def prepare_prior_dir(out_dir: Path, spec: PriorSpec, *, overwrite: bool = False) -> None:
    """Create the folder and its manifest, or check that an existing one was made with `spec`.

    Raises:
        DataError: the folder holds class images made with other settings (and not `overwrite`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest = {"key": spec.key(), **spec.manifest()}
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"class-image manifest '{manifest_path}' is unreadable ({exc}); delete it or use --overwrite") from exc
        if existing.get("key") == spec.key():
            return
        if not overwrite:
            changed = [k for k in manifest if k != "key" and existing.get(k) != manifest[k]]
            raise DataError(
                f"'{out_dir}' holds class images made with other settings ({', '.join(changed) or 'unknown'} differ). "
                "Use another --out folder, or --overwrite to replace them."
            )
        for old in out_dir.glob("*.png"):
            old.unlink()
    elif any(out_dir.glob("*.png")) and not overwrite:
        raise DataError(f"'{out_dir}' already holds images that dreamlora did not make. Use an empty folder or --overwrite.")
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def generate_priors(base, spec: PriorSpec, out_dir: str | Path, num_images: int, *, batch_size: int = 4,
                    overwrite: bool = False, accelerator=None,
                    progress: ProgressCallback = ignore_progress) -> list[Path]:
    """Make the class images of `spec` that `out_dir` lacks, and return all `num_images` paths.

    Args:
        base: a loaded BaseModel (its pipeline is used frozen, without LoRA).
        spec: prompt, seed, sampler, steps, guidance, resolution, model.
        out_dir: the folder; its manifest records `spec`.
        num_images: how many images the folder must hold (indices 0..num_images-1).
        batch_size: images per pipeline call; does not change any image.
        overwrite: replace a folder made with other settings.
        accelerator: an accelerate.Accelerator to split the work across processes, or None.
        progress: receives ("priors", done, total) events.

    Raises:
        DataError: the folder belongs to other settings.
    """
    out_dir = Path(out_dir)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        prepare_prior_dir(out_dir, spec, overwrite=overwrite)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    todo = missing_indices(out_dir, num_images)
    if accelerator is not None:
        todo = todo[accelerator.process_index::accelerator.num_processes]
    if not todo:
        if is_main:
            note(progress, f"class images: all {num_images} found in the cache '{out_dir}'")
    else:
        _render(base, spec, out_dir, todo, batch_size, progress)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return [out_dir / image_name(i) for i in range(num_images)]


def _render(base, spec: PriorSpec, out_dir: Path, todo: list[int], batch_size: int,
            progress: ProgressCallback) -> None:
    from .sampling import render_images, save_png

    pipe = base.pipeline(spec.sampler)
    progress(ProgressEvent("priors", 0, len(todo), message=f"generating {len(todo)} class images"))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = render_images(pipe, spec.prompt, [image_seed(spec.seed, i) for i in chunk], steps=spec.steps,
                               guidance=spec.guidance, resolution=spec.resolution,
                               negative_prompt=spec.negative_prompt, family=base.family)
        for index, image in zip(chunk, images):
            save_png(image, out_dir / image_name(index))
        progress(ProgressEvent("priors", start + len(chunk), len(todo)))


def make_class_images(class_prompt: str, out_dir: str | Path, num_images: int, *, model: str | None = None,
                      single_file_config: str | None = None, seed: int = 0, steps: int = 20, guidance: float = 7.5,
                      negative_prompt: str = "", batch_size: int = 4, resolution: int | None = None,
                      sampler: str = "dpm++2m", overwrite: bool = False,
                      progress: ProgressCallback = ignore_progress) -> list[Path]:
    """Load a base model and fill `out_dir` with `num_images` class images (the `priors` command).

    Under `accelerate launch` each process renders its share; on a GPU the frozen model runs in fp16.

    Raises:
        ConfigError: a bad count, step number or sampler; DataError: the folder belongs to other settings;
        ModelLoadError: the model cannot be loaded.
    """
    import torch
    from accelerate import PartialState

    from .config import DEFAULT_MODEL, SAMPLERS
    from .errors import ConfigError
    from .identity import ModelIdentity
    from .models import load_base_model

    problems = []
    if num_images <= 0:
        problems.append(f"--num-images must be > 0 (got {num_images})")
    if steps <= 0:
        problems.append(f"--steps must be > 0 (got {steps})")
    if batch_size <= 0:
        problems.append(f"--batch-size must be > 0 (got {batch_size})")
    if sampler not in SAMPLERS:
        problems.append(f"--sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")
    if resolution is not None and resolution % 8:
        problems.append(f"--resolution must be a multiple of 8 (got {resolution})")
    if not class_prompt.strip():
        problems.append("--class-prompt must not be empty")
    if problems:
        raise ConfigError("; ".join(problems))
    state = PartialState()
    dtype = torch.float16 if state.device.type == "cuda" else torch.float32
    base = load_base_model(model or DEFAULT_MODEL, dtype=dtype, single_file_config=single_file_config)
    for module in (base.unet, base.vae, *base.text_encoders):
        module.to(state.device)
    settings = PriorConfig(sampler=sampler, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                           batch_size=batch_size, seed=seed)
    dtype_name = {torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    # vae_dtype left at fp32: the VAE loads in fp32 whatever the dtype (models.loading.load_base_model)
    spec = prior_spec(settings, class_prompt, ModelIdentity(base.identity, base.fingerprint),
                      resolution or base.default_resolution, device=state.device.type, dtype=dtype_name)
    return generate_priors(base, spec, out_dir, num_images, batch_size=batch_size, overwrite=overwrite,
                           accelerator=state if state.num_processes > 1 else None, progress=progress)
