"""A small CLIP tokenizer for the built-in models, made from a word list.

The files follow OpenAI CLIP's byte-level BPE layout, so `transformers.CLIPTokenizer.from_pretrained`
loads them as it loads SD 1.5's tokenizer:

- vocab.json: the 256 byte characters, the same 256 with `</w>` (end of word), then one entry per
  merge result in merge order, then `<|startoftext|>` and `<|endoftext|>` last.
- merges.txt: a `#version` line, then one merge ("left right") a line, lowest rank first.

Merges are generated so that every listed word becomes exactly one token; any other text still
tokenizes, falling back to smaller pieces and in the end to single byte characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; the text encoder has this many position embeddings

# Words of typical DreamBooth prompts, class nouns and sampling prompts; each becomes one token.
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "photo", "of", "on", "the", "in", "with", "and", "at", "by", "for", "to", "is",
    "beach", "background", "red", "green", "blue", "yellow", "white", "black", "orange", "purple",
    "pink", "gray", "grey", "brown", "ball", "cube", "cup", "star", "dog", "cat", "toy", "plush",
    "sneaker", "shoe", "shoes", "person", "man", "woman", "face", "portrait", "car", "house", "tree",
    "table", "grass", "snow", "city", "forest", "mountain", "water", "sky", "room", "street", "floor",
    "wearing", "hat", "sitting", "standing", "painting", "style", "close", "up", "picture", "image",
    "high", "quality", "small", "large", "big", "left", "right", "top", "bottom", "center", "pattern",
    "dots", "polka", "striped", "spotted", "checkered", "plain", "bright", "dark", "light", "wooden",
    "sunny", "night", "day", "studio", "render", "drawing", "sketch", "oil", "watercolor", "art",
    "detailed", "sharp", "blurry", "low", "ugly", "bad", "best",
)
# Rare identifier tokens people bind a subject to; each is one piece, like "sks" in CLIP's vocabulary.
RARE_TOKENS: tuple[str, ...] = ("sks", "ohwx", "zwx", "xyz", "bnha")
DEFAULT_WORDS: tuple[str, ...] = PROMPT_WORDS + RARE_TOKENS

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table used by byte-level BPE (GPT-2 and CLIP share it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)  # bytes with no printable glyph get code points past 255
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _word_symbols(word: str) -> list[str]:
    """Initial BPE symbols of a word: its byte characters, the last one marked as end of word."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return chars


def bpe_segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split a word the way CLIP's BPE does: repeatedly merge the adjacent pair of lowest rank."""
    symbols = _word_symbols(word)
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):  # no known merge left
            break
        left, right = symbols[i], symbols[i + 1]
        merged: list[str] = []
        j = 0
        # Merge every occurrence of the pair, as the reference implementation does.
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == left and symbols[j + 1] == right:
                merged.append(left + right)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def build_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges, lowest rank first, that turn each word into a single token.

    Each new merge gets the highest rank so far. A word that already is one token has no pair left
    to merge, and in every earlier step of its segmentation a lower-ranked merge was available, so
    adding merges for later words never changes how earlier words split.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word or word != word.lower() or any(c.isspace() for c in word):
            raise ValueError(f"tokenizer word {word!r} must be a non-empty lower-case word without spaces")
        while len(symbols := bpe_segment(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's order: bytes, bytes + `</w>`, merge results, then the two specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer_files(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> int:
    """Write a CLIPTokenizer folder for `words` and return its vocabulary size.

    Args:
        folder: Where to write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.
        words: Words that must each become one token (lower case, no spaces).

    Returns:
        The number of entries in vocab.json; the text encoder's vocab_size must be at least this.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = build_merges(words)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return len(vocab)


def load_tokenizer(folder: str | Path):
    """Load a tokenizer folder written by `write_tokenizer_files` (a `transformers.CLIPTokenizer`)."""
    from transformers import CLIPTokenizer  # heavy import, only when a tokenizer is needed

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# --- T5 (SD3's third encoder, Flux's sequence encoder) ------------------------------------------------------------

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's own vocabulary (pad 0, eos 1)
T5_WORD_START = "▁"  # SentencePiece's word-boundary mark
T5_MAX_LENGTH = 512  # T5's tokenizer_config model_max_length; the pipelines cut prompts to their own length


def write_t5_tokenizer_files(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS) -> int:
    """Write a T5 tokenizer folder (tokenizer.json, tokenizer_config.json) for `words` and return its size.

    A Unigram vocabulary as T5's SentencePiece model has: the specials, each word with its word-start mark as one
    piece (scored above anything else, so it is chosen whole), then the mark and single characters as the fallback
    every other text tokenizes into. Built with the tokenizers library alone: no sentencepiece, no hub.
    """
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"))
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(T5_WORD_START + w, -1.0) for w in words]
    vocab += [(T5_WORD_START, -2.0)] + [(c, -5.0) for c in characters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def load_t5_tokenizer(folder: str | Path):
    """Load a folder written by `write_t5_tokenizer_files` (a `transformers.T5TokenizerFast`)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
