"""LoRA adapters through peft: inject, checkpoint, and write the two file formats people load.

Formats written by :func:`save_lora_file`:

* ``kohya`` (sd-scripts / AUTOMATIC1111 / ComfyUI): ``lora_unet_<module>`` and ``lora_te_<module>``
  names with ``.lora_down.weight`` (peft ``lora_A``), ``.lora_up.weight`` (peft ``lora_B``) and a
  0-dim ``.alpha`` per module. Loaders scale each module by ``alpha / rank``.
* ``diffusers``: peft key names under ``unet.`` / ``text_encoder.``, with the peft config (rank
  and alpha) as JSON in the ``lora_adapter_metadata`` header entry, which diffusers'
  ``load_lora_weights`` turns back into a ``LoraConfig``. Without it diffusers assumes
  ``alpha == rank`` and silently changes the strength.

Text-encoder module names are written by the layer's role, as transformers 4.x spells them
(``text_model.encoder.layers.N.self_attn.q_proj``). transformers 5.x flattened ``CLIPTextModel``
(no ``text_model.`` level), but every kohya loader and older diffusers expect the 4.x names, and
the diffusers loader installed here strips ``text_model.`` itself when the model lacks it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from .atomic import atomic_path
from .errors import ConfigError, ModelLoadError
from .models.family import ModelFamily
from .token_embedding import HOLDER, bundle_tensors, learned_token

ADAPTER_NAME = "default"
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# The safetensors header key diffusers reads the adapter config from (diffusers.loaders.lora_base).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
TOKEN_KEY = f"{HOLDER}.vectors"  # a learnt token embedding in adapter_state_dict (checkpoints)

# Header values travel in every copy of the file and some UIs show them; keep them small.
MAX_NAME_CHARS = 256
MAX_COMMENT_CHARS = 4096
MAX_CONFIG_BYTES = 64 * 1024

# Children of CLIPTextTransformer; transformers 5.x hoists them to the top of CLIPTextModel.
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


# ----------------------------------------------------------------------------- injection


def add_lora_adapters(
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    unet_targets: list[str],
    train_text_encoder: bool,
    text_targets: list[str],
    dora: bool = False,
) -> None:
    """Freeze the models and inject a fresh LoRA adapter named "default" into them, in place.

    The adapter starts as a no-op (peft's default init: ``lora_B = 0``), so the model's output is
    unchanged until training moves it. Injection goes through ``peft.inject_adapter_in_model``
    rather than ``CLIPTextModel.add_adapter``, which under transformers 5.x demands a newer peft.

    Args:
        unet: The denoiser; always gets an adapter.
        text_encoders: The pipeline's text encoders, in order; adapted only if `train_text_encoder`.
        rank: LoRA rank r (the inner dimension).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the LoRA input during training.
        unet_targets: Module-name suffixes to adapt in the UNet, e.g. ``["to_q", "to_out.0"]``.
        train_text_encoder: Whether the text encoders get adapters too.
        text_targets: Module-name suffixes to adapt in each text encoder, e.g. ``["q_proj"]``.
        dora: DoRA (peft's ``use_dora``): a learned magnitude per output row on top of the low-rank update;
            it starts at the base weight's row norms, so the fresh adapter is still a no-op.

    Raises:
        ConfigError: A target names no module of that model (peft itself would ignore a typo
            as long as one other target matched).
    """
    models = [unet, *text_encoders]
    for model in models:
        model.requires_grad_(False)

    jobs = [(unet, unet_targets, "lora.unet_targets", "UNet")]
    if train_text_encoder:
        jobs += [(te, text_targets, "lora.text_targets", "text encoder") for te in text_encoders]

    problems = []
    for model, targets, key, what in jobs:
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            examples = _example_targets(model)
            problems.append(f"{key} {missing} match no module of the {what}; use names such as {examples}")
    if problems:
        raise ConfigError("; ".join(problems))

    for model, targets, _, _ in jobs:
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets),
            init_lora_weights=True,  # lora_B = 0: a fresh adapter changes nothing
            use_dora=dora,
        )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)

    # peft already marks only adapters trainable; say so explicitly, since the training loop and
    # the optimizer rely on it and models without adapters must stay frozen too.
    for model in models:
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `module` that require grad (after injection: exactly the LoRA weights)."""
    return [p for p in module.parameters() if p.requires_grad]


def _example_targets(model: torch.nn.Module) -> list[str]:
    """A few Linear module suffixes of `model`, for error messages."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(leaves)[:8]


def _has_adapter(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A for m in model.modules())


# ----------------------------------------------------------------------------- naming


def _text_role_name(module_name: str) -> str:
    """Installed text-encoder module path -> the transformers 4.x path that files use.

    ``encoder.layers.0.self_attn.q_proj`` (transformers 5.x CLIPTextModel) and
    ``text_model.encoder.layers.0.self_attn.q_proj`` (4.x, and CLIPTextModelWithProjection) both
    become the latter; modules outside the text transformer (``text_projection``) are unchanged.
    """
    head = module_name.split(".", 1)[0]
    return f"text_model.{module_name}" if head in _TEXT_MODEL_CHILDREN else module_name


def denoiser_prefix(model: torch.nn.Module) -> str:
    """The pipeline's name of a denoiser, diffusers' key prefix: `transformer` for SD3's and Flux's, else `unet`."""
    return "transformer" if type(model).__name__.endswith("Transformer2DModel") else "unet"


def _text_prefix(index: int) -> str:
    """Key prefix of the index-th text encoder in diffusers files: text_encoder, text_encoder_2, ..."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


def _split_peft_key(key: str) -> tuple[str, str]:
    """``a.b.q_proj.lora_A.weight`` -> (``a.b.q_proj``, ``lora_A.weight``)."""
    module, _, rest = key.partition(".lora_")
    return module, "lora_" + rest


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]


def _layer_alpha(layer: LoraLayer) -> float:
    """The alpha a kohya loader needs (it scales by alpha / r) to reproduce this layer's scaling."""
    r = layer.r[ADAPTER_NAME]
    alpha = float(layer.lora_alpha[ADAPTER_NAME])
    # rsLoRA scales by alpha / sqrt(r); expressed as kohya's alpha / r that is alpha * sqrt(r).
    return alpha * math.sqrt(r) if getattr(layer, "use_rslora", {}).get(ADAPTER_NAME, False) else alpha


def _check_alpha(alpha: float | None, layers: list[tuple[str, LoraLayer]]) -> None:
    """A caller's alpha must agree with the adapter's; writing a different one would change the strength."""
    if alpha is None:
        return
    for name, layer in layers:
        if not math.isclose(float(layer.lora_alpha[ADAPTER_NAME]), float(alpha)):
            raise ValueError(
                f"alpha {alpha} differs from the adapter's lora_alpha {layer.lora_alpha[ADAPTER_NAME]} at '{name}'"
            )


# ----------------------------------------------------------------------------- checkpoints


def adapter_state_dict(unet: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter weights of every adapted model, for checkpoints and resume.

    Keys are ``unet.<peft key>`` and ``text_encoder.<peft key>`` (``text_encoder_2.`` ...), with
    text-encoder module paths in role form (see :func:`_text_role_name`) so a checkpoint survives
    a transformers upgrade, and a learnt token embedding as ``text_encoder.dreamlora_token.vectors``.
    Tensors are the live ones (not copies); save or clone them.
    """
    state: dict[str, torch.Tensor] = {}
    for prefix, model, is_text in _adapted_models(unet, text_encoders):
        for key, value in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items():
            if is_text:
                module, leaf = _split_peft_key(key)
                key = f"{_text_role_name(module)}.{leaf}"
            state[f"{prefix}.{key}"] = value
        if is_text and (holder := learned_token(model)) is not None:
            state[f"{prefix}.{TOKEN_KEY}"] = holder.vectors
    return state


def load_adapter_state_dict(
    unet: torch.nn.Module, text_encoders: list[torch.nn.Module], state: dict[str, torch.Tensor]
) -> None:
    """Copy an :func:`adapter_state_dict` back into models that already carry the same adapters.

    Raises:
        ModelLoadError: The state does not fit the adapters (other rank, targets, or text-encoder
            training setting than the run that wrote it).
    """
    remaining = dict(state)
    for prefix, model, is_text in _adapted_models(unet, text_encoders):
        part = {k[len(prefix) + 1 :]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix + ".")}
        holder = learned_token(model) if is_text else None
        vectors = part.pop(TOKEN_KEY, None)
        if (holder is None) != (vectors is None):
            raise ModelLoadError(
                f"adapter checkpoint {'lacks' if vectors is None else 'holds'} a learnt token embedding for the "
                f"{prefix}. Resume with the train_token_embedding setting of the run that wrote it."
            )
        if holder is not None:
            if vectors.shape != holder.vectors.shape:
                raise ModelLoadError(f"adapter checkpoint's token embedding is {tuple(vectors.shape)}, the "
                                     f"{prefix} needs {tuple(holder.vectors.shape)}. Resume with the run's --token.")
            with torch.no_grad():
                holder.vectors.copy_(vectors)
        if is_text:
            installed = {_text_role_name(n): n for n, _ in model.named_modules()}
            part = {
                f"{installed.get(module, module)}.{leaf}": v
                for module, leaf, v in ((*_split_peft_key(k), v) for k, v in part.items())
            }
        expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
        if set(part) != expected:
            missing, extra = sorted(expected - set(part)), sorted(set(part) - expected)
            raise ModelLoadError(
                f"adapter checkpoint does not match the {prefix} adapter: {len(missing)} missing keys "
                f"{missing[:3]}, {len(extra)} unexpected keys {extra[:3]}. Resume with the LoRA settings "
                f"(rank, targets, train_text_encoder) of the run that wrote it."
            )
        try:
            set_peft_model_state_dict(model, part, adapter_name=ADAPTER_NAME)
        except RuntimeError as exc:  # shape mismatch: another rank
            raise ModelLoadError(
                f"adapter checkpoint does not fit the {prefix} adapter ({exc}). "
                f"Resume with the rank of the run that wrote it."
            ) from exc
    if remaining:
        raise ModelLoadError(
            f"adapter checkpoint holds weights for models without an adapter: {sorted(remaining)[:3]}. "
            f"Resume with the train_text_encoder setting of the run that wrote it."
        )


def _adapted_models(
    unet: torch.nn.Module, text_encoders: list[torch.nn.Module]
) -> list[tuple[str, torch.nn.Module, bool]]:
    """(prefix, model, is_text_encoder) for every model that carries the adapter."""
    out = [(denoiser_prefix(unet), unet, False)] if _has_adapter(unet) else []
    out += [(_text_prefix(i), te, True) for i, te in enumerate(text_encoders) if _has_adapter(te)]
    return out


# ----------------------------------------------------------------------------- file formats


def to_kohya_state_dict(
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    family: ModelFamily,
    *,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """The adapters in kohya / AUTOMATIC1111 naming.

    Each adapted module ``M`` gives ``lora_unet_M.lora_down.weight`` (peft lora_A, (r, in)),
    ``.lora_up.weight`` (lora_B, (out, r)) and ``.alpha``, a 0-dim float32 tensor holding the
    adapter's real alpha. (diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank
    whatever the adapter used, which changes the strength by rank / alpha.)

    Args:
        unet: The UNet with its adapter.
        text_encoders: The text encoders; those without an adapter are skipped.
        family: Gives the text-encoder prefixes (``lora_te``; SDXL ``lora_te1``, ``lora_te2``).
        alpha: If given, checked against the adapter's alpha (it must agree).
        dtype: Dtype of the weights; alpha stays float32 so values like 0.3 survive.

    Returns:
        Contiguous CPU tensors by key.
    """
    if len(text_encoders) > len(family.kohya_text_prefixes):
        raise ValueError(
            f"{len(text_encoders)} text encoders but family {family.name} names only {family.kohya_text_prefixes}"
        )
    named = [("lora_unet", unet, False)] + [
        (family.kohya_text_prefixes[i], te, True) for i, te in enumerate(text_encoders)
    ]
    unet_config = dict(unet.config) if hasattr(unet, "config") else {}
    out: dict[str, torch.Tensor] = {}
    for prefix, model, is_text in named:
        layers = _lora_layers(model)
        _check_alpha(alpha, layers)
        if any(ADAPTER_NAME in getattr(layer, "lora_magnitude_vector", {}) for _, layer in layers):
            from .interop.formats import KOHYA_DORA_REFUSAL

            raise ConfigError(f"the adapters are DoRA: {KOHYA_DORA_REFUSAL}.")
        for name, layer in layers:
            if is_text:
                key = f"{prefix}_{_text_role_name(name).replace('.', '_')}"
            else:  # the family names the denoiser's modules (SDXL files use SGM paths)
                key = family.kohya_unet_key(name, unet_config)
            out[f"{key}.lora_down.weight"] = _export(layer.lora_A[ADAPTER_NAME].weight, dtype)
            out[f"{key}.lora_up.weight"] = _export(layer.lora_B[ADAPTER_NAME].weight, dtype)
            out[f"{key}.alpha"] = torch.tensor(_layer_alpha(layer), dtype=torch.float32)
    return out


def to_diffusers_state_dict(
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    *,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The adapters in diffusers naming, and the adapter config diffusers needs to rebuild them.

    Returns:
        ``(tensors, adapter_metadata)``: tensors keyed ``unet.<module>.lora_A.weight`` etc.;
        adapter_metadata is ``{"unet.r": 4, "unet.lora_alpha": 2.0, ...}``, the flattened form
        diffusers' ``save_lora_weights`` writes (as JSON) under ``lora_adapter_metadata``.
    """
    tensors: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, object] = {}
    for prefix, model, _ in _adapted_models(unet, text_encoders):
        _check_alpha(alpha, _lora_layers(model))
        adapter_metadata.update({f"{prefix}.{k}": v for k, v in _portable_config(model).items()})
    for key, value in adapter_state_dict(unet, text_encoders).items():
        if key.endswith(TOKEN_KEY):
            continue  # written as a bundled embedding (save_lora_file)
        if key.endswith(".lora_magnitude_vector"):
            # DoRA magnitudes as `...lora_magnitude_vector.weight`: diffusers loads the UNet's either way, but its
            # text-encoder path (through transformers 5.x) finds them only with the .weight its module has.
            key += ".weight"
        tensors[key] = _export(value, dtype)
    return tensors, adapter_metadata


