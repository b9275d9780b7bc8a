"""Image preflight: read every file of an image folder before any model loads, and say what is wrong.

`preflight(folder, role, resolution)` decodes each image fully, exactly as training will read it
(`load_rgb`), and returns a `PreflightReport` with one `FileCheck` per file:

- skipped: hidden files (.DS_Store, editor and temp files), sub-folders and non-image files, each
  with a note; caption (.txt) and manifest (.json/.toml/.md) files are passed over silently.
- error: the file cannot be decoded (truncated, corrupt, not really an image), holds more than
  MAX_IMAGE_PIXELS pixels (a decompression bomb), or is too small to learn from (see below).
- warning: usable, but worth a look: upscaled for training, or an exact or near duplicate of an
  earlier file (duplicates weigh that photo twice and teach the model less than a new one).
- ok.

Every image is turned into RGB the same way: EXIF orientation applied; RGBA, LA, PA and P with
transparency composited on white (a black background would be learnt as part of the subject);
CMYK, L, 1 and 16-bit/float greys converted; multi-frame files (MPO from phones and 3D cameras,
animated GIF/WebP/TIFF) give their first frame.

Size limits, relative to the training resolution R (the short side is resized to R):
- error below max(MIN_SIDE, R / MAX_UPSCALE) px on the short side: more than 4x upscaling, or a
  picture too small to hold any detail (32 px is a 4x4 latent for SD);
- warning below R: the image is upscaled and the LoRA learns its blur.
Without a resolution only the MIN_SIDE floor applies.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

if TYPE_CHECKING:
    from .config import DataConfig, PriorConfig
    from .progress import ProgressCallback

QUIET_EXTENSIONS = {".txt", ".json", ".toml", ".md"}  # captions, manifests and notes: skipped without a note
# Photo formats Pillow reads only through a plugin (or a codec it may be built without): the plugin to install.
PLUGINS = {".heic": "pillow-heif", ".heif": "pillow-heif", ".avif": "Pillow >= 11.3 built with libavif, or "
           "pillow-avif-plugin", ".avifs": "Pillow >= 11.3 built with libavif, or pillow-avif-plugin",
           ".jxl": "pillow-jxl-plugin"}
# Openable by Pillow but not photos: PostScript (needs Ghostscript, a page rather than a picture), MPEG
# (identified, never decoded: a video) and IPTC (newsroom metadata).
NOT_PHOTOS = {"EPS", "MPEG", "IPTC"}
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a line of text; anything larger is the wrong file
MAX_IMAGE_PIXELS = 64_000_000  # about 8k x 8k; beyond it a file is refused as a possible decompression bomb
MIN_SIDE = 32  # px on the short side, whatever the resolution
MAX_UPSCALE = 4.0  # more than this much upscaling to the training resolution is an error
NEAR_DUPLICATE_BITS = 5  # difference hashes (64 bits) this close are near duplicates...
NEAR_DUPLICATE_COLOUR = 12  # ...if their 4x4 colour thumbnails also differ by at most this (mean, 0-255)

# PIL's own guard stays on as a backstop at twice its limit; MAX_IMAGE_PIXELS above is checked first.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


# Formats every Pillow build decodes: known without asking Pillow, whose full plugin scan (Image.init) costs about
# 0.1 s, a fifth of what `dreamlora check-images` may take on a small folder. Other suffixes are looked up there.
COMMON_PHOTO_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"})


def image_extensions() -> set[str]:
    """The file extensions of every image format the installed Pillow (and its installed plugins) can decode.

    Read from Pillow at each scan, so an AVIF, HEIC or JPEG XL photo is an image wherever its decoder exists.
    Stub formats (Pillow identifies them but needs an outside handler: BUFR, GRIB, HDF5, WMF, ...) are left out.
    """
    from PIL import ImageFile

    _register_plugins()
    Image.init()
    readable = {name for name, (factory, _accept) in Image.OPEN.items() if name not in NOT_PHOTOS
                and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return {ext for ext, name in Image.registered_extensions().items() if name in readable} | {".mpo"}


@functools.cache
def _register_plugins() -> None:
    """Register the decoders installed as separate packages (they add themselves to Pillow only when asked)."""
    import importlib

    for module, register in (("pillow_heif", "register_heif_opener"), ("pillow_avif", None),
                             ("pillow_jxl", None)):
        try:
            plugin = importlib.import_module(module)
            if register:
                getattr(plugin, register)()
        except Exception:  # noqa: BLE001  (absent or broken plugin: its files are then reported as unreadable)
            continue

Status = Literal["ok", "warning", "error", "skipped"]


@dataclass
class FileCheck:
    """The verdict on one file of the folder."""

    path: Path
    status: Status
    notes: list[str] = field(default_factory=list)  # why it is skipped, an error, or a warning
    info: list[str] = field(default_factory=list)  # conversions applied (EXIF rotation, CMYK -> RGB, ...)
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    pixel_hash: str | None = None  # sha256 of the decoded RGB pixels
    dhash: int | None = None  # 64-bit difference hash of the grey thumbnail
    thumbnail: bytes | None = None  # 4x4 RGB: tells flat or smooth pictures of other colours apart

    def add(self, status: Status, note: str) -> None:
        """Add a note; the status only ever gets worse (ok < warning < error)."""
        order = ("ok", "warning", "error")
        if order.index(status) > order.index(self.status):
            self.status = status
        self.notes.append(note)


@dataclass
class PreflightReport:
    """Every file of one image folder and its verdict."""

    folder: Path
    role: str  # "instance", "class" or "image": used in messages
    resolution: int | None  # the size checks' reference; None: only the MIN_SIDE floor
    files: list[FileCheck]

    @property
    def usable(self) -> list[Path]:
        """The images training will use (ok or warning), sorted by name."""
        return [f.path for f in self.files if f.status in ("ok", "warning")]

    @property
    def errors(self) -> list[FileCheck]:
        return [f for f in self.files if f.status == "error"]

    def messages(self) -> list[str]:
        """One line per skipped file or warning, for the progress notes of a training run."""
        return [f"{self.role} image '{f.path.name}' {note}" if f.status == "warning" else f"skipped '{f.path}': {note}"
                for f in self.files if f.status in ("skipped", "warning") for note in f.notes]

    def raise_for_errors(self) -> None:
        """Raise one DataError naming every unusable file (the CLI prints it as one line).

        Raises:
            DataError: when any file is an error.
        """
        bad = self.errors
        if not bad:
            return
        images = sum(1 for f in self.files if f.status != "skipped")
        listed = "; ".join(f"'{f.path.name}' {', and '.join(f.notes)}" for f in bad)
        raise DataError(f"{self.role} folder '{self.folder}': {len(bad)} of {images} images cannot be used: {listed}. "
                        f"Replace or remove them (`dreamlora check-images {self.folder}` lists every file).")

    def check_resolution(self, resolution: int) -> None:
        """Apply the size checks for `resolution` (when the report was made without one)."""
        if self.resolution is None:
            self.resolution = resolution
            for check in self.files:
                if check.size is not None:
                    _check_size(check, resolution)


def preflight(folder: str | Path, role: str = "instance", resolution: int | None = None) -> PreflightReport:
    """Decode and check every image in `folder` (not its sub-folders).

    Args:
        folder: the image folder.
        role: "instance", "class" or "image"; named in messages.
        resolution: the training resolution for the size checks; None checks only the MIN_SIDE floor.

    Returns:
        The report; errors are in it, not raised (call `raise_for_errors`).

    Raises:
        DataError: the folder does not exist or holds no image file at all.
    """
    folder = Path(folder)
    paths, skipped = _scan(folder, role)
    files = [FileCheck(path, "skipped", [note]) for path, note in skipped]
    for path in paths:
        files.append(_check_file(path, resolution, captions=role != "class"))  # class images take the class prompt
    _mark_duplicates([f for f in files if f.pixel_hash is not None and f.status != "error"])
    files.sort(key=lambda f: f.path.name)
    return PreflightReport(folder, role, resolution, files)


def list_image_files(folder: str | Path, role: str) -> tuple[list[Path], list[str]]:
    """Image files directly in `folder`, sorted; hidden and non-image files are skipped with a note.

    Raises:
        DataError: the folder does not exist or holds no image.
    """
    paths, skipped = _scan(Path(folder), role)
    return paths, [f"skipped '{path}': {reason}" for path, reason in skipped]


def _scan(folder: Path, role: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    if not folder.is_dir():
        raise DataError(f"{role} folder '{folder}' does not exist or is not a folder. Check the path.")
    paths, skipped = [], []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if path.name.startswith("."):
            skipped.append((path, f"hidden {'folder' if path.is_dir() else 'file'}"))
        elif path.is_dir():
            skipped.append((path, "a folder: sub-folders are not searched"))
        elif not path.is_file():
            # A FIFO, socket or device named like an image: opening a FIFO waits for a writer forever.
            what = "a broken link" if not path.exists() else "not a regular file (a pipe, socket or device)"
            skipped.append((path, what))
        elif suffix in COMMON_PHOTO_EXTENSIONS or suffix in PLUGINS or (
                suffix not in QUIET_EXTENSIONS and suffix in image_extensions()):
            paths.append(path)  # a photo whose plugin is missing is an error that names the plugin
        elif suffix not in QUIET_EXTENSIONS:
            skipped.append((path, f"not an image ({path.suffix or 'no extension'})"))
    if not paths:
        extensions = image_extensions()
        common = ", ".join(e for e in (".jpg", ".png", ".webp", ".avif", ".heic", ".tif", ".bmp") if e in extensions)
        raise DataError(f"{role} folder '{folder}' has no images (this Pillow reads {common} and "
                        f"{len(extensions)} other kinds). Add some photos or point to the right folder.")
    return paths, skipped


# ----------------------------------------------------------------------------------------------
# Reading one image


class _Unreadable(Exception):
    """Why a file cannot be used (the caller adds the file name), and what to do about it."""

    def __init__(self, reason: str, advice: str = "Remove or re-export it."):
        super().__init__(reason)
        self.advice = advice


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and return it as RGB.

    Transparent images are composited on white (a black background would teach the model one).

    Raises:
        DataError: naming the file, when it cannot be decoded or is too large to decode safely.
    """
    path = Path(path)
    try:
        return _decode(path)[0]
    except _Unreadable as exc:
        raise DataError(f"image '{path}' {exc}. {exc.advice}") from exc


