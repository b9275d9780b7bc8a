"""The subject token's own embedding, learnt beside the LoRA (pivotal tuning), and carried in the LoRA file.

Plain DreamBooth leaves the token's input embedding where the text encoder's pretraining left it: for a rare
token, a vector the encoder never learnt to read. The adapters then learn the subject from the training phrase
as a whole, and on a small text encoder the subject stays bound to that phrase ("a photo of sks ball" shows it,
"a sks ball on a white background" does not: docs/proof-of-learning.md, "Letting the token carry the subject"). Learning
the token's own vectors (textual inversion, as diffusers' advanced DreamBooth script and OneTrainer do) makes
the token itself carry the subject.

The vectors live in a small module hung on the text encoder's input-embedding layer, with a forward hook that
puts them where the token's ids stand; every other row of the vocabulary stays the frozen base row, and
`scale` 0 gives the base model's embedding exactly. In the LoRA file they are AUTOMATIC1111's bundled
embedding keys (`bundle_emb.<token>.string_to_param.*` for one text encoder, `.clip_l` / `.clip_g` for two), which
it registers as the embedding named by the token. diffusers' `load_lora_weights` refuses keys without 'lora'
in them; `dreamlora.sampling.attach_lora` loads such files (embedding included), and `dreamlora convert` writes
the adapters alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import describe
from .errors import ConfigError, ModelLoadError

HOLDER = "dreamlora_token"  # the child module's name on the input-embedding layer
BUNDLE_PREFIX = "bundle_emb."
# AUTOMATIC1111's names of a bundled embedding's parts: one text encoder (SD 1.x/2.x), or SDXL's two.
_ONE_ENCODER_PART = "string_to_param.*"
_TWO_ENCODER_PARTS = ("clip_l", "clip_g")


class LearnedToken(torch.nn.Module):
    """The learnt input vectors of a token's ids in one text encoder; `scale` blends them with the base rows."""

    def __init__(self, ids: list[int], vectors: torch.Tensor):
        super().__init__()
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"{len(ids)} token ids but {vectors.shape[0]} vectors")
        self.ids = tuple(ids)  # plain ints: the hook compares with them every forward, with no device sync
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())  # (pieces, hidden)
        self.scale = 1.0  # 0: the base embedding exactly; 1: the learnt vectors exactly


