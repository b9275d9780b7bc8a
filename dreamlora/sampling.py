"""Sample grids: prompts (x LoRA scales) in rows, seeds in columns, with the single images and a JSON sidecar.

`sample()` loads the LoRA file the way users do (diffusers' `load_lora_weights`), so a grid also
proves the file loads. Scale 0 turns the adapter off: it is the base model, exactly.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_path, write_text_atomic
from .config import DEFAULT_MODEL, SampleSettings, fill_prompt, settings_from
from .errors import ConfigError, ModelLoadError, NumericalError

__all__ = ["SampleResult", "SampleSettings", "attach_lora", "render_images", "sample"]
from .grid import make_grid
from .progress import ProgressCallback, ProgressEvent, ignore_progress, note
from .token_embedding import BUNDLE_PREFIX, attach_bundles, detach_learned_token, set_learned_token_scale, split_bundle

ADAPTER_NAME = "dreamlora"


@dataclass
class SampleResult:
    grid: Path
    images: list[Path]
    sidecar: Path


def lora_training_info(metadata: dict[str, str]) -> dict:
    """The training config a dreamlora file's metadata stores ({} for files made elsewhere or malformed ones;
    `read_lora_file` refuses the latter with a message, and its `config` is the checked value)."""
    try:
        info = json.loads(metadata.get("dreamlora.config", "{}"))
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) and all(isinstance(v, dict) for k, v in info.items()
                                                  if k in ("model", "data")) else {}


def model_for_lora(info: dict, lora_path: str | Path) -> str:
    """The base model a LoRA was trained on, when that name can be loaded again here."""
    name = info.get("model", {}).get("name")
    if not name:
        return DEFAULT_MODEL
    if name.startswith("builtin:") or (name.count("/") == 1 and not Path(name).exists()):
        return name
    raise ConfigError(f"'{Path(lora_path).name}' was trained on the local model '{name}'; pass it with --model.")


def attach_lora(pipe, base, lora_path: str | Path, metadata: dict[str, str],
                adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Load a LoRA file into `pipe` as users' tools do; notes when its `metadata` names another model family.

    SD 1.x and 2.x models of the same widths (the built-in tiny ones, say) take each other's LoRA files
    without a shape error, so the file's recorded base-model version is the only warning a user gets.

    Raises:
        ModelLoadError: the file's tensors do not fit the model.
    """
    try:
        with adapters_only(lora_path, metadata) as (adapters, bundles):
            pipe.load_lora_weights(str(adapters), adapter_name=adapter_name)
    # read_lora_file has checked the file's structure; what diffusers and peft still raise (ValueError,
    # KeyError, RuntimeError for shapes, IndexError or TypeError for key layouts they do not expect) means the
    # file does not fit this model.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"LoRA file '{lora_path}' does not fit the model '{base.identity}': "
                             f"{reason}. Pass the --model it was trained on.") from exc
    attach_bundles(bundles, base.tokenizers, base.text_encoders, Path(lora_path).name)  # the pipeline's own modules
    # kohya files name the base model in ss_base_model_version; diffusers-format files (which carry no ss_* entries
    # since readers took them for kohya networks) by their modelspec architecture.
    here = base.family.file_metadata(base.default_resolution)
    for key in ("ss_base_model_version", "modelspec.architecture"):
        trained = metadata.get(key)
        if trained:
            if trained != here[key]:
                return [f"'{Path(lora_path).name}' was trained on an {trained} model and '{base.identity}' is "
                        f"{here[key]}: its pictures may be off. Pass the --model it was trained on."]
            break
    return []


def detach_lora(pipe, base) -> None:
    """Undo attach_lora: the adapters and any bundled token embedding, so the pipeline renders the base model
    again (unload_lora_weights alone leaves the learnt token in the text encoder)."""
    pipe.unload_lora_weights()
    for encoder in base.text_encoders:
        detach_learned_token(encoder)