def _decode(path: Path, data: bytes | None = None) -> tuple[Image.Image, list[str]]:
    """(RGB image, notes on the conversions applied). `data`: the encoded image itself (a dataset row's bytes),
    `path` then only names it."""
    import io

    info: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says it better
            image = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError as exc:
        raise _Unreadable(f"is too large to decode safely ({_reason(exc, path)})", "Downscale it.") from exc
    except Exception as exc:  # noqa: BLE001  (PIL raises many kinds for malformed files: all mean "unreadable")
        if (len(data) == 0) if data is not None else (path.is_file() and path.stat().st_size == 0):
            raise _Unreadable("cannot be read: the file is empty (0 bytes)",
                              "Remove it or copy the photo again.") from exc
        if isinstance(exc, UnidentifiedImageError):
            plugin = PLUGINS.get(path.suffix.lower())
            if plugin and path.suffix.lower() not in image_extensions():
                raise _Unreadable(f"cannot be read: it is a {path.suffix[1:].upper()} image and the installed "
                                  f"Pillow has no decoder for it (install {plugin})",
                                  "Install the plugin, or convert the photo to JPEG or PNG.") from exc
            raise _Unreadable(f"cannot be read: its contents are not an image format dreamlora reads "
                              f"(is it really a {path.suffix.lower()} file?)") from exc
        raise _Unreadable(f"cannot be read: {_reason(exc, path)}") from exc
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _Unreadable(f"is {width}x{height} = {width * height / 1e6:.3g} megapixels, over the "
                              f"{MAX_IMAGE_PIXELS / 1e6:.3g} MP limit (a possible decompression bomb)", "Downscale it.")
        try:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                image.seek(0)  # MPO (phones, 3D cameras) and animated files: the first frame
                info.append(f"first of {frames} frames used ({image.format})")
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (2, 3, 4, 5, 6, 7, 8):  # 1: upright; anything else is not a real orientation
                image = ImageOps.exif_transpose(image)
                info.append(f"rotated by its EXIF orientation ({orientation})")
            return _to_rgb(image, info), info
        except _Unreadable:
            raise
        except Exception as exc:  # noqa: BLE001  (truncated data, bad chunks, broken EXIF, odd modes)
            raise _Unreadable(f"cannot be read: {_reason(exc, path)}") from exc


