"""make_grid: exact geometry, cell pixels, label drawing and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dreamlora import grid
from dreamlora.grid import GAP, HEADER_HEIGHT, LABEL_WIDTH, MIN_CELL, TITLE_HEIGHT, grid_layout, make_grid

COLORS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 200, 0), (0, 200, 200), (120, 0, 120)]


def solid_grid(rows: int, cols: int, size: tuple[int, int] = (64, 64)) -> list[list[Image.Image]]:
    return [[Image.new("RGB", size, COLORS[(r * cols + c) % len(COLORS)]) for c in range(cols)] for r in range(rows)]


def region(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return np.asarray(image)[top:bottom, left:right]


def is_white(pixels: np.ndarray) -> bool:
    return pixels.size > 0 and bool((pixels == 255).all())


def test_size_is_exact_with_default_cell_upscaled_to_minimum():
    sheet = make_grid(solid_grid(2, 3), ["a", "b"], ["x", "y", "z"])
    assert MIN_CELL == 128  # 64 px cells double to 128
    assert sheet.size == (GAP + LABEL_WIDTH + 3 * (GAP + 128) + GAP, GAP + HEADER_HEIGHT + 2 * (GAP + 128) + GAP)
    assert sheet.mode == "RGB"


def test_size_is_exact_with_title_and_explicit_cell():
    sheet = make_grid(solid_grid(3, 2), ["a", "b", "c"], ["x", "y"], title="T", cell_size=50)
    width = GAP + LABEL_WIDTH + 2 * (GAP + 50) + GAP
    height = GAP + TITLE_HEIGHT + HEADER_HEIGHT + 3 * (GAP + 50) + GAP
    assert sheet.size == (width, height)


@pytest.mark.parametrize(
    ("size", "cell"),
    [((512, 512), (512, 512)), ((128, 128), (128, 128)), ((100, 100), (200, 200)), ((96, 64), (192, 128))],
)
def test_default_cell_is_first_image_times_smallest_whole_factor(size, cell):
    layout = grid_layout(solid_grid(1, 1, size), [""], [""])
    assert (layout.cell_width, layout.cell_height) == cell
    assert make_grid(solid_grid(1, 1, size), [""], [""]).size == (layout.width, layout.height)


def test_cell_centre_has_source_colour():
    images = solid_grid(2, 3)
    layout = grid_layout(images, ["a", "b"], ["x", "y", "z"], title="t")
    sheet = make_grid(images, ["a", "b"], ["x", "y", "z"], title="t")
    for r in range(2):
        for c in range(3):
            x, y = layout.cell_origin(r, c)
            centre = (x + layout.cell_width // 2, y + layout.cell_height // 2)
            assert sheet.getpixel(centre) == images[r][c].getpixel((0, 0))
            # The cell fills its box exactly: both corners are the source colour.
            assert sheet.getpixel((x, y)) == images[r][c].getpixel((0, 0))
            far_corner = (x + layout.cell_width - 1, y + layout.cell_height - 1)
            assert sheet.getpixel(far_corner) == images[r][c].getpixel((0, 0))


def test_small_images_are_enlarged_with_nearest_neighbour():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8), mode="RGB")
    layout = grid_layout([[small]], [""], [""])
    sheet = make_grid([[small]], [""], [""])
    x, y = layout.cell_origin(0, 0)
    cell = region(sheet, (x, y, x + 128, y + 128))
    # Each source pixel becomes a crisp 2x2 block, no blending.
    np.testing.assert_array_equal(cell, np.repeat(np.repeat(np.asarray(small), 2, 0), 2, 1))


def test_empty_labels_leave_everything_but_cells_white():
    images = solid_grid(2, 2)
    layout = grid_layout(images, ["", ""], ["", ""])
    sheet = make_grid(images, ["", ""], ["", ""])
    expected = Image.new("RGB", (layout.width, layout.height), (255, 255, 255))
    for r in range(2):
        for c in range(2):
            expected.paste(images[r][c].resize((128, 128)), layout.cell_origin(r, c))
    np.testing.assert_array_equal(np.asarray(sheet), np.asarray(expected))


def test_labels_and_title_are_drawn_in_their_bands():
    images = solid_grid(2, 2)
    layout = grid_layout(images, ["a photo of sks ball", "on a beach"], ["seed 0", "seed 1"], title="polkaball")
    sheet = make_grid(images, ["a photo of sks ball", "on a beach"], ["seed 0", "seed 1"], title="polkaball")
    for r in range(2):
        assert not is_white(region(sheet, layout.label_box(r)))
    for c in range(2):
        assert not is_white(region(sheet, layout.header_box(c)))
    assert not is_white(region(sheet, (GAP, GAP, layout.width - GAP, GAP + TITLE_HEIGHT)))


def test_long_labels_wrap_inside_their_boxes():
    images = solid_grid(1, 2)
    long_row = "a photo of sks ball sitting on a wooden table next to a window " * 6
    long_col = "guidance 7.5 with a very long column label that cannot fit"
    layout = grid_layout(images, [long_row], [long_col, "x" * 80])
    sheet = make_grid(images, [long_row], [long_col, "x" * 80])
    first_x, first_y = layout.cell_origin(0, 0)
    # The gap between the label column and the first cell stays white: no text overflowed it.
    assert is_white(region(sheet, (GAP + LABEL_WIDTH, 0, first_x, layout.height)))
    # So does the gap between the header and the cells, and the gap between the two columns.
    assert is_white(region(sheet, (0, GAP + HEADER_HEIGHT, layout.width, first_y)))
    assert is_white(region(sheet, (first_x + layout.cell_width, 0, layout.cell_origin(0, 1)[0], layout.height)))
    assert not is_white(region(sheet, layout.label_box(0)))


def test_wrap_truncates_with_ellipsis():
    font = grid._font(grid.FONT_SIZE)
    lines = grid._wrap("word " * 100, font, 100, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")


@pytest.mark.parametrize(
    ("images", "rows", "cols", "match"),
    [
        (solid_grid(2, 2), ["a"], ["x", "y"], "1 row labels for 2 rows"),
        (solid_grid(2, 2), ["a", "b"], ["x", "y", "z"], "3 column labels for 2 columns"),
        (solid_grid(1, 2) + solid_grid(1, 3), ["a", "b"], ["x", "y"], "row 1 has 3"),
        ([], [], [], "empty grid"),
        ([[]], ["a"], [], "empty grid"),
    ],
)
def test_bad_inputs_raise_value_error(images, rows, cols, match):
    with pytest.raises(ValueError, match=match):
        make_grid(images, rows, cols)


def test_non_positive_cell_size_raises():
    with pytest.raises(ValueError, match="cell_size"):
        make_grid(solid_grid(1, 1), ["a"], ["x"], cell_size=0)


def test_bitmap_font_fallback_on_old_pillow(monkeypatch):
    # Pillow < 10.1's load_default() takes no size; the grid must still draw with the bitmap font.
    real = grid.ImageFont.load_default

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()

    monkeypatch.setattr(grid.ImageFont, "load_default", old_load_default)
    grid._font.cache_clear()
    try:
        images = solid_grid(1, 1)
        layout = grid_layout(images, ["a long row label that wraps over lines"], ["x"], title="t")
        sheet = make_grid(images, ["a long row label that wraps over lines"], ["x"], title="t")
        assert sheet.size == (layout.width, layout.height)
        assert not is_white(region(sheet, layout.label_box(0)))
    finally:
        grid._font.cache_clear()  # later tests get the scalable font again