def _portable_config(model: torch.nn.Module) -> dict[str, object]:
    """The LoraConfig fields a loader needs, as JSON-ready values.

    Only long-standing fields: peft's full ``to_dict()`` carries fields (``use_bdlora``,
    ``kasa_config``...) that an older peft's ``LoraConfig(**kwargs)`` rejects with TypeError.
    """
    config: LoraConfig = model.peft_config[ADAPTER_NAME]
    targets = config.target_modules
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
    }


def _export(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A copy, so the file never aliases live training weights (safetensors also refuses shared storage).
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous().clone()


def save_lora_file(
    path: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    family: ModelFamily,
    *,
    format: Literal["kohya", "diffusers"],
    alpha: float,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str],
    check: bool = True,
    token: str | None = None,
) -> None:
    """Write the adapters as one .safetensors file, atomically, after the compatibility check.

    Each format's header says only what its readers should believe: a diffusers file carries no kohya
    ``ss_*`` entries (AUTOMATIC1111 would take it for a kohya network; they are kept under
    ``dreamlora.kohya_metadata`` for a conversion back) and says ``modelspec.implementation`` = diffusers;
    a kohya file gets sd-scripts' ``sshs_model_hash`` / ``sshs_legacy_hash``.

    Args:
        path: Target file; written beside it under a temporary name, then renamed.
        unet: The UNet with its adapter.
        text_encoders: The text encoders; those without an adapter are skipped.
        family: Model family (kohya names of the denoiser's modules and the text-encoder prefixes).
        format: ``"kohya"`` for AUTOMATIC1111 / ComfyUI / sd-scripts, ``"diffusers"`` for
            ``pipe.load_lora_weights``. diffusers loads both.
        alpha: The adapter's alpha; checked against the adapter (a mismatch is a bug).
        dtype: Weight dtype in the file (fp16 halves the size; training may have used fp32).
        metadata: Header entries, usually from :func:`lora_metadata`. ``format`` and
            ``lora_adapter_metadata`` are set here.
        check: Run the compatibility check (dreamlora.interop.check) before writing.
        token: The subject's token: a learnt token embedding is written as its bundled embedding
            (``bundle_emb.<token>.*``, dreamlora.token_embedding).

    Raises:
        CompatibilityError: A tool the format is written for would not load the file as trained.
        ConfigError: DoRA adapters and ``format="kohya"`` (no kohya reader applies peft's DoRA).
        DreamLoraError: The disk filled up while writing.
    """
    from .interop.formats import header_for, parse_lora
    from .interop.hashes import addnet_hashes

    header = {k: v for k, v in metadata.items() if k != DIFFUSERS_METADATA_KEY}
    if format == "kohya":
        # No lora_adapter_metadata here: diffusers refuses a file that has both it and kohya alphas.
        tensors = to_kohya_state_dict(unet, text_encoders, family, alpha=alpha, dtype=dtype)
    elif format == "diffusers":
        tensors, adapter_metadata = to_diffusers_state_dict(unet, text_encoders, alpha=alpha, dtype=dtype)
    else:
        raise ValueError(f"format must be 'kohya' or 'diffusers', got {format!r}")
    if not tensors:
        raise ValueError("no LoRA adapter found in the UNet or text encoders; call add_lora_adapters first")
    if any(learned_token(te) is not None for te in text_encoders):
        if not token:
            raise ValueError("a learnt token embedding needs the token it is written under")
        tensors.update(bundle_tensors(text_encoders, token, dtype))
    if format == "diffusers":
        header = header_for("peft", header, parse_lora(tensors, {}, Path(path).name).modules,
                            adapter_config=adapter_metadata)
    header["format"] = "pt"
    if format == "kohya":
        header["sshs_model_hash"], header["sshs_legacy_hash"] = addnet_hashes(tensors, header)
    if check:
        from .interop.check import check_before_write
        from .interop.keymaps import ModelLayout

        check_before_write(tensors, header, ModelLayout.from_modules(family, unet, text_encoders), Path(path).name)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)