def _reason(exc: Exception, path: Path) -> str:
    text = str(exc).split("\n")[0].strip().replace(f"'{path}'", "").replace(str(path), path.name).strip()
    text = text or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _to_rgb(image: Image.Image, info: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P":
        image = image.convert("RGBA")  # applies a transparent palette entry, if any
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            info.append(f"transparent ({mode}): composited on white")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=alpha)
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
        info.append(f"{mode} (16-bit) reduced to 8-bit")
    elif image.mode == "F":
        image = image.convert("L")
        info.append("F (float) converted to 8-bit")
    if image.mode not in ("L", "1"):
        info.append(f"{mode} converted to RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Captions


def read_caption(path: str | Path) -> str | None:
    """The caption in `path` (a .txt beside a photo) as one line, or None when there is none or it is blank.

    Decoded strictly: UTF-8, with or without a byte-order mark. A caption in UTF-16 or Latin-1 would
    otherwise train on garbled text without a word. Its braces are checked as a prompt's are.

    Raises:
        DataError: naming the file: not UTF-8, not text, too large, unreadable, or a bad placeholder.
    """
    from .config import prompt_problem

    path = Path(path)
    if not path.is_file():  # no caption (a FIFO named .txt is not read either: it would block)
        return None
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CAPTION_BYTES + 1)
    except OSError as exc:
        raise DataError(f"caption '{path}' cannot be read ({exc.strerror or exc}). Check its permissions.") from exc
    if len(data) > MAX_CAPTION_BYTES:
        raise DataError(f"caption '{path}' is over {MAX_CAPTION_BYTES // 1024} KiB: a caption is a line of text. "
                        "Is it the right file?")
    byte_order_marks = (((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "UTF-32"), ((b"\xff\xfe", b"\xfe\xff"), "UTF-16"))
    for marks, encoding in byte_order_marks:
        if data.startswith(marks):
            raise DataError(f"caption '{path}' is {encoding} text. Save it as UTF-8.")
    if b"\x00" in data:  # before decoding: UTF-16 without a byte-order mark is often valid UTF-8 byte by byte
        raise DataError(f"caption '{path}' holds NUL bytes (UTF-16 without a byte-order mark, or not text). "
                        "Save it as UTF-8.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"caption '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                        "Latin-1 or Windows-1252?). Save it as UTF-8.") from None
    text = " ".join(text.split())
    problem = prompt_problem(text)
    if problem:
        raise DataError(f"caption '{path}' {problem} (got '{text[:120]}')")
    return text or None


def prompt_length_warnings(prompts: dict[str, str], tokenizer) -> list[str]:
    """A warning for each prompt longer than the text encoder reads: it would be cut without a word.

    Args:
        prompts: {what the prompt is, for the message ("caption '03.txt'", "--prompt 2"): its text}.
        tokenizer: the base model's (first) tokenizer; SD's CLIP encoders read 77 tokens, start and end
            included (SDXL's second encoder the same).
    """
    if tokenizer is None:
        return []
    limit = int(getattr(tokenizer, "model_max_length", 77))
    if limit > 100_000:  # transformers' "no limit" sentinel: nothing is cut
        return []
    warnings_ = []
    for label, prompt in prompts.items():
        ids = tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1:limit - 1], skip_special_tokens=True).split()
            where = f" after '{' '.join(kept[-3:])}'" if kept else ""
            warnings_.append(f"{label} is {len(ids)} tokens long and the text encoder reads {limit} (start and end "
                             f"tokens included): the words{where} are ignored. Shorten it.")
    return warnings_


