"""Every LoRA layout dreamlora reads, in one form (`LoraData`), and the two it writes (kohya, diffusers/peft).

Read (`read_lora`):

- kohya / sd-scripts / AUTOMATIC1111: `<stem>.lora_down.weight` (r, in[, kh, kw]), `.lora_up.weight`
  (out, r[, 1, 1]), optional `.alpha` (a module without one is applied at alpha = rank) and `.dora_scale`;
- diffusers / peft: `<component>.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (DoRA),
  with rank and alpha in the `lora_adapter_metadata` header entry (without it: alpha = rank);
- diffusers' older layout (0.14-0.21, `.safetensors` or a `.bin` state dict): `<attention>.processor.to_q_lora.
  down.weight`, `<module>.lora_linear_layer.down.weight` or `<module>.lora.down.weight`, alpha = rank;
- cloneofsimo's `lora` package: `unet:<i>:up` / `unet:<i>:down` with the targeted module classes as header JSON
  (`save_safeloras`), or a `.pt` list up, down, up, down... (`save_lora_weight`; text encoder files are named
  `*.text_encoder.pt`). Module i is the i-th Linear inside a module of a targeted class, in the model's module order,
  so these files are placed with a model's layout. Its scale is 1 (alpha = rank), folded into `up` when saved.

Pickle files (`.bin`, `.pt`) are read with `torch.load(weights_only=True)`: tensors, lists and dicts only.

Written (`write_lora`): kohya keys with a float32 `.alpha` per module, or peft keys with the adapter config diffusers
needs; the header is written sorted so equal content gives equal bytes. Each format's header says only what its
readers should believe: a diffusers file carries no kohya `ss_*` entries (AUTOMATIC1111 reads them as "kohya network,
SD 1") and a kohya file no `lora_adapter_metadata` (diffusers refuses files with both it and `.alpha` tensors). What
one format cannot say is kept under `dreamlora.*` names so a conversion back restores it exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError, ModelLoadError
from ..token_embedding import BUNDLE_PREFIX
from .keymaps import UNET, ModelLayout, Style, Target

if TYPE_CHECKING:
    from ..models.family import ModelFamily

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # as dreamlora.lora.DIFFUSERS_METADATA_KEY
KOHYA_STASH = "dreamlora.kohya_metadata"  # a diffusers file's kohya ss_* entries, for a conversion back
DIFFUSERS_STASH = "dreamlora.diffusers_adapter_metadata"  # a kohya file's peft config, likewise
ALPHA_DTYPE_STASH = "dreamlora.kohya_alpha_dtype"  # the dtype of the .alpha tensors when not float32
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude"}
_PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude",
               ".lora_magnitude_vector.weight": "magnitude"}
_ATTN_PROCS = re.compile(r"^(?P<stem>.+?)(?:_lora|\.lora_linear_layer|\.lora)\.(?P<part>down|up)\.weight$")
_CLONEOFSIMO = re.compile(r"^(?P<name>[^:.]+):(?P<index>\d+):(?P<part>up|down)$")
_CLONEOFSIMO_EMBED = "<embed>"  # the header value that marks a textual-inversion token in cloneofsimo's files
# cloneofsimo's default targets (lora_diffusion.lora): attention and GEGLU in the UNet, attention in the text encoder.
CLONEOFSIMO_UNET_TARGETS = ("CrossAttention", "Attention", "GEGLU")
CLONEOFSIMO_TEXT_TARGETS = ("CLIPAttention",)
# LyCORIS parts dreamlora does not read (LoHa, LoKr, Tucker LoCon, OFT, GLoRA, full diffs, norms).
_LYCORIS_PARTS = re.compile(r"\.(hada_|lokr_|lora_mid|oft_|a[12]\.weight|b[12]\.weight|diff|diff_b|w_norm|b_norm|"
                            r"on_input|scale$|reshape_weight)")

KOHYA_DORA_REFUSAL = (
    "the kohya format cannot carry a DoRA made with peft: AUTOMATIC1111 reads dora_scale as one magnitude per input "
    "column (peft keeps one per output row), ComfyUI and Forge divide output-row magnitudes by the base weight's norm "
    "instead of the adapted weight's, and diffusers drops dora_scale keys; use the diffusers format (--format "
    "diffusers / --to diffusers), which diffusers loads exactly"
)


@dataclass
class LoraModule:
    """One adapted module: update = (alpha / rank) * up @ down, then DoRA's magnitudes if present."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None: the file gives none, and loaders use alpha = rank
    magnitude: torch.Tensor | None = None  # DoRA: one magnitude per output row ("out") or input column ("in")
    magnitude_axis: Literal["out", "in"] | None = None
    alpha_dtype: torch.dtype | None = None  # dtype of the kohya .alpha tensor read, to write it back bit for bit

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha_value / self.rank

    def with_alpha(self, alpha: float) -> LoraModule:
        """The same update written with another alpha: the strength change is folded into `up`.

        Files dreamlora computes (combine, resize, extract) give every module one alpha: diffusers (0.42) reads a
        kohya UNet module whose alpha differs from the file's most common one at that common alpha (the alpha_pattern
        keys it builds for them do not match peft's module names).
        """
        factor = self.scale / (alpha / self.rank)
        up = (self.up.double() * factor).to(self.up.dtype)
        return replace(self, up=up, alpha=float(alpha), alpha_dtype=None)

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped like the module's weight (without DoRA)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        out = (up @ down) * self.scale
        if self.down.dim() == 4:
            return out.reshape(self.up.shape[0], *self.down.shape[1:])
        return out