# ----------------------------------------------------------------------------- reading


@dataclass
class LoraFile:
    """What a LoRA .safetensors file holds, as read by :func:`read_lora_file`."""

    path: Path
    format: Literal["kohya", "diffusers"]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]  # the whole safetensors header metadata
    rank: int  # the largest rank of any module (usually all modules share it)
    alpha: float | dict[str, float]  # one value when every module shares it, else per module
    unet_modules: int  # adapted UNet modules
    text_modules: int  # adapted text-encoder modules, all encoders together
    dtype: torch.dtype  # dtype of the LoRA weights
    file_size: int  # bytes
    config: dict | None = None  # the training config dreamlora stores ("dreamlora.config"), None in other files


# The sections of a stored dreamlora config, and its string fields that sample/eval/inspect read.
_CONFIG_SECTIONS = ("model", "data", "prior", "lora", "train", "validation", "output")
_CONFIG_STRINGS = ("model.name", "data.token", "data.class_word", "data.instance_dir")


class _Malformed(Exception):
    """What is wrong with one key of a LoRA file (read_lora_file adds the file name)."""


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read, check and describe a kohya or diffusers LoRA file.

    The structure is checked here, once, for every command that reads a file (sample, eval, inspect):
    each LoRA pair has a down (A) weight of shape (rank, in) or (rank, in, kh, kw) and a matching up (B)
    weight, each `.alpha` is one finite number, every LoRA tensor is finite (a NaN file would render black
    pictures), and the metadata that dreamlora parses is JSON of the expected shape.

    Alpha is reported as loaders apply it: a kohya module without ``.alpha`` and a diffusers
    file without adapter metadata both mean alpha = rank.

    Raises:
        ModelLoadError: The file is missing, not safetensors, truncated, holds no LoRA weights, or is
            malformed (naming the key and what is wrong with it).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"LoRA file '{path}' does not exist or is not a file. Check the path.")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    # safetensors' own SafetensorError, and whatever its Rust side raises for a header it cannot map
    # (a dtype it lacks, offsets past the end): every one means the same to the user.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"LoRA file '{path}' is not a readable safetensors file ({reason}). "
            f"It may be truncated or another format; download or export it again."
        ) from exc

    kohya_downs = _modules_by_suffix(tensors, ".lora_down.weight")
    peft_downs = _modules_by_suffix(tensors, ".lora_A.weight")
    try:
        if kohya_downs:
            fmt, downs, unet_prefix = "kohya", kohya_downs, "lora_unet_"
            _check_pairs(tensors, downs, ".lora_down.weight", ".lora_up.weight")
            # A module without .alpha is loaded with alpha = rank (sd-scripts, diffusers).
            alphas = {m: _kohya_alpha(tensors, m) if f"{m}.alpha" in tensors else float(d.shape[0])
                      for m, d in downs.items()}
        elif peft_downs:
            fmt, downs, unet_prefix = "diffusers", peft_downs, "unet."
            _check_pairs(tensors, downs, ".lora_A.weight", ".lora_B.weight")
            alphas = _diffusers_alphas(path, metadata, downs)
        else:
            raise ModelLoadError(
                f"LoRA file '{path}' holds no LoRA weights (no '.lora_down.weight' or '.lora_A.weight' keys "
                f"among {len(tensors)} tensors). Is it a full model rather than a LoRA?"
            )
        config = _stored_config(metadata)
    except _Malformed as exc:
        raise ModelLoadError(f"LoRA file '{path}' is malformed: {exc}. Export or download it again.") from None

    distinct = set(alphas.values())
    dtypes = Counter(v.dtype for v in downs.values())
    return LoraFile(
        path=path,
        format=fmt,
        tensors=tensors,
        metadata=metadata,
        rank=max(int(v.shape[0]) for v in downs.values()),
        alpha=distinct.pop() if len(distinct) == 1 else alphas,
        unet_modules=sum(1 for m in downs if m.startswith(unet_prefix)),
        text_modules=sum(1 for m in downs if not m.startswith(unet_prefix)),
        dtype=dtypes.most_common(1)[0][0],
        file_size=path.stat().st_size,
        config=config,
    )