# ----------------------------------------------------------------------------------------------
# Checks


def _check_file(path: Path, resolution: int | None, captions: bool = True, data: bytes | None = None) -> FileCheck:
    check = FileCheck(path, "ok")
    if captions and data is None:
        try:
            read_caption(path.with_suffix(".txt"))
        except DataError as exc:
            check.add("error", f"has a caption that cannot be used: {str(exc).rstrip('.')}")
    try:
        image, check.info = _decode(path, data)
    except _Unreadable as exc:
        check.add("error", str(exc))
        return check
    check.size = image.size
    check.pixel_hash = hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()
    check.dhash = difference_hash(image)
    check.thumbnail = image.resize((4, 4), Image.Resampling.BOX).tobytes()
    _check_size(check, resolution)
    return check


def _check_size(check: FileCheck, resolution: int | None) -> None:
    width, height = check.size
    short = min(width, height)
    floor = MIN_SIDE if resolution is None else max(MIN_SIDE, math.ceil(resolution / MAX_UPSCALE))
    if short < floor:
        why = (f"the {MIN_SIDE} px minimum" if floor == MIN_SIDE else
               f"{floor} px, the least that reaches {resolution} px with {MAX_UPSCALE:g}x upscaling")
        check.add("error", f"is {width}x{height}: its short side is below {why}")
    elif resolution is not None and short < resolution:
        check.add("warning", f"is {width}x{height}: upscaled {resolution / short:.1f}x to {resolution} px, "
                             "so the LoRA learns its blur; a larger photo is better")


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour?

    Resizing, re-encoding and small edits change few bits; different photos differ in about 32.
    """
    grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = list(grey.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            left, right = pixels[row * 9 + col], pixels[row * 9 + col + 1]
            bits = (bits << 1) | (left > right)
    return bits


def _mark_duplicates(checks: list[FileCheck]) -> None:
    """Warn on the later file of each exact (same pixels) or near duplicate pair, in name order.

    Near: the difference hashes are within NEAR_DUPLICATE_BITS and the colour thumbnails within
    NEAR_DUPLICATE_COLOUR (a dHash alone calls every flat or evenly shaded picture the same).
    """
    checks = sorted(checks, key=lambda c: c.path.name)
    first_with: dict[str, FileCheck] = {}
    for i, check in enumerate(checks):
        original = first_with.setdefault(check.pixel_hash, check)
        if original is not check:
            check.add("warning", f"is an exact duplicate of '{original.path.name}' (same pixels)")
            continue
        for earlier in checks[:i]:
            if first_with.get(earlier.pixel_hash) is not earlier:
                continue  # compare with originals only
            distance = (check.dhash ^ earlier.dhash).bit_count()
            if distance <= NEAR_DUPLICATE_BITS and _colour_distance(check, earlier) <= NEAR_DUPLICATE_COLOUR:
                check.add("warning", f"is a near duplicate of '{earlier.path.name}' "
                                     f"(perceptual hashes differ in {distance} of 64 bits)")
                break


def _colour_distance(a: FileCheck, b: FileCheck) -> float:
    """Mean absolute difference of the 4x4 RGB thumbnails, 0-255."""
    return sum(abs(x - y) for x, y in zip(a.thumbnail, b.thumbnail)) / len(a.thumbnail)


# ----------------------------------------------------------------------------------------------
# Training: both folders before the model loads, the size checks once the resolution is known


@dataclass
class TrainingImages:
    """The preflight reports of a training run's instance folder and (user-given) class folder."""

    instance: PreflightReport
    classes: PreflightReport | None  # None: prior preservation off, or generated class images

    @property
    def reports(self) -> list[PreflightReport]:
        return [r for r in (self.instance, self.classes) if r is not None]

    def raise_for_errors(self) -> None:
        """One DataError for both folders, so every bad file is named at once."""
        problems = []
        for report in self.reports:
            try:
                report.raise_for_errors()
            except DataError as exc:
                problems.append(str(exc))
        if problems:
            raise DataError(" ".join(problems))

    def finish(self, resolution: int, progress: ProgressCallback) -> None:
        """Size checks at the resolution (known once the model loads), then raise or report.

        Raises:
            DataError: listing every unusable file of both folders.
        """
        for report in self.reports:
            report.check_resolution(resolution)
        self.raise_for_errors()
        from .progress import note

        for report in self.reports:
            for message in report.messages():
                note(progress, message)


