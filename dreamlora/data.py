"""Instance and class image sets: prompts, training transforms, and the cached latents.

Finding, decoding and checking image files is dreamlora.preflight.

The frozen VAE runs once per image. What is cached is the latent *distribution* (mean, std) of
each image, for the unflipped and, with random flips, the flipped image; with random crops the
whole resized image is encoded and crops are cut from its latents at latent-pixel offsets. Each
step then samples a latent exactly as `latent_dist.sample()` would, without running the VAE.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .captioned import CaptionedImage
from .config import DataConfig, fill_prompt
from .identity import images_fingerprint
from .preflight import list_image_files, load_rgb, read_caption  # noqa: F401  (files are read in preflight)


@dataclass
class ImageSet:
    """Images of one role ("instance" or "class") with the prompt each one is trained with."""

    paths: list[Path]  # the image files; for a fine-tune's dataset rows, their names ('row 17')
    prompts: list[str]
    skipped: list[str]  # notes on files passed over
    rows: list[CaptionedImage] | None = None  # a fine-tune's rows, whose images need not be files

    def open(self, i: int) -> Image.Image:
        """Image i as RGB (decoded as the preflight decoded it)."""
        return self.rows[i].open() if self.rows is not None else load_rgb(self.paths[i])

    def fingerprint(self) -> str:
        """Each image's bytes and prompt, in order (dreamlora.identity.images_fingerprint): what a resume must match."""
        if self.rows is None:
            return images_fingerprint(self.paths, self.prompts)
        h = hashlib.sha256()
        for row, prompt in zip(self.rows, self.prompts):
            h.update(row.digest().encode() + b"\0" + prompt.encode("utf-8") + b"\n")
        return h.hexdigest()[:16]


def captioned_set(data: DataConfig, rows: list[CaptionedImage]) -> ImageSet:
    """A fine-tune's images, each trained with its own caption (after --caption-prefix); no token is added."""
    prompts = [with_prefix(fill_prompt(row.caption, data.token, data.class_word), data.caption_prefix)
               for row in rows]
    return ImageSet([row.path or Path(row.name) for row in rows], prompts, [], rows)


def with_prefix(caption: str, prefix: str) -> str:
    """'sks style' + 'a cat, grass' -> 'sks style, a cat, grass': the prefix becomes the caption's first tag."""
    prefix = prefix.strip().rstrip(",").strip()
    return f"{prefix}, {caption}" if prefix else caption


def step_caption(caption: str, seed: int, *, dropout: float, shuffle: bool, keep: int) -> str:
    """The caption one row of one step is trained with: dropped (empty) with probability `dropout`, else with its
    comma-separated tags after the first `keep` shuffled. A pure function of (caption, seed): the caller derives
    `seed` from (run seed, step, micro-batch, process, row), so a resumed run draws the same captions.
    """
    if not dropout and not shuffle:
        return caption
    generator = torch.Generator().manual_seed(seed)
    if dropout and float(torch.rand((), generator=generator)) < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return ", ".join(head + [tail[i] for i in order])


def caption_for(image_path: Path) -> str | None:
    """The text of `photo.txt` beside `photo.jpg`, if there is one and it is not empty.

    Raises:
        DataError: the caption is not UTF-8 text or has a placeholder other than {token} and {class}
            (dreamlora.preflight.read_caption; the preflight reports it before any model loads).
    """
    return read_caption(image_path.with_suffix(".txt"))


def prompt_from_caption(caption: str, token: str, class_word: str) -> str:
    """Make sure a caption names the subject by its token.

    'a dog on a sofa' -> 'a sks dog on a sofa'; a caption without the class word gets
    'sks dog, ' in front. Captions that already hold the token are kept as written.
    """
    caption = fill_prompt(caption, token, class_word)  # {token}, {class}; {{ and }} are literal braces
    words = caption.split()
    if token in words or token in caption.replace(",", " ").split():
        return caption
    lowered = [w.lower().strip(",.") for w in words]
    if class_word.lower() in lowered:
        i = lowered.index(class_word.lower())
        return " ".join(words[:i] + [token] + words[i:])
    return f"{token} {class_word}, {caption}"