def _check_pairs(tensors: dict[str, torch.Tensor], downs: dict[str, torch.Tensor], down_suffix: str,
                 up_suffix: str) -> None:
    """Each down weight (rank, in[, kh, kw]) has an up weight (out, rank[, 1, 1]); both finite floats.

    Raises:
        _Malformed: naming the first bad key.
    """
    for module, down in downs.items():
        key, up_key = f"{module}{down_suffix}", f"{module}{up_suffix}"
        up = tensors.get(up_key)
        if up is None:
            raise _Malformed(f"'{key}' has no '{up_key}'")
        for name, tensor in ((key, down), (up_key, up)):
            if not tensor.is_floating_point():
                raise _Malformed(f"'{name}' holds {str(tensor.dtype).removeprefix('torch.')} values, not floats")
            if tensor.dim() not in (2, 4) or tensor.numel() == 0:
                raise _Malformed(f"'{name}' has shape {tuple(tensor.shape)}; a LoRA weight is a non-empty matrix "
                                 "(or a 4-D convolution weight)")
            if not bool(torch.isfinite(tensor).all()):
                raise _Malformed(f"'{name}' holds NaN or inf values")
        if up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise _Malformed(f"'{up_key}' has shape {tuple(up.shape)}, which does not fit '{key}' of shape "
                             f"{tuple(down.shape)} (rank {down.shape[0]})")
    ups = _modules_by_suffix(tensors, up_suffix)
    orphan = sorted(set(ups) - set(downs))
    if orphan:
        raise _Malformed(f"'{orphan[0]}{up_suffix}' has no '{orphan[0]}{down_suffix}'")