@dataclass
class LoraData:
    """A LoRA file's modules, by stem in the file's own spelling, and its header."""

    style: Style
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    source: str  # the file's name, for messages
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # textual-inversion tokens some files bundle
    cloneofsimo_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # component -> targeted classes

    @property
    def has_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


# ----------------------------------------------------------------------------------------------- reading


def read_lora(path: str | Path) -> LoraData:
    """Read a LoRA file of any layout dreamlora knows (see the module docstring).

    Raises:
        ModelLoadError: the file is missing, unreadable, not a LoRA, or holds parts dreamlora does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"LoRA file '{path}' does not exist or is not a file. Check the path.")
    tensors, metadata = _read_tensors(path)
    return parse_lora(tensors, metadata, path.name)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        if suffix in PICKLE_SUFFIXES:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)  # tensors, lists, dicts only
        else:
            raise ModelLoadError(f"LoRA file '{path}' is neither .safetensors nor a PyTorch file ({', '.join(PICKLE_SUFFIXES)}).")
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors and unpickling raise many types for one cause
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"LoRA file '{path}' cannot be read ({reason}). Download or export it again.") from exc
    if isinstance(loaded, list) and all(isinstance(t, torch.Tensor) for t in loaded) and len(loaded) % 2 == 0:
        # cloneofsimo's save_lora_weight: up, down, up, down ... of one model, named by the file
        name = "text_encoder" if ".text_encoder" in path.name else "unet"
        targets = CLONEOFSIMO_TEXT_TARGETS if name == "text_encoder" else CLONEOFSIMO_UNET_TARGETS
        tensors = {f"{name}:{i // 2}:{'up' if i % 2 == 0 else 'down'}": t for i, t in enumerate(loaded)}
        return tensors, {name: json.dumps(list(targets))}
    if isinstance(loaded, dict) and loaded and all(isinstance(t, torch.Tensor) for t in loaded.values()):
        return dict(loaded), {}
    raise ModelLoadError(f"LoRA file '{path}' holds a {type(loaded).__name__}, not a state dict of tensors.")


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraData:
    """Group a LoRA state dict's tensors by module.

    Raises:
        ModelLoadError: no LoRA keys, keys of two layouts at once, LyCORIS parts, or a module lacking a weight.
    """
    if tensors and all(_CLONEOFSIMO.match(k) or metadata.get(k) == _CLONEOFSIMO_EMBED for k in tensors):
        return _parse_cloneofsimo(tensors, metadata, source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    styles: dict[str, str] = {}  # style -> an example key
    embeddings: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):  # AUTOMATIC1111's embeddings bundled into a LoRA file
            embeddings[key.removeprefix(BUNDLE_PREFIX)] = tensor
            continue
        style, stem, part = _split_key(key)
        if style is None:
            if _LYCORIS_PARTS.search(key):
                raise ModelLoadError(f"LoRA file '{source}': key '{key}' is a LyCORIS part (LoHa, LoKr, LoCon mid, "
                                     "OFT, ...) that dreamlora does not read; it reads plain LoRA files.")
            raise ModelLoadError(f"LoRA file '{source}': key '{key}' is not a LoRA weight of any layout dreamlora "
                                 "reads (kohya lora_down/lora_up, diffusers lora_A/lora_B). Is it a LoRA file?")
        if style != "any":
            styles.setdefault(style, key)
        parts.setdefault(stem, {})[part] = tensor
    if not styles:
        raise ModelLoadError(f"LoRA file '{source}' holds no LoRA weights ({len(tensors)} tensors). "
                             "Is it a full model rather than a LoRA?")
    if len(styles) > 1:
        examples = ", ".join(f"'{k}' ({s})" for s, k in styles.items())
        raise ModelLoadError(f"LoRA file '{source}' mixes key layouts ({examples}); no tool reads such a file. "
                             "Export it again from the tool that made it.")
    style = next(iter(styles))
    config = _adapter_config(metadata, source) if style == "peft" else {}
    modules = {stem: _module(stem, p, style, config, source) for stem, p in parts.items()}
    return LoraData(style=style, modules=modules, metadata=dict(metadata), source=source,  # type: ignore[arg-type]
                    embeddings=embeddings)


def _split_key(key: str) -> tuple[str | None, str, str]:
    """(style, stem, part) of one key; style None when the key fits no layout."""
    stem, dot, rest = key.partition(".")
    if dot and "." not in stem and rest in _KOHYA_PARTS and stem.startswith("lora_"):
        return "kohya", stem, _KOHYA_PARTS[rest]
    for suffix, part in _PEFT_PARTS.items():
        if key.endswith(suffix):
            return "peft", key[: -len(suffix)], part
    if m := _ATTN_PROCS.match(key):
        return "attn-procs", m["stem"], m["part"]
    if key.endswith(".alpha") and "." in key[:-6]:  # an alpha beside diffusers-style keys (some converters write it)
        return "any", key[:-6], "alpha"
    return None, key, ""


def _adapter_config(metadata: dict[str, str], source: str) -> dict:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"LoRA file '{source}': header '{DIFFUSERS_METADATA_KEY}' is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"LoRA file '{source}': header '{DIFFUSERS_METADATA_KEY}' is not a JSON object.")
    return config


def _peft_alpha(stem: str, rank: int, config: dict) -> float | None:
    """The alpha peft gives a module (alpha_pattern, then lora_alpha), as kohya's alpha (rsLoRA: alpha * sqrt(r))."""
    component, _, inner = stem.partition(".")
    if f"{component}.lora_alpha" not in config:
        return None
    alpha = float(config[f"{component}.lora_alpha"])
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", inner):
            alpha = float(value)
            break
    if config.get(f"{component}.use_rslora"):
        alpha *= math.sqrt(rank)  # peft scales by alpha / sqrt(r); kohya loaders by alpha / r
    return alpha


