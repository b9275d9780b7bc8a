"""The sample DreamBooth subject, drawable anywhere: a red ball with white polka dots.

`scripts/make_sample_instances.py` draws the five shipped photos with `draw_polka_ball`; the toy
oracle (oracle.py) draws many more, at 64 px on the world's backgrounds, as the positives of its
subject detector. The toy world draws dotted objects but never this one, a red ball with white
dots (world.py), so a model that draws it for "sks ball" has learnt it from the five photos.

To keep the shipped PNGs byte-identical across machines, the drawing avoids transcendental maths
(no sin/cos/pow from libm): the dots sit on the vertices of an icosahedron, rotations come from
normalised quaternions, and the specular exponent is done by repeated squaring. Only +, *, / and
sqrt remain, which IEEE fixes exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SUPERSAMPLE = 4  # render at 4x and box-filter down: cheap anti-aliasing for the ball edge and dots
BALL_RED = (205.0, 25.0, 30.0)  # the world's "red" (world.COLORS["red"])
DOT_WHITE = (245.0, 242.0, 235.0)
# cos of a dot's angular radius (~18 deg); neighbouring icosahedron vertices are ~63 deg apart,
# so the dots are well separated, like a real polka-dot ball.
DOT_COS = 0.951
LIGHT = np.array([-0.45, -0.6, 0.66])  # from the upper left, towards the viewer (x right, y down)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True))


def icosahedron() -> np.ndarray:
    """The 12 vertices of a regular icosahedron on the unit sphere, shape (12, 3)."""
    phi = (1.0 + np.sqrt(5.0)) / 2.0
    verts = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            verts += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    return _unit(np.array(verts))


def rotation_matrix(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a (not necessarily unit) quaternion (w, x, y, z)."""
    w, x, y, z = q / np.sqrt(np.sum(q * q))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def draw_polka_ball(
    size: int,
    background: tuple[float, float, float],
    center: tuple[float, float],
    radius: float,
    quaternion: np.ndarray,
    grain: np.ndarray,
    *,
    ball_color: tuple[float, float, float] = BALL_RED,
    dot_color: tuple[float, float, float] = DOT_WHITE,
) -> Image.Image:
    """Render one polka-dot ball on a gently shaded background, lit from the upper left.

    Args:
        size: Side of the square output image in pixels.
        background: Background RGB (0-255); a little lighter at the top, darker at the bottom.
        center: (x, y) of the ball's centre in output pixels.
        radius: Ball radius in output pixels.
        quaternion: (w, x, y, z), need not be unit: which face of the ball faces the camera.
        grain: (size, size) integer-valued per-pixel brightness grain added to the background.
        ball_color: RGB of the ball between the dots.
        dot_color: RGB of the dots.

    Returns:
        A `size` x `size` RGB image; the same arguments always give the same pixels.
    """
    n = size * SUPERSAMPLE
    cx, cy = center
    rot = rotation_matrix(np.asarray(quaternion, dtype=np.float64))

    # Pixel centres in output-pixel units, shape (n, n).
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)

    # Background: the base colour, a little lighter at the top, plus faint grain ("gently textured").
    base = np.array(background, dtype=np.float64)
    img = base * (1.08 - 0.16 * ys[..., None] / size)
    grain = np.asarray(grain).astype(np.float64)
    img += np.repeat(np.repeat(grain, SUPERSAMPLE, 0), SUPERSAMPLE, 1)[..., None]

    # Soft contact shadow: a flattened ellipse under the ball, darkest at its centre.
    sx = (xs - (cx + 0.15 * radius)) / (radius * 0.95)
    sy = (ys - (cy + 0.9 * radius)) / (radius * 0.25)
    s = np.clip(1.0 - (sx * sx + sy * sy), 0.0, 1.0)
    img *= (1.0 - 0.45 * s * s)[..., None]

    # Sphere: surface normal (nx, ny, nz) of each pixel inside the disc.
    nx = (xs - cx) / radius
    ny = (ys - cy) / radius
    d2 = nx * nx + ny * ny
    inside = d2 < 1.0
    nz = np.sqrt(np.clip(1.0 - d2, 0.0, None))
    normals = np.stack([nx, ny, nz], axis=-1)  # (n, n, 3)

    # Dots: a pixel is white when its normal, turned into the ball's own frame, is near a vertex.
    body = normals @ rot  # (n, n, 3), rotating the pattern with the ball
    near = (body @ icosahedron().T).max(axis=-1) > DOT_COS
    albedo = np.where(near[..., None], np.array(dot_color), np.array(ball_color))

    # Shading: ambient + Lambert + Blinn-Phong highlight (exponent 64 by repeated squaring).
    light = _unit(LIGHT)
    lambert = np.clip(normals @ light, 0.0, None)
    half = _unit(light + np.array([0.0, 0.0, 1.0]))
    spec = np.clip(normals @ half, 0.0, None)
    for _ in range(6):
        spec = spec * spec
    ball = albedo * (0.28 + 0.8 * lambert[..., None]) + 255.0 * 0.75 * spec[..., None]
    img = np.where(inside[..., None], ball, img)

    # Box-filter down: (n, n, 3) -> (size, SUPERSAMPLE, size, SUPERSAMPLE, 3) -> mean.
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def random_polka_ball(rng: np.random.Generator, background: tuple[float, float, float], *, size: int = 64,
                      size_range: tuple[float, float] = (0.3, 0.7),
                      ball_color: tuple[float, float, float] = BALL_RED,
                      dot_color: tuple[float, float, float] = DOT_WHITE) -> Image.Image:
    """A polka-dot ball at a random place, size and rotation, like a toy-world scene.

    Args:
        rng: The random source; the same generator state gives the same picture.
        background: Background RGB (e.g. a value of world.BACKGROUNDS).
        size: Image side in pixels.
        size_range: The ball's diameter as a fraction of the side, drawn uniformly; the ball stays world.MARGIN
            inside the border (world.random_placement).
        ball_color: RGB of the ball between the dots.
        dot_color: RGB of the dots.

    Returns:
        A `size` x `size` RGB image.
    """
    from .world import random_placement  # world imports this module

    x, y, diameter = random_placement(rng, size_range)
    cx, cy = x * size, y * size
    quaternion = rng.uniform(-1.0, 1.0, size=4)
    grain = rng.integers(-4, 5, size=(size, size))
    return draw_polka_ball(size, background, (cx, cy), diameter * size / 2, quaternion, grain, ball_color=ball_color,
                           dot_color=dot_color)