def instance_set(data: DataConfig, paths: list[Path] | None = None) -> ImageSet:
    """The instance images (`paths`, e.g. a preflight's usable files, or the folder's) and their prompts.

    Caption files override the prompt template.
    """
    skipped: list[str] = []
    if paths is None:
        paths, skipped = list_image_files(data.instance_dir, "instance")
    default_prompt = fill_prompt(data.instance_prompt, data.token, data.class_word)
    prompts = []
    for path in paths:
        caption = caption_for(path)
        prompt = prompt_from_caption(caption, data.token, data.class_word) if caption else default_prompt
        prompts.append(with_prefix(prompt, data.caption_prefix))
    return ImageSet(paths, prompts, skipped)


def training_set(data: DataConfig, report) -> ImageSet:
    """The images a run trains on, from the preflight's report of DATA: a fine-tune's captioned rows or the photos."""
    if data.job == "finetune":
        return captioned_set(data, report.usable_rows)
    return instance_set(data, report.usable)


def class_set(folder: str | Path, data: DataConfig, paths: list[Path] | None = None) -> ImageSet:
    skipped: list[str] = []
    if paths is None:
        paths, skipped = list_image_files(folder, "class")
    prompt = fill_prompt(data.class_prompt, data.token, data.class_word)
    return ImageSet(paths, [prompt] * len(paths), skipped)


def resized_size(size: tuple[int, int], resolution: int, crop: str, multiple: int) -> tuple[int, int]:
    """(width, height) of an image of `size` after resizing its short side to `resolution` (random mode:
    rounded down to multiples of the VAE's factor, so crops can be cut from the latents)."""
    w, h = size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if crop == "random":
        new_w, new_h = new_w // multiple * multiple, new_h // multiple * multiple
    return new_w, new_h


def crop_origin(size: tuple[int, int], resolution: int, crop: str, multiple: int) -> tuple[int, int]:
    """(top, left) in pixels of the window `resize_for_training` cuts (center mode), (0, 0) in random mode,
    where the window is drawn each step from the whole image's latents."""
    if crop != "center":
        return 0, 0
    new_w, new_h = resized_size(size, resolution, crop, multiple)
    return (new_h - resolution) // 2, (new_w - resolution) // 2


def resize_for_training(image: Image.Image, resolution: int, crop: str, multiple: int) -> torch.Tensor:
    """Resize so the short side is `resolution`; center mode also crops to a square.

    Returns:
        (3, H, W) in [-1, 1]. In random mode H and W are multiples of `multiple` (the VAE's
        downscale factor) so crops can be cut from the latents.
    """
    new_w, new_h = resized_size(image.size, resolution, crop, multiple)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if crop == "center":
        top, left = crop_origin(image.size, resolution, crop, multiple)
        image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


@dataclass
class LatentCache:
    """Latent distributions of a set of images, scaled to the UNet's latent space."""

    means: list[torch.Tensor]  # each (C, h, w), already multiplied by the VAE scaling factor
    stds: list[torch.Tensor]
    flipped_means: list[torch.Tensor] | None  # same for the mirrored images (random flip)
    flipped_stds: list[torch.Tensor] | None
    size: int | None  # latent side of a training crop: resolution // vae_scale_factor; None: latents used whole
    original_sizes: list[tuple[int, int]] | None = None  # (height, width) of each source image
    origins: list[tuple[int, int]] | None = None  # (top, left) px of each cached window in the resized image
    factor: int = 8  # pixels per latent cell: a latent crop offset times this is its pixel offset

    def __len__(self) -> int:
        return len(self.means)