def _kohya_alpha(tensors: dict[str, torch.Tensor], module: str) -> float:
    alpha = tensors[f"{module}.alpha"]
    if alpha.numel() != 1:
        raise _Malformed(f"'{module}.alpha' has shape {tuple(alpha.shape)}; it must hold one number")
    value = float(alpha.reshape(()).item())
    if not math.isfinite(value):
        raise _Malformed(f"'{module}.alpha' is {value}; it must be a finite number")
    return value


def _stored_config(metadata: dict[str, str]) -> dict | None:
    """The `dreamlora.config` JSON, checked for the shape sample, eval and inspect read; None when absent."""
    raw = metadata.get("dreamlora.config")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"metadata 'dreamlora.config' is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _Malformed(f"metadata 'dreamlora.config' is a JSON {_json_kind(config)}, not an object of sections")
    for section in _CONFIG_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise _Malformed(f"metadata 'dreamlora.config' section '{section}' is a JSON "
                             f"{_json_kind(config[section])}, not an object")
    for dotted in _CONFIG_STRINGS:
        section, _, name = dotted.partition(".")
        value = config.get(section, {}).get(name)
        if value is not None and not isinstance(value, str):
            raise _Malformed(f"metadata 'dreamlora.config' key '{dotted}' is {value!r}, not a string")
    return config


