"""Draw the sample DreamBooth subject: a red ball with white polka dots, five photos.

Run from anywhere:

    python scripts/make_sample_instances.py

It writes ``sample_instances/polkaball/01.png`` .. ``05.png`` (128x128 RGB). The drawing is
seeded and uses only numpy and PIL, so a rerun gives byte-identical files. To keep it stable
across machines it avoids transcendental maths (no sin/cos/pow from libm): the dots sit on the
vertices of an icosahedron, rotations come from normalised quaternions, and the specular
exponent is done by repeated squaring. Only +, *, / and sqrt remain, which IEEE fixes exactly.
The drawing itself lives in dreamlora/toyworld/subject.py, which the toy oracle shares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dreamlora, when it is not installed
from dreamlora.toyworld.subject import draw_polka_ball  # noqa: E402

SIZE = 128  # output side in pixels
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


def _draw_one(rng: np.random.Generator, background: tuple[int, int, int], radius: float) -> Image.Image:
    """Draw one photo's random placement, rotation and grain (in this order), then render it."""
    margin = radius + 6.0  # keep the whole ball (and most of its shadow) in frame
    cx, cy = rng.uniform(margin, SIZE - margin, size=2)
    quaternion = rng.uniform(-1.0, 1.0, size=4)  # a different face of the ball towards the camera
    grain = rng.integers(-4, 5, size=(SIZE, SIZE))
    return draw_polka_ball(SIZE, background, (cx, cy), radius, quaternion, grain)


def draw_instances(seed: int = DEFAULT_SEED, radii: tuple[float, ...] = RADII) -> list[Image.Image]:
    """Draw the five sample photos of the polka-dot ball.

    Args:
        seed: Seed for positions, rotations and background grain. The same seed gives the
            same pixels.
        radii: Ball radius (px) a photo; other radii move the ball nearer or further (the
            benchmark's `prior-photos-near`).

    Returns:
        Five 128x128 RGB images, one per background in ``BACKGROUNDS``.
    """
    rng = np.random.default_rng(seed)
    return [_draw_one(rng, bg, r) for bg, r in zip(BACKGROUNDS, radii, strict=True)]


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
