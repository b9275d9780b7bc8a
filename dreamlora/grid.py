"""Lay images out as a labelled grid (rows x columns) on a white sheet. Pure PIL; no model code.

The sheet, top to bottom: an optional title band, a header row with the column labels, then one
row a band of cells. Left to right: the row-label column, then the cells. Every block is
separated by ``GAP`` pixels of white, and the sheet has a ``GAP`` border.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

GAP = 4  # white pixels between cells, bands and around the border
MIN_CELL = 128  # default cells are upscaled by a whole factor until their short side reaches this
LABEL_WIDTH = 176  # row-label column width; long labels wrap to it
HEADER_HEIGHT = 44  # column-label band: two lines of FONT_SIZE text (18 px each) plus padding
TITLE_HEIGHT = 32  # title band, present only when a title is given
FONT_SIZE = 14
TITLE_FONT_SIZE = 18
TEXT_PAD = 4  # inset of text from the edges of its band
TEXT_COLOR = (20, 20, 20)
BACKGROUND = (255, 255, 255)

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid sheet; ``make_grid`` draws exactly this.

    Attributes:
        rows: Number of image rows.
        cols: Number of image columns.
        cell_width: Width of every cell in pixels.
        cell_height: Height of every cell in pixels.
        title_height: Height of the title band (0 without a title).
    """

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    title_height: int

    @property
    def width(self) -> int:
        """Sheet width: border, label column, then a gap and a cell per column, then border."""
        return GAP + LABEL_WIDTH + self.cols * (GAP + self.cell_width) + GAP

    @property
    def height(self) -> int:
        """Sheet height: border, title band, header band, then a gap and a cell per row, then border."""
        return GAP + self.title_height + HEADER_HEIGHT + self.rows * (GAP + self.cell_height) + GAP

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of the cell at ``row``, ``col``."""
        x = GAP + LABEL_WIDTH + GAP + col * (self.cell_width + GAP)
        y = GAP + self.title_height + HEADER_HEIGHT + GAP + row * (self.cell_height + GAP)
        return x, y

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        """Box (left, top, right, bottom) of the label for ``row``; right and bottom exclusive."""
        _, y = self.cell_origin(row, 0)
        return GAP, y, GAP + LABEL_WIDTH, y + self.cell_height

    def header_box(self, col: int) -> tuple[int, int, int, int]:
        """Box (left, top, right, bottom) of the label for ``col``; right and bottom exclusive."""
        x, _ = self.cell_origin(0, col)
        top = GAP + self.title_height
        return x, top, x + self.cell_width, top + HEADER_HEIGHT


def grid_layout(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str | None = None,
    cell_size: int | None = None,
) -> GridLayout:
    """Check the inputs of ``make_grid`` and work out its geometry without drawing.

    Args:
        images: Rows of images; every row must have the same number of images.
        row_labels: One label per row.
        col_labels: One label per column.
        title: Optional title; a non-empty one adds a ``TITLE_HEIGHT`` band on top.
        cell_size: Side of the square cells in pixels. By default cells take the first image's
            size, multiplied by the smallest whole factor that makes the short side at least
            ``MIN_CELL`` (so 64 px previews show at 128 px, without blurring).

    Returns:
        The layout ``make_grid`` would draw.

    Raises:
        ValueError: If there are no images, rows are ragged, the label counts do not match the
            rows or columns, or ``cell_size`` is not positive.
    """
    if not images or not images[0]:
        raise ValueError("make_grid needs at least one row with at least one image (got an empty grid)")
    cols = len(images[0])
    ragged = [f"row {i} has {len(row)}" for i, row in enumerate(images) if len(row) != cols]
    if ragged:
        raise ValueError(f"make_grid needs every row to have {cols} images, like row 0; but " + ", ".join(ragged))
    if len(row_labels) != len(images):
        raise ValueError(f"make_grid got {len(row_labels)} row labels for {len(images)} rows: {row_labels!r}")
    if len(col_labels) != cols:
        raise ValueError(f"make_grid got {len(col_labels)} column labels for {cols} columns: {col_labels!r}")

    if cell_size is not None:
        if cell_size <= 0:
            raise ValueError(f"cell_size must be a positive number of pixels (got {cell_size})")
        cell_w = cell_h = cell_size
    else:
        w, h = images[0][0].size
        factor = max(1, -(-MIN_CELL // min(w, h)))  # ceil division: smallest whole factor reaching MIN_CELL
        cell_w, cell_h = w * factor, h * factor
    return GridLayout(
        rows=len(images),
        cols=cols,
        cell_width=cell_w,
        cell_height=cell_h,
        title_height=TITLE_HEIGHT if title else 0,
    )


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str | None = None,
    cell_size: int | None = None,
) -> Image.Image:
    """Lay images out as rows x columns with a label column, a header row and an optional title.

    Every image is resized to the cell size (nearest-neighbour when enlarging, so small previews
    stay crisp; Lanczos when shrinking). Images whose aspect differs from the cell are stretched.

    Args:
        images: Rows of images, e.g. one row a prompt and one column a seed.
        row_labels: One label per row, wrapped to ``LABEL_WIDTH``; empty strings draw nothing.
        col_labels: One label per column, wrapped to the cell width (two lines at most).
        title: Optional title centred above the grid.
        cell_size: Side of the square cells in pixels; see ``grid_layout`` for the default.

    Returns:
        A new RGB image of size ``(layout.width, layout.height)`` on a white background.

    Raises:
        ValueError: If there are no images, rows are ragged, the label counts do not match, or
            ``cell_size`` is not positive.
    """
    layout = grid_layout(images, row_labels, col_labels, title=title, cell_size=cell_size)
    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(FONT_SIZE)
    cell = (layout.cell_width, layout.cell_height)

    for r, row in enumerate(images):
        for c, image in enumerate(row):
            sheet.paste(_fit(image, cell), layout.cell_origin(r, c))
    for r, label in enumerate(row_labels):
        _draw_text(draw, label, font, layout.label_box(r), align="left")
    for c, label in enumerate(col_labels):
        _draw_text(draw, label, font, layout.header_box(c), align="center")
    if title:
        box = (GAP, GAP, layout.width - GAP, GAP + TITLE_HEIGHT)
        _draw_text(draw, title, _font(TITLE_FONT_SIZE), box, align="center")
    return sheet


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image as RGB at ``size``: NEAREST to enlarge (keeps pixels visible), LANCZOS to shrink."""
    image = image.convert("RGB")
    if image.size == size:
        return image
    enlarging = image.width <= size[0] and image.height <= size[1]
    return image.resize(size, Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


@lru_cache(maxsize=4)
def _font(size: int) -> _Font:
    """Pillow's built-in scalable font at ``size``; the fixed bitmap font on Pillow < 10.1 or without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default() takes no size
        return ImageFont.load_default()


def _line_height(font: _Font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return bottom - top + 3  # a little leading so wrapped lines do not touch


def _wrap(text: str, font: _Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words break by character; excess lines end in '...'."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if measure(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # A word wider than the band (a path, a hash) is split wherever it overflows.
            line = ""
            for ch in word:
                if line and measure(line + ch, font=font) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _draw_text(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: _Font,
    box: tuple[int, int, int, int],
    *,
    align: str,
) -> None:
    """Draw ``text`` wrapped inside ``box`` (left, top, right, bottom), centred vertically."""
    left, top, right, bottom = box
    width = right - left - 2 * TEXT_PAD
    line_h = _line_height(font)
    max_lines = max(1, (bottom - top - 2 * TEXT_PAD) // line_h)
    lines = _wrap(text, font, width, max_lines)
    # getbbox's top is the blank above the glyphs; subtract it so the ink, not the box, is centred.
    y = top + (bottom - top - len(lines) * line_h) // 2 - font.getbbox("Ag|")[1]
    for line in lines:
        if align == "center":
            x = left + (right - left - draw.textlength(line, font=font)) / 2
        else:
            x = left + TEXT_PAD
        draw.text((x, y), line, fill=TEXT_COLOR, font=font)
        y += line_h