def _json_kind(value: object) -> str:
    """JSON's name for a parsed value's type: 'list' -> 'array', 'str' -> 'string', None -> 'null'."""
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _modules_by_suffix(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """{module name: tensor} for the keys ending in `suffix` (``m.lora_down.weight`` -> ``m``)."""
    return {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}


def _diffusers_alphas(path: Path, metadata: dict[str, str], downs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-module alpha of a diffusers file, resolved as peft does (alpha_pattern, then lora_alpha)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"LoRA file '{path}' has malformed '{DIFFUSERS_METADATA_KEY}' JSON ({exc}).") from exc
    if not isinstance(config, dict):
        raise _Malformed(f"metadata '{DIFFUSERS_METADATA_KEY}' is a JSON {_json_kind(config)}, not an object")

    def number(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Malformed(f"metadata '{DIFFUSERS_METADATA_KEY}' key '{key}' is {value!r}, not a finite number")
        return float(value)

    alphas = {}
    for module, down in downs.items():
        prefix, _, inner = module.partition(".")
        key = f"{prefix}.lora_alpha"
        alpha = number(key, config[key]) if key in config else float(down.shape[0])  # diffusers' fallback: = rank
        patterns = config.get(f"{prefix}.alpha_pattern")
        patterns = {} if patterns is None else patterns
        if not isinstance(patterns, dict):
            raise _Malformed(f"metadata '{DIFFUSERS_METADATA_KEY}' key '{prefix}.alpha_pattern' is not an object")
        for pattern, value in patterns.items():
            try:
                matched = re.match(rf"(.*\.)?({pattern})$", inner)
            except re.error as exc:
                raise _Malformed(f"metadata '{DIFFUSERS_METADATA_KEY}' alpha_pattern {pattern!r} is not a valid "
                                 f"pattern ({exc})") from None
            if matched:
                alpha = number(f"{prefix}.alpha_pattern[{pattern!r}]", value)
                break
        alphas[module] = alpha
    return alphas


# ----------------------------------------------------------------------------- metadata

# An absolute path: POSIX (/home/u/x), home (~/x), Windows drive (C:\x, C:/x), UNC (\\server\x),
# or a file:// URL. The look-behind keeps relative paths (a/b) and URL paths (https://h/p) intact.
_ABSOLUTE_PATH = re.compile(
    r"(?:file://|(?<![\w.:/\\~-])(?:[A-Za-z]:[\\/]+|~[\\/]+|\\\\+|/))"  # the root
    r"[^\s\"'<>|,;*?]+"  # the rest, up to whitespace, quotes or list punctuation
)


def strip_local_paths(text: str) -> str:
    """Replace each absolute path in `text` with its base name.

    ``"/home/u/photos/dog.png"`` -> ``"dog.png"``; ``"C:\\\\Users\\\\u\\\\out"`` (as in JSON) -> ``"out"``.
    Relative paths and URLs are kept. A path containing spaces keeps the part after the first
    space; callers should not put local paths in metadata in the first place.
    """

    def base(match: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]+", match.group(0)) if p and p != "file:"]
        return parts[-1] if parts else ""

    return _ABSOLUTE_PATH.sub(base, text)


def _bounded(text: str, limit: int = MAX_NAME_CHARS) -> str:
    text = strip_local_paths(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_config(config_json: str) -> str:
    """The config JSON, scrubbed; replaced by a valid JSON note when too large (cut JSON is unreadable)."""
    text = strip_local_paths(config_json)
    size = len(text.encode("utf-8"))
    if size <= MAX_CONFIG_BYTES:
        return text
    head = text.encode("utf-8")[: MAX_CONFIG_BYTES // 2].decode("utf-8", errors="ignore")
    return json.dumps({"truncated": True, "original_bytes": size, "head": head})


def _dreamlora_version() -> str:
    # Read at call time: dreamlora/__init__.py imports this module before it sets __version__.
    import dreamlora

    if getattr(dreamlora, "__version__", None):
        return str(dreamlora.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dreamlora")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def lora_metadata(
    *,
    family: ModelFamily,
    rank: int,
    alpha: float,
    resolution: int,
    output_name: str,
    trigger_phrase: str,
    title: str,
    config_json: str,
    train_text_encoder: bool,
    date: str | None = None,
    training_comment: str | None = None,
    thumbnail: str | None = None,
) -> dict[str, str]:
    """Header entries that sd-scripts (``ss_*``) and Stability's model spec (``modelspec.*``) define.

    AUTOMATIC1111, ComfyUI and civitai read these to show the base model, rank/alpha and trigger
    phrase. Every value is a string, absolute paths are reduced to base names, and lengths are
    bounded (names 256 characters, the config 64 KiB).

    Args:
        family: Base-model family; gives ss_base_model_version, ss_v2, architecture, implementation, prediction type.
        rank: LoRA rank (ss_network_dim).
        alpha: LoRA alpha (ss_network_alpha).
        resolution: Training resolution in pixels (square).
        output_name: File stem (ss_output_name).
        trigger_phrase: The instance prompt's identifier, e.g. "sks dog".
        title: Human-readable title (modelspec.title).
        config_json: The resolved training config as JSON (dreamlora.config).
        train_text_encoder: Whether the text encoder was adapted too.
        date: ISO-8601 creation time; now (UTC, seconds) if None.
        training_comment: Free text for ss_training_comment; omitted if None.
        thumbnail: modelspec.thumbnail, a small image as a data URL (interop.thumbnail); omitted if None.

    Returns:
        Header entries, all values str.
    """
    if date is None:
        date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_train_unet_only": str(not train_text_encoder),
        **{k: v for k, v in family.file_metadata(resolution).items() if k.startswith("ss_")},
        "ss_output_name": _bounded(output_name),
        "ss_resolution": f"({int(resolution)}, {int(resolution)})",
        "modelspec.sai_model_spec": "1.0.0",
        **{k: v for k, v in family.file_metadata(resolution).items() if k.startswith("modelspec.")},
        "modelspec.title": _bounded(title),
        "modelspec.resolution": f"{int(resolution)}x{int(resolution)}",
        "modelspec.trigger_phrase": _bounded(trigger_phrase),
        "modelspec.date": _bounded(date, 64),
        "dreamlora.config": _bounded_config(config_json),
        "dreamlora.version": _dreamlora_version(),
    }
    if training_comment is not None:
        meta["ss_training_comment"] = _bounded(training_comment, MAX_COMMENT_CHARS)
    if thumbnail is not None:
        meta["modelspec.thumbnail"] = thumbnail
    return meta
