"""Draw the sample DreamBooth subject: a red ball with white polka dots, five photos.

Run from anywhere:

    python scripts/make_sample_instances.py

It writes ``sample_instances/polkaball/01.png`` .. ``05.png`` (128x128 RGB). The drawing is
seeded and uses only numpy and PIL, so a rerun gives byte-identical files. To keep it stable
across machines it avoids transcendental maths (no sin/cos/pow from libm): the dots sit on the
vertices of an icosahedron, rotations come from normalised quaternions, and the specular
exponent is done by repeated squaring. Only +, *, / and sqrt remain, which IEEE fixes exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128  # output side in pixels
SUPERSAMPLE = 4  # render at 4x and box-filter down: cheap anti-aliasing for the ball edge and dots
DEFAULT_SEED = 7
OUT_DIR = Path(__file__).resolve().parent.parent / "sample_instances" / "polkaball"

# One background a photo, so the subject is the only thing the photos share.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (70, 110, 190),  # blue
    (80, 150, 90),  # green
    (225, 200, 90),  # yellow
    (150, 150, 150),  # gray
    (130, 90, 170),  # purple
)
# Ball radius (px) a photo: near, far and in between, so the subject is seen at several sizes.
RADII: tuple[float, ...] = (40.0, 28.0, 46.0, 34.0, 24.0)

BALL_RED = np.array([205.0, 25.0, 30.0])
DOT_WHITE = np.array([245.0, 242.0, 235.0])
# cos of a dot's angular radius (~18 deg); neighbouring icosahedron vertices are ~63 deg apart,
# so the dots are well separated, like a real polka-dot ball.
DOT_COS = 0.951
LIGHT = np.array([-0.45, -0.6, 0.66])  # from the upper left, towards the viewer (x right, y down)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True))


def _icosahedron() -> np.ndarray:
    """The 12 vertices of a regular icosahedron on the unit sphere, shape (12, 3)."""
    phi = (1.0 + np.sqrt(5.0)) / 2.0
    verts = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            verts += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    return _unit(np.array(verts))


def _rotation(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a (not necessarily unit) quaternion (w, x, y, z)."""
    w, x, y, z = q / np.sqrt(np.sum(q * q))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _draw_one(rng: np.random.Generator, background: tuple[int, int, int], radius: float) -> Image.Image:
    """Render one photo at SUPERSAMPLE x resolution and box-filter it down to SIZE x SIZE."""
    n = SIZE * SUPERSAMPLE
    margin = radius + 6.0  # keep the whole ball (and most of its shadow) in frame
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    rot = _rotation(rng.uniform(-1.0, 1.0, size=4))  # a different face of the ball towards the camera

    # Pixel centres in output-pixel units, shape (n, n).
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)

    # Background: the base colour, a little lighter at the top, plus faint grain ("gently textured").
    base = np.array(background, dtype=np.float64)
    img = base * (1.08 - 0.16 * ys[..., None] / SIZE)
    grain = rng.integers(-4, 5, size=(SIZE, SIZE)).astype(np.float64)
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
    near = (body @ _icosahedron().T).max(axis=-1) > DOT_COS
    albedo = np.where(near[..., None], DOT_WHITE, BALL_RED)

    # Shading: ambient + Lambert + Blinn-Phong highlight (exponent 64 by repeated squaring).
    light = _unit(LIGHT)
    lambert = np.clip(normals @ light, 0.0, None)
    half = _unit(light + np.array([0.0, 0.0, 1.0]))
    spec = np.clip(normals @ half, 0.0, None)
    for _ in range(6):
        spec = spec * spec
    ball = albedo * (0.28 + 0.8 * lambert[..., None]) + 255.0 * 0.75 * spec[..., None]
    img = np.where(inside[..., None], ball, img)

    # Box-filter down: (n, n, 3) -> (SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3) -> mean.
    img = img.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def draw_instances(seed: int = DEFAULT_SEED) -> list[Image.Image]:
    """Draw the five sample photos of the polka-dot ball.

    Args:
        seed: Seed for positions, rotations and background grain. The same seed gives the
            same pixels.

    Returns:
        Five 128x128 RGB images, one per background in ``BACKGROUNDS``.
    """
    rng = np.random.default_rng(seed)
    return [_draw_one(rng, bg, r) for bg, r in zip(BACKGROUNDS, RADII)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"drawing seed (default {DEFAULT_SEED})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(draw_instances(args.seed), start=1):
        path = args.out / f"{i:02d}.png"
        # Plain save: PIL adds no tIME/text chunks unless asked, so reruns are byte-identical.
        image.save(path, format="PNG")
        print(path)


if __name__ == "__main__":
    main()
