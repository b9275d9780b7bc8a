"""Instance and class image sets: finding and reading images, prompts, and the cached latents.

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
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DataConfig, fill_prompt
from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb beyond ~8k x 8k is refused with a DataError


@dataclass
class ImageSet:
    """Images of one role ("instance" or "class") with the prompt each one is trained with."""

    paths: list[Path]
    prompts: list[str]
    skipped: list[str]  # notes on files passed over


def list_image_files(folder: str | Path, role: str) -> tuple[list[Path], list[str]]:
    """Image files directly in `folder`, sorted; hidden and non-image files are skipped with a note.

    Raises:
        DataError: the folder does not exist or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder '{folder}' does not exist or is not a folder. Check the path.")
    paths, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            if path.name.startswith("."):
                skipped.append(f"skipped hidden file '{path}'")
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(path)
        elif path.suffix.lower() not in (".txt", ".json", ".toml", ".md"):
            skipped.append(f"skipped '{path}': not an image ({path.suffix or 'no extension'})")
    if not paths:
        raise DataError(f"{role} folder '{folder}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                        "Add some photos or point to the right folder.")
    return paths, skipped


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and return it as RGB.

    Transparent images are composited on white (a black background would teach the model one).

    Raises:
        DataError: naming the file, when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.seek(0)  # MPO and animated files: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image '{path}' is too large to decode safely ({exc}). Downscale it.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image '{path}' cannot be read: {exc}. Remove or re-export it.") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit to 8-bit grey
    return image.convert("RGB")


def caption_for(image_path: Path) -> str | None:
    """The text of `photo.txt` beside `photo.jpg`, if there is one and it is not empty."""
    caption_path = image_path.with_suffix(".txt")
    if caption_path.is_file():
        text = " ".join(caption_path.read_text(encoding="utf-8", errors="replace").split())
        return text or None
    return None


def prompt_from_caption(caption: str, token: str, class_word: str) -> str:
    """Make sure a caption names the subject by its token.

    'a dog on a sofa' -> 'a sks dog on a sofa'; a caption without the class word gets
    'sks dog, ' in front. Captions that already hold the token are kept as written.
    """
    caption = fill_prompt(caption, token, class_word) if "{" in caption else caption
    words = caption.split()
    if token in words or token in caption.replace(",", " ").split():
        return caption
    lowered = [w.lower().strip(",.") for w in words]
    if class_word.lower() in lowered:
        i = lowered.index(class_word.lower())
        return " ".join(words[:i] + [token] + words[i:])
    return f"{token} {class_word}, {caption}"


def instance_set(data: DataConfig) -> ImageSet:
    """The instance images and their prompts (caption files override the template)."""
    paths, skipped = list_image_files(data.instance_dir, "instance")
    default_prompt = fill_prompt(data.instance_prompt, data.token, data.class_word)
    prompts = []
    for path in paths:
        caption = caption_for(path)
        prompts.append(prompt_from_caption(caption, data.token, data.class_word) if caption else default_prompt)
    return ImageSet(paths, prompts, skipped)


def class_set(folder: str | Path, data: DataConfig) -> ImageSet:
    paths, skipped = list_image_files(folder, "class")
    prompt = fill_prompt(data.class_prompt, data.token, data.class_word)
    return ImageSet(paths, [prompt] * len(paths), skipped)


def resize_for_training(image: Image.Image, resolution: int, crop: str, multiple: int) -> torch.Tensor:
    """Resize so the short side is `resolution`; center mode also crops to a square.

    Returns:
        (3, H, W) in [-1, 1]. In random mode H and W are multiples of `multiple` (the VAE's
        downscale factor) so crops can be cut from the latents.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if crop == "random":
        new_w, new_h = new_w // multiple * multiple, new_h // multiple * multiple
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if crop == "center":
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
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
    size: int  # latent side of a training crop: resolution // vae_scale_factor

    def __len__(self) -> int:
        return len(self.means)


@torch.no_grad()
def encode_latents(vae, images: list[torch.Tensor], *, size: int, with_flips: bool, batch_size: int = 8) -> LatentCache:
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
    rows = []
    for i in indices:
        flip = random_flip and cache.flipped_means is not None and bool(torch.rand((), generator=generator) < 0.5)
        mean = cache.flipped_means[i] if flip else cache.means[i]
        std = cache.flipped_stds[i] if flip else cache.stds[i]
        _, h, w = mean.shape
        top = left = 0
        if random_crop:
            top = int(torch.randint(0, h - cache.size + 1, (), generator=generator))
            left = int(torch.randint(0, w - cache.size + 1, (), generator=generator))
        else:
            top, left = (h - cache.size) // 2, (w - cache.size) // 2
        window = (slice(None), slice(top, top + cache.size), slice(left, left + cache.size))
        eps = torch.randn(mean[window].shape, generator=generator)
        rows.append(mean[window] + std[window] * eps)
    return torch.stack(rows)


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


def upscale_warning(path: Path, image: Image.Image, resolution: int) -> str | None:
    short = min(image.size)
    if short < resolution:
        return f"'{path.name}' is {image.size[0]}x{image.size[1]}; it is upscaled {resolution / short:.1f}x to {resolution}"
    return None


def latent_size(resolution: int, vae_scale_factor: int) -> int:
    return math.ceil(resolution / vae_scale_factor)
