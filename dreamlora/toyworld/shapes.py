"""Reading a render's pixels for what a person checks before calling it the subject: one round object of the
subject's colour, carrying separate white dots.

The oracle's network (oracle.py) learnt "polka dots on a ball" from drawings, and on renders it also fires on
red-and-white crumpled shapes and smeared highlights (precision 0.22 against labels by eye,
benchmarks/oracle_labels/). This reads the geometry directly, with thresholds set on the world's own drawings
(never on the labelled renders):

- the object: the largest 4-connected region of the subject's hue (saturated, not dark), every hole it encloses,
  and the white inside its convex hull, so a dot on the rim (a notch in the red, open to the background, and on a
  white background one region with it) is part of the ball, as on the world's drawings; where that white would
  add more than rim dots ever do (a star's or a cup's concavities on a light background), the region and its holes;
- roundness: intersection over union of that object with the disc of the same area around its centre of mass
  (a drawn ball 0.78-0.95, a star well under);
- dots: the separate white regions on the object, each small (a dot, not a smear over the ball) and compact
  (not a streak);
- no bar: the longest white mark, along its main axis, as a fraction of the object's diameter (a bar or a worm
  is longer than any drawn dot), and the white share of the object (a white ball with red marks is not a red
  ball with white dots).

builtin:toy-dots' renders of the subject are round balls whose white marks are dots, bars or worms, and the
rim-dot and no-bar rules were added for them (2026-12-05: on the world's drawings of the subject the test then
passes 0.94-0.98, against 0.81-0.90 before, most misses having been dots on the rim).

Pure numpy; a 64 px render reads in a few milliseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

HUE_TOLERANCE = 25.0  # degrees either side of the subject colour's hue; shading keeps the hue, not the value
MIN_SATURATION, MIN_VALUE = 0.45, 0.18  # pink and orange backgrounds stay under the saturation bound
WHITE_MIN_CHANNEL, WHITE_MAX_SATURATION = 0.55, 0.45
DOT_MIN_PIXELS, DOT_MAX_SHARE, DOT_MAX_ELONGATION = 2, 0.15, 3.0  # share: of the object's area
RIM_MAX_CLOSED = 0.18  # of the hull: rim dots close at most 0.15 of it on drawings, a star's points leave 0.22+


@dataclass(frozen=True)
class ShapeReading:
    """The subject-coloured object of one image: how round it is and how many separate white dots it carries."""

    roundness: float  # 0.0 when the image holds no object of the colour
    dots: int
    area: int  # pixels of the object (holes and rim dots included)
    longest_mark: float = 0.0  # the longest white mark on the object, as a fraction of the object's diameter
    white_share: float = 0.0  # of the object's pixels, the white ones


def read_shape(rgb: np.ndarray, color: tuple[int, int, int]) -> ShapeReading:
    """The object of `color` (RGB 0-255) in a picture given as an (H, W, 3) float array in [0, 1] (the oracle's
    input, oracle.images_to_tensor, channels last)."""
    hue, saturation, value = _hsv(rgb)
    target_hue = float(_hsv(np.array([[color]], dtype=np.float32) / 255.0)[0][0, 0])
    hue_gap = np.abs((hue - target_hue + 180.0) % 360.0 - 180.0)
    colored = (hue_gap <= HUE_TOLERANCE) & (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)
    regions = _components(colored)
    if not regions:
        return ShapeReading(0.0, 0, 0)
    white = (rgb.min(axis=2) >= WHITE_MIN_CHANNEL) & (saturation <= WHITE_MAX_SATURATION)
    body = _mask(max(regions, key=len), colored.shape)
    # A dot on the rim cuts a notch into the coloured region, open to the background: the white inside the region's
    # convex hull closes it (on a white background the notch and the background are one white region). A star's or
    # a cup's concavities on a light background would close too: where that adds more than rim dots ever do, the
    # object stays the region with its holes.
    filled = _fill_holes(body)
    hull = _convex_hull(body)
    closed = _fill_holes(body | (white & hull))
    obj = closed if (closed & ~filled).sum() <= RIM_MAX_CLOSED * hull.sum() else filled
    ys, xs = np.nonzero(obj)
    area = len(ys)
    radius = np.sqrt(area / np.pi)
    grid_y, grid_x = np.mgrid[:obj.shape[0], :obj.shape[1]]
    distance2 = (grid_y - ys.mean()) ** 2 + (grid_x - xs.mean()) ** 2
    disc = distance2 <= radius ** 2
    roundness = float((obj & disc).sum() / (obj | disc).sum())
    marks = _components(white & obj)
    dots = sum(_is_dot(mark, area) for mark in marks)
    longest = max((_length(mark) for mark in marks), default=0.0) / (2 * radius)
    white_share = float((white & obj).sum() / area)
    return ShapeReading(round(roundness, 4), dots, area, round(longest, 4), round(white_share, 4))


def shows_subject_shape(reading: ShapeReading, min_roundness: float, min_dots: int, max_mark: float,
                        max_white: float) -> bool:
    """Round enough, with enough separate dots, no white mark longer than `max_mark` of the object's diameter (a
    bar or a worm, not a dot) and no more than `max_white` of it white (a white ball with red marks)."""
    return (reading.roundness >= min_roundness and reading.dots >= min_dots and reading.longest_mark <= max_mark
            and reading.white_share <= max_white)


def _is_dot(region: np.ndarray, object_area: int) -> bool:
    if len(region) < DOT_MIN_PIXELS or len(region) > DOT_MAX_SHARE * object_area:
        return False
    if len(region) < 3:
        return True
    spread = np.linalg.eigvalsh(np.cov(region.T.astype(np.float64)) + 0.05 * np.eye(2))
    return bool(np.sqrt(spread[1] / spread[0]) <= DOT_MAX_ELONGATION)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels whose centres lie in the convex hull of `mask`'s pixel centres (monotone chain)."""
    points = [tuple(point) for point in np.argwhere(mask).tolist()]  # row-major: sorted, as the chain needs
    if len(points) < 3:
        return mask.copy()

    def cross(o, a, b) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    upper: list = []
    for point in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], point) <= 0:
            lower.pop()
        lower.append(point)
    for point in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], point) <= 0:
            upper.pop()
        upper.append(point)
    corners = lower[:-1] + upper[:-1]
    if len(corners) < 3:
        return mask.copy()
    grid_y, grid_x = np.mgrid[:mask.shape[0], :mask.shape[1]]
    inside = np.ones(mask.shape, dtype=bool)
    for (y0, x0), (y1, x1) in zip(corners, corners[1:] + corners[:1]):  # counter-clockwise: left of each edge
        inside &= (y1 - y0) * (grid_x - x0) - (x1 - x0) * (grid_y - y0) >= 0
    return inside | mask


def _length(region: np.ndarray) -> float:
    """A region's extent along its main axis: a bar of length L has variance L**2 / 12 along it."""
    if len(region) < 3:
        return float(np.sqrt(len(region)))
    return float(np.sqrt(12.0 * np.linalg.eigvalsh(np.cov(region.T.astype(np.float64)))[1]))


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(chroma > 0, hue * 60.0, 0.0)
    saturation = np.where(high > 0, chroma / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, each as an (n, 2) array of (row, column)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def _mask(region: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[region[:, 0], region[:, 1]] = True
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every part of its complement that does not reach the image border filled in."""
    outside = np.zeros_like(mask)
    outside[[0, -1], :] = ~mask[[0, -1], :]
    outside[:, [0, -1]] = ~mask[:, [0, -1]]
    while True:  # grow the outside through the complement until it stops (at most a few dozen steps)
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown
