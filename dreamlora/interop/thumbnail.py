"""`modelspec.thumbnail`: a small preview image inside the file, as a data URL.

Stability's model spec defines the entry; SwarmUI shows it (it accepts only `data:image/...` values), ComfyUI's
model library reads it and AUTOMATIC1111 keeps it out of the metadata it lists. A JPEG of at most 256 px a side
keeps it to a few tens of kB of the header.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

MAX_SIDE = 256
QUALITY = 85


def thumbnail_data_url(image: str | Path, max_side: int = MAX_SIDE) -> str:
    """`data:image/jpeg;base64,...` of `image` shrunk to fit `max_side` (aspect kept).

    Raises:
        DataError: the image cannot be read.
    """
    from PIL import Image

    from ..errors import DataError

    try:
        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"thumbnail image '{image}' cannot be read ({exc}).") from exc
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def describe_thumbnail(value: str | None) -> str | None:
    """'JPEG 256x128, 9.8 kB' for a data URL; None when there is none; a note when it is not an image."""
    if not value:
        return None
    from PIL import Image

    head, _, data = value.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        return f"not an image data URL ({len(value)} characters)"
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as picture:
            return f"{picture.format} {picture.width}x{picture.height}, {len(raw) / 1000:.1f} kB"
    except (ValueError, OSError):
        return f"unreadable image data ({len(value)} characters)"
