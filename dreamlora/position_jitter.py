"""Prompt position jitter: the text encoders read each training prompt at shifted token positions.

CLIP text encoders add an absolute position embedding to every token. A DreamBooth token trained in one prompt
("a photo of sks dog") is learnt at one position, and the learnt embedding and text-encoder adapters can lean on
it: on builtin:toy-dots the same prompt read a few positions further on loses much of the subject
(docs/proof-of-learning.md). Users then write the token elsewhere ("sks dog on a beach"). Shifting every token but
the start token by a random k in [-jitter, jitter] (positions kept at 1 or more) shows the token at several
positions while the words stay the training prompt's. Only CLIP encoders are shifted: T5 has no absolute
positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def shifted_position_ids(shifts: torch.Tensor, length: int, max_positions: int) -> torch.Tensor:
    """(B, length) position ids: the start token at 0, every other token i at i + shift, kept in
    [1, max_positions - 1] (so a negative shift stacks the first words on position 1)."""
    positions = torch.arange(length).expand(len(shifts), length).clone()
    positions[:, 1:] = (positions[:, 1:] + shifts[:, None]).clamp(1, max_positions - 1)
    return positions


def draw_shifts(rows: int, jitter: int, seed: int) -> torch.Tensor | None:
    """One shift a prompt, uniform in [-jitter, jitter], from a generator of its own seeded with `seed` (so a run
    without jitter draws exactly what it drew before jitter existed); None when jitter is 0."""
    if not jitter:
        return None
    return torch.randint(-jitter, jitter + 1, (rows,), generator=torch.Generator().manual_seed(seed))


def _clip_text_embeddings(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `encoder` (through any wrapper) that add CLIP's absolute position embedding."""
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    return [module for module in encoder.modules() if isinstance(module, CLIPTextEmbeddings)]


@contextmanager
def jittered_positions(text_encoders: list, shifts: torch.Tensor | None) -> Iterator[None]:
    """While inside, every CLIP text encoder of `text_encoders` reads row b of its batch at positions shifted by
    shifts[b] (`shifted_position_ids`); None changes nothing."""
    if shifts is None:
        yield
        return

    def give_positions(module, args, kwargs):
        if kwargs.get("position_ids") is not None:  # a caller that chose positions keeps them
            return args, kwargs
        tokens = kwargs.get("input_ids", args[0] if args else None)
        length = tokens.shape[-1] if tokens is not None else kwargs["inputs_embeds"].shape[-2]
        positions = shifted_position_ids(shifts, length, module.position_embedding.num_embeddings)
        return args, {**kwargs, "position_ids": positions.to(module.position_embedding.weight.device)}

    handles = [module.register_forward_pre_hook(give_positions, with_kwargs=True)
               for encoder in text_encoders for module in _clip_text_embeddings(encoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
