"""Aspect-ratio buckets, as kohya's sd-scripts make them: train on whole pictures instead of square crops.

Buckets are (width, height) sizes in steps of `step` px whose area is at most resolution² (the pixel budget
of a square crop), from portrait to landscape. Each image goes to the bucket nearest its aspect ratio, is
resized to cover it and centre-cropped to it (so little is cut), and is encoded once at that size. Every batch
holds images of one bucket, since a batch is one tensor. An image the bucket would enlarge by more than
`max_upscale` gets a bucket of its own size (times the factor) instead, rounded down to the step, as
sd-scripts' --bucket_no_upscale does; images of that size share it.

The batch order is a pure function of (seed, epoch): each epoch shuffles every bucket's images, cuts them into
batches and shuffles the batches, so any step's batch is known without state and a resume draws the same ones.
"""

from __future__ import annotations

import functools
import math

import torch
from PIL import Image


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height) with sides in multiples of `step`, area <= resolution², sides between about half and
    twice the resolution, from the widest to the tallest."""
    low = max(step, resolution // 2 // step * step)
    high = resolution * 2
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes, key=lambda s: (-s[0] / s[1], s))


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], step: int,
                  max_upscale: float) -> tuple[int, int]:
    """The (width, height) bucket of an image of `size` (width, height): the nearest aspect ratio, or the image's
    own size (times `max_upscale`, rounded down to the step) when that bucket would enlarge it more."""
    width, height = size
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if max(best[0] / width, best[1] / height) <= max_upscale:
        return best
    scale = max_upscale
    own = (max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))
    return own


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover the bucket and centre-crop to it.

    Returns:
        (3, bucket height, bucket width) in [-1, 1], and the crop's (top, left) in the resized image (SDXL's
        crop condition).
    """
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
    pixels = data.view(height, width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0, (top, left)


def group_by_bucket(assigned: list[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """{bucket: the indices of its images, ascending}, buckets in sorted order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(assigned):
        groups.setdefault(bucket, []).append(i)
    return dict(sorted(groups.items()))


@functools.lru_cache(maxsize=16)
def epoch_batches(groups: tuple[tuple[int, ...], ...], batch_size: int, seed: int,
                  epoch: int) -> tuple[tuple[int, ...], ...]:
    """The batches of one epoch: each group's images shuffled and cut into batches of `batch_size` (the last of a
    group may be smaller), then all batches shuffled. Every image appears once; no batch mixes groups."""
    from .data import derive_seed

    batches = []
    for g, members in enumerate(groups):
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(
            derive_seed(seed, "bucket", epoch, g))).tolist()
        shuffled = [members[i] for i in order]
        batches += [tuple(shuffled[i:i + batch_size]) for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(
        derive_seed(seed, "batches", epoch))).tolist()
    return tuple(batches[i] for i in order)


def batch_at(groups: tuple[tuple[int, ...], ...], batch_size: int, seed: int, position: int) -> tuple[int, ...]:
    """Batch number `position` of the endless sequence of epochs (every epoch has the same number of batches)."""
    per_epoch = sum(math.ceil(len(members) / batch_size) for members in groups)
    epoch, offset = divmod(position, per_epoch)
    return epoch_batches(groups, batch_size, seed, epoch)[offset]