@contextmanager
def adapters_only(lora_path: str | Path, metadata: dict[str, str]):
    """(a file diffusers loads, {token: vectors}): the file itself, or without its bundled embedding
    (diffusers refuses keys that are not LoRA weights), written to a temporary file with the same header."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(str(lora_path), framework="pt", device="cpu") as f:
        bundled = [k for k in f.keys() if k.startswith(BUNDLE_PREFIX)]
        if not bundled:
            yield Path(lora_path), {}
            return
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    adapters, bundles = split_bundle(tensors)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(lora_path).name
        safetensors.torch.save_file(adapters, str(path), metadata=metadata)
        yield path, bundles


def sample(lora_path: str | Path | None, settings: SampleSettings, out: str | Path, *, model: str | None = None,
           single_file_config: str | None = None, progress: ProgressCallback = ignore_progress) -> SampleResult:
    """Render prompts x scales x seeds with a LoRA file and write the grid, the images and a sidecar.

    Raises:
        ConfigError: bad settings; ModelLoadError: the model or the LoRA file cannot be loaded.
    """
    from .lora import read_lora_file
    from .models import load_base_model
    from .preflight import prompt_length_warnings

    # Everything that can be refused is refused before the model loads and anything renders: the values
    # (a Python caller's too: non-finite scales, seeds past 2**64), the LoRA file, and where the outputs go.
    settings = settings_from(SampleSettings, {}, base=replace(settings))
    out = Path(out)
    check_outputs(out)
    lora = read_lora_file(lora_path) if lora_path else None  # checks its structure; refuses NaN weights
    metadata, info = (lora.metadata, lora.config or {}) if lora else ({}, {})
    data = info.get("data", {})
    token, class_word = data.get("token") or "sks", data.get("class_word") or ""
    prompts = [fill_prompt(p, token, class_word) for p in settings.prompts]
    model = model or (model_for_lora(info, lora_path) if lora_path else DEFAULT_MODEL)
    device, dtype = sampling_device()
    base = load_base_model(model, single_file_config=single_file_config, dtype=dtype)
    place_for_sampling(base, device, [*prompts, settings.negative_prompt, ""])
    labelled = {f"--prompt {i + 1}" if len(prompts) > 1 else "--prompt": p for i, p in enumerate(prompts)}
    if settings.negative_prompt:
        labelled["--negative-prompt"] = settings.negative_prompt
    for message in prompt_length_warnings(labelled, base.tokenizers[0] if base.tokenizers else None):
        note(progress, message)
    pipe = base.pipeline(settings.sampler)
    scales = settings.scales if lora_path else [0.0]
    if lora_path:
        for message in attach_lora(pipe, base, lora_path, metadata):
            note(progress, message)

    def set_scale(scale: float) -> None:
        if lora_path:
            set_lora_scale(pipe, base, scale)

    resolution = settings.resolution or base.default_resolution
    rows, labels, records = [], [], []
    image_dir = out.parent / f"{out.stem}-images"
    total = len(prompts) * len(scales)
    for p_index, prompt in enumerate(prompts):
        for scale in scales:
            set_scale(scale)
            images = render_images(pipe, prompt, settings.seeds, steps=settings.steps, guidance=settings.guidance,
                                   negative_prompt=settings.negative_prompt, resolution=resolution, family=base.family)
            rows.append(images)
            labels.append(prompt if len(scales) == 1 else f"{prompt}\nLoRA scale {scale:g}")
            for seed, image in zip(settings.seeds, images):
                path = image_dir / f"p{p_index:02d}_scale{scale:g}_seed{seed}.png"
                save_png(image, path)
                records.append({"prompt": prompt, "scale": scale, "seed": seed, "file": f"{image_dir.name}/{path.name}"})
            progress(ProgressEvent("sample", len(rows), total))
    title = f"{Path(lora_path).name if lora_path else 'base model'} on {base.identity}"
    save_png(make_grid(rows, labels, [f"seed {s}" for s in settings.seeds], title=title), out)
    sidecar = out.with_suffix(".json")
    record = {"model": base.identity, "lora": Path(lora_path).name if lora_path else None, "token": token,
              "class_word": class_word, "resolution": resolution, "device": device.type, **asdict(settings),
              "prompts_filled": prompts, "images": records}
    write_text_atomic(sidecar, json.dumps(record, indent=2) + "\n")
    return SampleResult(out, [image_dir / Path(r["file"]).name for r in records], sidecar)


def sampling_device() -> tuple[torch.device, torch.dtype]:
    """Where `sample` and `eval` render: a CUDA GPU in half precision (bf16 where it runs it) when there is one,
    else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def cache_t5_states(base, prompts: list[str], device: torch.device, *, stay: bool = False) -> torch.nn.Module | None:
    """SD3/Flux: T5 encodes `prompts` on `device`, a few at a time (the family caches their states), then goes to
    the CPU unless `stay`: T5-XXL (9 GB in bf16) and the transformer need not share the accelerator.

    Returns T5, or None for families that cache no encoder's states.
    """
    from .memory import CACHE_PROMPTS

    index = base.family.cached_text_encoder
    if index is None:
        return None
    t5 = base.text_encoders[index]
    t5.to(device)
    unique = list(dict.fromkeys(prompts))
    for start in range(0, len(unique), CACHE_PROMPTS):
        base.family.encode_prompts(base.tokenizers, base.text_encoders, unique[start:start + CACHE_PROMPTS])
    if not stay:
        t5.to("cpu")
    return t5