def _module(stem: str, parts: dict[str, torch.Tensor], style: str, config: dict, source: str) -> LoraModule:
    missing = [p for p in ("down", "up") if p not in parts]
    if missing:
        raise ModelLoadError(f"LoRA file '{source}': module '{stem}' has no {missing[0]} weight. "
                             "The file is incomplete; export it again.")
    down, up = parts["down"], parts["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
        raise ModelLoadError(f"LoRA file '{source}': module '{stem}' has down {tuple(down.shape)} and up "
                             f"{tuple(up.shape)}, which do not multiply (up is (out, rank), down (rank, in)).")
    module = LoraModule(down=down, up=up)
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1 or not math.isfinite(float(alpha.reshape(()).item())):
            raise ModelLoadError(f"LoRA file '{source}': '{stem}.alpha' must be one finite number "
                                 f"(shape {tuple(alpha.shape)}).")
        module.alpha, module.alpha_dtype = float(alpha.reshape(()).item()), alpha.dtype
    elif style == "peft":
        module.alpha = _peft_alpha(stem, module.rank, config)
    if "magnitude" in parts:
        module.magnitude = parts["magnitude"]
        module.magnitude_axis = _magnitude_axis(stem, module, style, source)
    return module


def _magnitude_axis(stem: str, module: LoraModule, style: str, source: str) -> Literal["out", "in"]:
    out, inputs = int(module.up.shape[0]), int(module.down.shape[1])
    shape = tuple(module.magnitude.shape)
    if style == "peft" and module.magnitude.numel() == out:
        return "out"
    squeezed = [n for n in shape if n != 1]
    if shape and shape[0] == out and squeezed in ([out], []) and module.magnitude.numel() == out:
        return "out"  # (out, 1[, 1, 1]): LyCORIS' wd_on_out, peft's own axis
    if shape and shape[0] == 1 and module.magnitude.numel() == inputs:
        return "in"  # (1, in[, 1, 1]): the DoRA paper's / LyCORIS' default axis
    raise ModelLoadError(f"LoRA file '{source}': DoRA scale of '{stem}' has shape {shape}, which is neither "
                         f"({out}, 1) per output row nor (1, {inputs}) per input column.")


def _parse_cloneofsimo(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraData:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embeddings = {}
    for key, tensor in tensors.items():
        m = _CLONEOFSIMO.match(key)
        if not m:
            embeddings[key] = tensor
            continue
        parts.setdefault(f"{m['name']}:{m['index']}", {})[m["part"]] = tensor
    classes = {}
    for name in {stem.split(":")[0] for stem in parts}:
        try:
            classes[name] = tuple(json.loads(metadata[name]))
        except (KeyError, json.JSONDecodeError, TypeError):
            raise ModelLoadError(f"LoRA file '{source}': cloneofsimo keys '{name}:*' without the header entry '{name}' "
                                 "naming the targeted module classes; export it again with lora_diffusion.") from None
    # Its scale (1 by default) is folded into `up` when saved: alpha = rank.
    modules = {stem: _module(stem, p, "cloneofsimo", {}, source) for stem, p in parts.items()}
    return LoraData(style="cloneofsimo", modules=modules, metadata=dict(metadata), source=source,
                    embeddings=embeddings, cloneofsimo_classes=classes)


# ----------------------------------------------------------------------------------------------- re-keying


def to_targets(data: LoraData, layout: ModelLayout) -> dict[Target, LoraModule]:
    """The file's modules keyed by the base model's module they adapt.

    Raises:
        CompatibilityError: stems that name no module of the model (listed), or a cloneofsimo file whose numbering
            does not fit the model.
    """
    from .check import CompatibilityError

    if data.style == "cloneofsimo":
        return _cloneofsimo_targets(data, layout)
    out: dict[Target, LoraModule] = {}
    unknown = []
    for stem, module in data.modules.items():
        target = layout.read(data.style, stem)
        if target is None:
            unknown.append(stem)
        else:
            out[target] = module
    if unknown:
        raise CompatibilityError(f"'{data.source}': {len(unknown)} of {len(data.modules)} modules name no module of "
                                 f"the base model: {_some(unknown)}. Misspelt, or made for another model: pass the "
                                 "--model it was trained on.")
    return out


def from_targets(modules: dict[Target, LoraModule], layout: ModelLayout, style: Style) -> dict[str, LoraModule]:
    """Modules keyed by the stems `style` spells them with on this model."""
    return {layout.stem(target, style): module for target, module in sorted(modules.items())}


def _cloneofsimo_targets(data: LoraData, layout: ModelLayout) -> dict[Target, LoraModule]:
    from .check import CompatibilityError

    out: dict[Target, LoraModule] = {}
    for name, classes in data.cloneofsimo_classes.items():
        component = {"unet": UNET, "text_encoder": layout.components[1] if len(layout.components) > 1 else ""}.get(name)
        if component not in layout.order:
            raise CompatibilityError(f"'{data.source}': cloneofsimo part '{name}' is neither unet nor text_encoder "
                                     "of this model.")
        count = sum(1 for stem in data.modules if stem.startswith(f"{name}:"))
        files = [data.modules[f"{name}:{i}"] for i in range(count) if f"{name}:{i}" in data.modules]
        if len(files) != count:
            raise CompatibilityError(f"'{data.source}': cloneofsimo part '{name}' skips an index; the file is incomplete.")
        with_conv = any(m.down.dim() == 4 for m in files)
        orders = cloneofsimo_orders(layout, component, set(classes), with_conv)
        fits = [order for order in orders if len(order) == count and all(
            _fits(m, layout.modules[t]) for m, t in zip(files, order))]
        if not fits:
            sizes = sorted({len(o) for o in orders})
            raise CompatibilityError(
                f"'{data.source}': its {count} {name} modules do not match the {'/'.join(sizes and map(str, sizes))} "
                f"layers inside the model's {', '.join(sorted(classes))} modules (in number or shape). Pass the "
                "--model it was trained on.")
        out.update({target: module for target, module in zip(fits[0], files)})
    return out


def cloneofsimo_orders(layout: ModelLayout, component: str, classes: set[str], with_conv: bool) -> list[list[Target]]:
    """The module order cloneofsimo's files number, for today's diffusers and for the diffusers it was written with.

    Its i-th module is the i-th Linear (and Conv2d, for its extended targets) inside a module of a targeted class, in
    module order. diffusers before 0.12 registered a transformer block's feed-forward between its two attentions
    (attn1, ff, attn2); today it comes last. Both orders are tried, the one whose shapes fit wins.
    """
    listed = layout.order[component]
    kinds = {"Linear", "Conv2d"} if with_conv else {"Linear"}
    ancestors = [path for path, cls in listed if cls in classes]

    def inside(ancestor: str) -> list[Target]:
        prefix = ancestor + "."
        return [Target(component, p) for p, c in listed if p.startswith(prefix) and c in kinds
                and Target(component, p) in layout.modules]

    def legacy(paths: list[str]) -> list[str]:
        done, out = set(), []
        for path in paths:
            if path in done:
                continue
            m = re.fullmatch(r"(.*\.transformer_blocks\.\d+)\.attn1", path)
            group = [path]
            if m:
                group += [p for p in (f"{m[1]}.ff.net.0", f"{m[1]}.attn2") if p in paths]
            for p in group:
                if p not in done:
                    done.add(p)
                    out.append(p)
        return out

    modern = [t for a in ancestors for t in inside(a)]
    older = [t for a in legacy(ancestors) for t in inside(a)]
    return [modern] if older == modern else [modern, older]


def _fits(module: LoraModule, info) -> bool:
    shape = info.shape
    return int(module.up.shape[0]) == shape[0] and int(module.down.shape[1]) == shape[1] and \
        (module.down.dim() == 2) == (info.kind == "linear")


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------------- writing


def state_dict(modules: dict[str, LoraModule], style: Style) -> dict[str, torch.Tensor]:
    """The tensors of a kohya or peft file (contiguous CPU copies; weights keep their dtype).

    Raises:
        ConfigError: a DoRA module in the kohya format, or an input-column DoRA in the peft format.
    """
    out: dict[str, torch.Tensor] = {}
    for stem, m in modules.items():
        if style == "kohya":
            if m.magnitude is not None:
                raise ConfigError(f"'{stem}': {KOHYA_DORA_REFUSAL}.")
            out[f"{stem}.lora_down.weight"] = _cpu(m.down)
            out[f"{stem}.lora_up.weight"] = _cpu(m.up)
            if m.alpha is not None:
                out[f"{stem}.alpha"] = torch.tensor(m.alpha, dtype=m.alpha_dtype or torch.float32)
        elif style == "peft":
            out[f"{stem}.lora_A.weight"] = _cpu(m.down)
            out[f"{stem}.lora_B.weight"] = _cpu(m.up)
            if m.magnitude is not None:
                if m.magnitude_axis != "out":
                    raise ConfigError(
                        f"'{stem}': its DoRA scale holds one magnitude per input column (the DoRA paper's and "
                        "LyCORIS' default), and peft's DoRA one per output row: no diffusers file can carry it. "
                        "Keep it in the kohya format, which AUTOMATIC1111 and ComfyUI read.")
                # peft's layout: (out,) for Linear, (1, out, 1, 1) for Conv2d; named with the .weight its module has,
                # the only spelling diffusers' text-encoder path (transformers 5.x) loads (lora.to_diffusers_state_dict)
                shape = (1, -1, 1, 1) if m.down.dim() == 4 else (-1,)
                out[f"{stem}.lora_magnitude_vector.weight"] = _cpu(m.magnitude.reshape(shape))
        else:
            raise ValueError(f"dreamlora writes kohya or peft files, not {style!r}")
    return out


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().clone()


def peft_adapter_config(modules: dict[str, LoraModule]) -> dict[str, object]:
    """The flattened peft config diffusers rebuilds adapters from: `{"unet.r": 4, "unet.lora_alpha": 4.0, ...}`.

    Per component the most common rank and alpha are the defaults and every other module is a rank_pattern /
    alpha_pattern entry. Module names in targets and patterns leave out `text_model.`, which transformers 5.x's
    CLIPTextModel lacks: peft matches them as suffixes either way.
    """
    config: dict[str, object] = {}
    by_component: dict[str, dict[str, LoraModule]] = {}
    for stem, module in modules.items():
        component, _, inner = stem.partition(".")
        by_component.setdefault(component, {})[inner.removeprefix("text_model.")] = module
    for component, members in sorted(by_component.items()):
        rank = Counter(m.rank for m in members.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha_value for m in members.values()).most_common(1)[0][0]
        config.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(members),
            f"{component}.rank_pattern": {n: m.rank for n, m in sorted(members.items()) if m.rank != rank},
            f"{component}.alpha_pattern": {n: m.alpha_value for n, m in sorted(members.items())
                                           if m.alpha_value != alpha},
            f"{component}.lora_dropout": 0.0,
            f"{component}.bias": "none",
            f"{component}.use_rslora": False,
            f"{component}.use_dora": any(m.magnitude is not None for m in members.values()),
        })
    return config