def _substitute(layer: torch.nn.Embedding, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the input-embedding layer: the learnt vectors where the token's ids stand."""
    holder: LearnedToken = getattr(layer, HOLDER)
    if holder.scale == 0:
        return output
    input_ids = args[0]  # (batch, length)
    for piece, token_id in enumerate(holder.ids):
        vector = holder.vectors[piece]
        if holder.scale != 1:
            vector = torch.lerp(layer.weight[token_id].to(vector.dtype), vector, holder.scale)
        output = torch.where((input_ids == token_id).unsqueeze(-1), vector.to(output.dtype), output)
    return output  # (batch, length, hidden)


def token_ids(tokenizer, token: str) -> list[int]:
    """The ids of the token's pieces, without special tokens: one for 'sks' in CLIP's vocabulary."""
    return list(tokenizer(token, add_special_tokens=False).input_ids)


def initial_vectors(text_encoder: torch.nn.Module, tokenizer, pieces: int, words: str | None) -> torch.Tensor | None:
    """The learnt token's starting vectors: None (its own base rows) without `words`; else, for each of the
    token's `pieces`, the mean base row of the words (kohya's --init_word, diffusers' initializer concept): a rare
    token starts where a describing word already points the encoder.

    Raises:
        ConfigError: a word is not one whole entry of the tokenizer's vocabulary (a word it splits into pieces
            has no vector of its own: the mean of its letters' rows means nothing).
    """
    if words is None:
        return None
    ids = []
    for word in words.split():
        word_ids = token_ids(tokenizer, word)
        if len(word_ids) != 1:
            raise ConfigError(f"{describe('lora.token_init')}: '{word}' is not a word of the text encoder's "
                              f"vocabulary (it splits into {len(word_ids)} pieces): give words it knows whole, "
                              "e.g. the subject's colour or pattern")
        ids += word_ids
    rows = text_encoder.get_input_embeddings().weight.detach()[ids].float()
    return rows.mean(0, keepdim=True).expand(pieces, -1)


def attach_learned_token(text_encoder: torch.nn.Module, ids: list[int], vectors: torch.Tensor | None = None,
                         trainable: bool = False) -> LearnedToken:
    """Hang learnt vectors for `ids` on the encoder's input embedding (replacing any there); from the base rows
    when `vectors` is None (the start of training)."""
    detach_learned_token(text_encoder)
    layer = text_encoder.get_input_embeddings()
    start = layer.weight.detach()[ids] if vectors is None else vectors
    holder = LearnedToken(ids, start.to(layer.weight.device)).to(layer.weight.device)
    holder.vectors.requires_grad_(trainable)
    layer.add_module(HOLDER, holder)
    holder.hook = layer.register_forward_hook(_substitute)  # a plain attribute: not a parameter or buffer
    return holder


def learned_token(text_encoder: torch.nn.Module) -> LearnedToken | None:
    return getattr(text_encoder.get_input_embeddings(), HOLDER, None)


def detach_learned_token(text_encoder: torch.nn.Module) -> None:
    layer = text_encoder.get_input_embeddings()
    holder = getattr(layer, HOLDER, None)
    if holder is not None:
        holder.hook.remove()
        delattr(layer, HOLDER)


def learned_token_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [m.vectors for module in modules for m in module.modules() if isinstance(m, LearnedToken)]


def set_learned_token_scale(modules: Iterable[torch.nn.Module], scale: float) -> None:
    """Follow a LoRA scale: 0 is the base embedding, 1 the learnt one (between: a linear blend)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, LearnedToken):
                m.scale = float(scale)


def bundle_tensors(text_encoders: list[torch.nn.Module], token: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's `bundle_emb.*` tensors for the learnt vectors of these encoders ({} when none learnt any)."""
    learnt = [learned_token(te) for te in text_encoders]
    learnt = learnt[:max((i + 1 for i, h in enumerate(learnt) if h is not None), default=0)]
    if not learnt:
        return {}
    if any(h is None for h in learnt) or len(learnt) > len(_TWO_ENCODER_PARTS):
        raise ValueError(f"learnt token vectors in text encoders {[h is not None for h in learnt]}: the file "
                         "format holds them for the first text encoder, or the first two")
    parts = [_ONE_ENCODER_PART] if len(learnt) == 1 else list(_TWO_ENCODER_PARTS)
    return {f"{BUNDLE_PREFIX}{token}.{part}": h.vectors.detach().to("cpu", dtype).contiguous()
            for part, h in zip(parts, learnt)}


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """(the LoRA tensors, {token: vectors per text encoder}) of a file's tensors.

    Raises:
        ModelLoadError: a bundled embedding whose parts are not those of one or two text encoders.
    """
    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, part = key.removeprefix(BUNDLE_PREFIX).partition(".")
            parts.setdefault(token, {})[part] = value
    bundles = {}
    for token, found in parts.items():
        if set(found) == {_ONE_ENCODER_PART}:
            bundles[token] = [found[_ONE_ENCODER_PART]]
        elif set(found) == set(_TWO_ENCODER_PARTS):
            bundles[token] = [found[p] for p in _TWO_ENCODER_PARTS]
        else:
            raise ModelLoadError(f"the bundled embedding '{token}' has parts {sorted(found)}; dreamlora reads "
                                 f"'{_ONE_ENCODER_PART}' or {' and '.join(_TWO_ENCODER_PARTS)}")
        if any(v.ndim != 2 for v in bundles[token]):
            raise ModelLoadError(f"the bundled embedding '{token}' is not (vectors, hidden) shaped")
    return lora, bundles


def attach_bundles(bundles: dict[str, list[torch.Tensor]], tokenizers: list, text_encoders: list[torch.nn.Module],
                   source: str) -> None:
    """Put a file's bundled embeddings into the pipeline's text encoders (the first one or two).

    Raises:
        ModelLoadError: more than one token bundled, or vectors that do not fit the token's pieces or the encoder.
    """
    if len(bundles) > 1:
        raise ModelLoadError(f"'{source}' bundles embeddings of {len(bundles)} tokens ({', '.join(sorted(bundles))}); "
                             "dreamlora loads one, the subject's token")
    for token, vectors in bundles.items():
        if len(vectors) > len(text_encoders):
            raise ModelLoadError(f"'{source}' holds the token '{token}' for {len(vectors)} text encoders; this "
                                 f"model has {len(text_encoders)}. Pass the --model it was trained on.")
        for tokenizer, encoder, rows in zip(tokenizers, text_encoders, vectors):
            ids = token_ids(tokenizer, token)
            hidden = encoder.get_input_embeddings().weight.shape[1]
            if rows.shape != (len(ids), hidden):
                raise ModelLoadError(f"'{source}': the embedding of '{token}' is {tuple(rows.shape)}, and this model "
                                     f"needs ({len(ids)}, {hidden}) (the token's pieces x the text encoder's width). "
                                     "Pass the --model it was trained on.")
            attach_learned_token(encoder, ids, rows)