def place_for_sampling(base, device: torch.device, prompts: list[str] | None = None) -> None:
    """Move the model to `device`. SD3's/Flux's T5 first encodes `prompts` and then stays on the CPU
    (`cache_t5_states`); with `prompts` None it goes along."""
    t5 = cache_t5_states(base, prompts, device) if prompts is not None else None
    for module in (base.unet, base.vae, *base.text_encoders):
        if module is not t5:
            module.to(device)


def check_outputs(out: Path) -> None:
    """Refuse, before rendering, a grid path whose grid, images folder or sidecar could not be written.

    Raises:
        ConfigError: naming --out and what is in the way.
    """
    from .atomic import check_writable
    from .errors import DreamLoraError

    image_dir, sidecar = out.parent / f"{out.stem}-images", out.with_suffix(".json")
    if sidecar == out:
        raise ConfigError(f"--out '{out}' would be overwritten by its own settings sidecar; name the grid .png.")
    if image_dir.exists() and not image_dir.is_dir():
        raise ConfigError(f"--out '{out}': '{image_dir}', where the single images go, is a file. Move it or "
                          "choose another --out.")
    if sidecar.is_dir():
        raise ConfigError(f"--out '{out}': '{sidecar}', where the settings go, is a folder. Choose another --out.")
    try:
        check_writable(out, "--out")
    except DreamLoraError as exc:
        raise ConfigError(str(exc)) from None


def render_images(pipe, prompt: str, seeds: list[int], *, steps: int, guidance: float, resolution: int,
                  negative_prompt: str = "", family=None) -> list[Image.Image]:
    """One image per seed, in one batch; each seed's starting noise comes from its own CPU generator.

    Args:
        family: the model's family (models.family): it turns the prompts into the pipeline's arguments (SD3 and Flux
            encode through their T5 cache, T5 wherever it is). None: the pipeline encodes the texts itself.
    """
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    prompts = [prompt] * len(seeds)
    negatives = [negative_prompt] * len(seeds) if negative_prompt else None
    with torch.no_grad():
        prompt_arguments = (family.sampling_prompts(pipe, prompts, negatives) if family is not None
                            else {"prompt": prompts, "negative_prompt": negatives})
        latents = pipe(
            **prompt_arguments,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=generators,
            latents=initial_latents(pipe, generators, resolution),
            output_type="latent",
        ).images
        return decode_latents(pipe.vae, pipe.image_processor, unpacked_latents(pipe, latents, resolution))