@torch.no_grad()
def encode_latents(vae, images: list[torch.Tensor], *, size: int | None, with_flips: bool,
                   batch_size: int = 8) -> LatentCache:
    """Run the VAE encoder once over `images` ((3, H, W) each), batching images of equal size."""
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device, dtype = vae.device, vae.dtype

    def encode(batch: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        means, stds = [], []
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(batch):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        out_mean: dict[int, torch.Tensor] = {}
        out_std: dict[int, torch.Tensor] = {}
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                x = torch.stack([batch[i] for i in chunk]).to(device=device, dtype=dtype)
                dist = vae.encode(x).latent_dist  # mean, std: (b, C, H/f, W/f)
                for j, i in enumerate(chunk):
                    out_mean[i] = ((dist.mean[j].float() - shift) * scaling).cpu()
                    out_std[i] = (dist.std[j].float() * scaling).cpu()
        for i in range(len(batch)):
            means.append(out_mean[i])
            stds.append(out_std[i])
        return means, stds

    means, stds = encode(images)
    flipped_means = flipped_stds = None
    if with_flips:
        flipped_means, flipped_stds = encode([image.flip(-1) for image in images])
    return LatentCache(means, stds, flipped_means, flipped_stds, size)


def draw_latents(cache: LatentCache, indices: list[int], generator: torch.Generator, *, random_crop: bool,
                 random_flip: bool) -> torch.Tensor:
    """Sample training latents for `indices`: flip coin, crop offset, then z = mean + std · ε.

    All randomness comes from `generator`, in a fixed order, so a step is reproducible from its seed.

    Returns:
        (len(indices), C, size, size) float32 latents.
    """
    return draw_latents_and_crops(cache, indices, generator, random_crop=random_crop, random_flip=random_flip)[0]


def draw_latents_and_crops(cache: LatentCache, indices: list[int], generator: torch.Generator, *, random_crop: bool,
                           random_flip: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`draw_latents`, and each row's crop (top, left) in pixels of the resized image (SDXL's crop condition).

    A flipped row keeps the coordinates its window was cut at, as SDXL's training scripts record them.
    """
    rows, crops = [], []
    for i in indices:
        flip = random_flip and cache.flipped_means is not None and bool(torch.rand((), generator=generator) < 0.5)
        mean = cache.flipped_means[i] if flip else cache.means[i]
        std = cache.flipped_stds[i] if flip else cache.stds[i]
        _, h, w = mean.shape
        side_h, side_w = (h, w) if cache.size is None else (cache.size, cache.size)
        top = left = 0
        if random_crop:
            top = int(torch.randint(0, h - side_h + 1, (), generator=generator))
            left = int(torch.randint(0, w - side_w + 1, (), generator=generator))
        else:
            top, left = (h - side_h) // 2, (w - side_w) // 2
        window = (slice(None), slice(top, top + side_h), slice(left, left + side_w))
        eps = torch.randn(mean[window].shape, generator=generator)
        rows.append(mean[window] + std[window] * eps)
        origin = cache.origins[i] if cache.origins else (0, 0)
        crops.append((origin[0] + top * cache.factor, origin[1] + left * cache.factor))
    return torch.stack(rows), crops


@functools.lru_cache(maxsize=64)
def epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A permutation of range(count) that depends only on (seed, epoch): resumable data order."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return tuple(torch.randperm(count, generator=generator).tolist())


def pick_indices(count: int, seed: int, first: int, n: int) -> list[int]:
    """Items first..first+n-1 of the endless sequence of epoch permutations of range(count)."""
    picked = []
    for position in range(first, first + n):
        epoch, offset = divmod(position, count)
        picked.append(epoch_order(count, seed, epoch)[offset])
    return picked


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from a base seed and labels: independent streams that need no stored state."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def latent_size(resolution: int, vae_scale_factor: int) -> int:
    return math.ceil(resolution / vae_scale_factor)