def header_for(style: Style, metadata: dict[str, str], modules: dict[str, LoraModule], *,
               family: ModelFamily | None = None, adapter_config: dict | None = None) -> dict[str, str]:
    """The header of a `style` file made from a file (or training run) whose header is `metadata`.

    kohya: `ss_*` entries (restored from a diffusers file's stash; the family's and the modules' basics fill the
    gaps); a diffusers config that says more than the modules' ranks and alphas moves to
    `dreamlora.diffusers_adapter_metadata`. peft: no `ss_*`/`sshs_*` entries (kept under `dreamlora.kohya_metadata`),
    `modelspec.implementation` = diffusers, and the adapter config (a stashed one when it says the same ranks and
    alphas, so conversions round-trip exactly). `write_lora` adds the `sshs_*` hashes of kohya files.

    Args:
        style: "kohya" or "peft".
        metadata: The source header.
        modules: The modules as they will be written, keyed by `style`'s stems.
        family: The base model's family, for kohya's version entries and modelspec.implementation.
        adapter_config: peft: the config to write (default: `peft_adapter_config(modules)`); kohya: the config a
            peft file of these modules would get, to tell whether a stashed one carries more.
    """
    drop = {DIFFUSERS_METADATA_KEY, DIFFUSERS_STASH, KOHYA_STASH, ALPHA_DTYPE_STASH, "format"}
    header = {k: v for k, v in metadata.items() if k not in drop and not k.startswith(("ss_", "sshs_"))}
    kohya_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    if KOHYA_STASH in metadata:
        try:
            kohya_meta = {**json.loads(metadata[KOHYA_STASH]), **kohya_meta}
        except (json.JSONDecodeError, TypeError):
            pass
    stashed = metadata.get(DIFFUSERS_METADATA_KEY) or metadata.get(DIFFUSERS_STASH)
    if style == "kohya":
        header.update(kohya_meta)
        if family is not None:
            own = family.file_metadata(_resolution(metadata))
            for key, value in own.items():
                if key.startswith("ss_"):
                    header.setdefault(key, value)
            if "modelspec.implementation" in own and any(k.startswith("modelspec.") for k in header):
                header["modelspec.implementation"] = own["modelspec.implementation"]  # says how the keys are named
        ranks = {m.rank for m in modules.values()}
        alphas = {m.alpha_value for m in modules.values()}
        header.setdefault("ss_network_module", "networks.lora")
        header.setdefault("ss_network_dim", str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
        header.setdefault("ss_network_alpha", str(alphas.pop()) if len(alphas) == 1 else "Dynamic")
        header.setdefault("ss_network_train_unet_only", str(all(s.startswith("lora_unet") for s in modules)))
        if stashed and not (adapter_config is not None and _same_json(stashed, adapter_config)):
            header[DIFFUSERS_STASH] = stashed
        return header
    if kohya_meta:
        header[KOHYA_STASH] = json.dumps(kohya_meta, sort_keys=True)
    dtypes = {m.alpha_dtype for m in modules.values() if m.alpha_dtype not in (None, torch.float32)}
    if dtypes:  # sd-scripts saves .alpha in the weights' dtype; a conversion back writes it so again
        header[ALPHA_DTYPE_STASH] = str(dtypes.pop()).removeprefix("torch.")
    elif ALPHA_DTYPE_STASH in metadata:
        header[ALPHA_DTYPE_STASH] = metadata[ALPHA_DTYPE_STASH]
    if any(k.startswith("modelspec.") for k in header):
        header["modelspec.implementation"] = "diffusers"
    adapter = peft_adapter_config(modules) if adapter_config is None else adapter_config
    header[DIFFUSERS_METADATA_KEY] = json.dumps(adapter, indent=2, sort_keys=True)
    if stashed and _same_adapter(stashed, peft_adapter_config(modules)):
        header[DIFFUSERS_METADATA_KEY] = stashed
    return header


def _same_json(text: str, value: dict) -> bool:
    try:
        return json.loads(text) == json.loads(json.dumps(value))
    except json.JSONDecodeError:
        return False


def restore_alpha_dtype(modules: dict[str, LoraModule], metadata: dict[str, str]) -> dict[str, LoraModule]:
    """Give the modules back the .alpha dtype a kohya file had before it became a diffusers file."""
    name = metadata.get(ALPHA_DTYPE_STASH)
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        return modules
    return {stem: replace(m, alpha_dtype=dtype) if m.alpha is not None else m for stem, m in modules.items()}


def _same_adapter(stashed: str, adapter: dict) -> bool:
    """A stashed config describes the same ranks, alphas and DoRA as the modules (then it may be written back)."""
    try:
        old = json.loads(stashed)
    except json.JSONDecodeError:
        return False
    keys = [k for k in adapter if k.endswith((".r", ".lora_alpha", ".rank_pattern", ".alpha_pattern", ".use_dora"))]
    if any(k.endswith(".use_rslora") and v for k, v in old.items()):
        return False
    norm = {k: v for k, v in old.items() if k in keys}
    norm = {k: ({p.removeprefix("text_model."): x for p, x in v.items()} if isinstance(v, dict) else v)
            for k, v in norm.items()}
    return all(_close(norm.get(k), adapter[k]) for k in keys)


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _resolution(metadata: dict[str, str]) -> int:
    m = re.match(r"(\d+)", metadata.get("modelspec.resolution", ""))
    return int(m[1]) if m else 512


def write_lora(path: str | Path, modules: dict[str, LoraModule], style: Style, header: dict[str, str]) -> Path:
    """Write a kohya or peft LoRA file atomically, with a sorted header (kohya: with sd-scripts' sshs_* hashes).

    Raises:
        ConfigError: `path` does not end in .safetensors, or the modules cannot be written in `style`.
        DreamLoraError: the disk filled up.
    """
    from ..atomic import write_bytes_atomic
    from .hashes import addnet_hashes

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"output '{path}' must end in .safetensors (the only format dreamlora writes).")
    tensors = state_dict(modules, style)
    header = {**header, "format": "pt"}
    if style == "kohya":
        header["sshs_model_hash"], header["sshs_legacy_hash"] = addnet_hashes(tensors, header)
    write_bytes_atomic(path, safetensors_bytes(tensors, header))
    return path


def safetensors_bytes(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted: equal content, equal bytes (safetensors itself writes its
    metadata in hash-map order, which changes from process to process)."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=header)
    length = int.from_bytes(data[:8], "little")
    parsed = json.loads(data[8:8 + length])
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + length:]