def decode_latents(vae, image_processor, latents: torch.Tensor) -> list[Image.Image]:
    """Decode in the VAE's own dtype (it may differ from the UNet's), one image at a time to bound memory.

    A VAE that overflows in half precision (SDXL's own: config force_upcast) decodes in fp32. A non-finite latent
    or pixel is an error, never a black picture.

    Raises:
        NumericalError: the denoiser or the VAE produced NaN or inf.
    """
    if not bool(torch.isfinite(latents).all()):
        raise NumericalError("sampling produced non-finite latents (NaN or inf): the model overflowed in half "
                             "precision, or a LoRA holds non-finite weights. Sample in fp32 or check the LoRA file.")
    dtype = torch.float32 if vae.config.get("force_upcast", False) else vae.dtype
    original = vae.dtype
    if dtype != original:
        vae.to(dtype=dtype)
    try:
        with torch.no_grad():
            # SD3's and Flux's VAEs shift their latents as well as scaling them.
            scaled = latents.to(dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
            pixels = torch.cat([vae.decode(row[None], return_dict=False)[0] for row in scaled])
    finally:
        if dtype != original:
            vae.to(dtype=original)
    if not bool(torch.isfinite(pixels).all()):
        raise NumericalError("the VAE decoded non-finite pixels (NaN or inf): it overflowed in half precision. "
                             "Use an fp32 VAE or pass --vae with an fp16-fixed one.")
    return image_processor.postprocess(pixels.float(), output_type="pil")


def initial_latents(pipe, generators: list[torch.Generator], resolution: int) -> torch.Tensor:
    """Each image's starting noise drawn on the CPU from its own generator: the same on every device and batch."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # SD3, Flux: a transformer
    channels = pipe.vae.config.latent_channels
    side = resolution // pipe.vae_scale_factor
    noise = torch.cat([torch.randn((1, channels, side, side), generator=g) for g in generators])
    if hasattr(pipe, "_pack_latents"):  # Flux's pipeline takes its latents as 2x2 patches: (B, tokens, 4·C)
        noise = pipe._pack_latents(noise, len(generators), channels, side, side)
    return noise.to(device=denoiser.device, dtype=denoiser.dtype)


def unpacked_latents(pipe, latents: torch.Tensor, resolution: int) -> torch.Tensor:
    """The (B, C, h, w) latents of a pipeline's output_type="latent" (Flux returns its 2x2 patches)."""
    if hasattr(pipe, "_unpack_latents"):
        return pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    return latents


def set_adapters_enabled(modules, enabled: bool) -> None:
    """Switch in-memory peft adapters and a learnt token embedding on or off (off = the base model's exact forward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = list(modules)
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(enabled)
    set_learned_token_scale(modules, 1.0 if enabled else 0.0)


def set_lora_scale(pipe, base, scale: float, adapter_name: str = ADAPTER_NAME) -> None:
    """A loaded LoRA file's strength in `pipe` (built over `base`'s modules), its bundled token embedding's
    included; 0 is exactly the base model."""
    if scale == 0:
        pipe.disable_lora()  # the adapter is skipped entirely
    else:
        pipe.enable_lora()
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
    set_learned_token_scale(base.text_encoders, scale)


def render_validation_grid(base, prompts: list[str], seeds: list[int], path: Path, *, steps: int, guidance: float,
                           sampler: str, resolution: int, title: str, write: bool = True) -> Path:
    """Base vs LoRA rows for each prompt, from the adapters being trained (no file round trip).

    Args:
        write: save the grid to `path` (False: render only, as processes other than the main one do).
    """
    models = [base.unet, *base.text_encoders]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    pipe = base.pipeline(sampler)
    rows, labels = [], []
    try:
        for prompt in prompts:
            for enabled, tag in ((False, "base"), (True, "LoRA")):
                set_adapters_enabled(models, enabled)
                rows.append(render_images(pipe, prompt, seeds, steps=steps, guidance=guidance, resolution=resolution,
                                          family=base.family))
                labels.append(f"{prompt}\n({tag})")
    finally:
        set_adapters_enabled(models, True)
        for m, training in zip(models, was_training):
            m.train(training)
    if write:
        save_png(make_grid(rows, labels, [f"seed {s}" for s in seeds], title=title), path)
    return path


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")