def preflight_training_data(data: DataConfig, prior: PriorConfig) -> TrainingImages:
    """Decode every instance image (and every image of a user's class folder); raise on any unusable file.

    Raises:
        DataError: a missing or empty folder, or every unreadable file of both folders in one message.
    """
    if data.job == "finetune":  # captioned rows in any of the DATA forms (dreamlora.captioned)
        from .captioned import preflight_captioned, read_captioned

        rows = read_captioned(data.instance_dir, image_column=data.image_column, caption_column=data.caption_column)
        instance = preflight_captioned(data.instance_dir, rows, data.resolution)
    else:
        instance = preflight(data.instance_dir, "instance", data.resolution)
    classes = preflight(prior.class_dir, "class", data.resolution) if prior.enabled and prior.class_dir else None
    images = TrainingImages(instance, classes)
    images.raise_for_errors()
    return images


# ----------------------------------------------------------------------------------------------
# The token


# Frequent English words: the text encoder already has a meaning for each, which training would overwrite.
COMMON_WORDS = frozenset("""
a about after again all also an and any are as at back be because been before being best big but by can
come could day did do does down each even first for from get give go good great had has have he her here
him his how i if in into is it its just know like little long look made make man many me more most much
my new no not now of old on one only or other our out over people say see she should so some take than
that the their them then there these they thing think this those time to two up us use very want was way
we well went were what when where which who will with work would year you your
red green blue yellow white black orange purple pink gray grey brown gold silver dark light bright
photo picture image art style painting drawing portrait close night home house car tree water sky
sun moon star fire snow city street road world life love hand face eye head body hair baby boy girl
child woman person men women family friend king queen cute small large happy
""".split())
# Class nouns people train: a token equal to one of them fights the class itself.
CLASS_WORDS = frozenset("""
dog cat puppy kitten bird horse cow pig sheep rabbit bear lion tiger fox wolf duck fish animal pet
man woman person boy girl child baby guy lady face people
car truck bike bicycle motorcycle boat plane train
toy plush teddy doll figure robot ball cube cup mug bottle vase bag backpack shoe sneaker boot hat
glasses watch clock chair table sofa lamp book phone camera house building tree flower plant
""".split())
MAX_TOKEN_PIECES = 2


def token_warnings(token: str, class_word: str, tokenizer) -> list[str]:
    """Why `token` may bind the subject poorly: a known word, or split into many tokenizer pieces.

    The hard errors (empty, equal to the class word, missing from the instance prompt) are config
    errors (dreamlora.config); these are warnings, since a run with such a token still works.

    Args:
        token: the identifier, e.g. "sks".
        class_word: the subject's class, e.g. "dog".
        tokenizer: the base model's (first) tokenizer, or None to skip the piece count.
    """
    notes = []
    word = token.strip().lower()
    if word in CLASS_WORDS or word in COMMON_WORDS:
        kind = "class noun" if word in CLASS_WORDS else "common English word"
        notes.append(f"--token '{token}' is a {kind}: the model already knows it and training overwrites that "
                     f"meaning. A rare token such as 'sks' or 'ohwx' binds the subject better.")
    if tokenizer is not None:
        pieces = tokenizer.tokenize(token)
        if len(pieces) > MAX_TOKEN_PIECES:
            shown = " ".join(p.replace("</w>", "") for p in pieces)
            notes.append(f"--token '{token}' splits into {len(pieces)} tokenizer pieces ({shown}): the subject is "
                         f"spread over several embeddings. Pick a token of 1-{MAX_TOKEN_PIECES} pieces, e.g. 'sks'.")
    if class_word and word != class_word.strip().lower() and class_word.strip().lower() in word:
        notes.append(f"--token '{token}' contains the class word '{class_word}'; a token unrelated to it is clearer.")
    return notes
