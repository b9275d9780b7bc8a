"""The toy world: single plain-coloured objects on gently shaded backgrounds, with captions.

Every picture holds one object (a ball, cube, cup or star) of one colour, on one background,
lit from the upper left like the sample subject in ``sample_instances/polkaball``. The built-in
model ``builtin:toy`` is pretrained on this world, so that DreamBooth has something to teach:

- objects are one plain colour. The sample subject's white polka dots exist nowhere in this
  world, so a model that draws them has learnt them from the five photos. The *dotted world*
  (`dotted_share` > 0, `pretrain --dotted-share 0.4`) gives that share of objects dots of another
  colour ("a blue ball with white dots", "a red ball with yellow dots") but never the subject's
  combination, a red ball with white dots: there the subject is a new instance of known things.
  builtin:toy is pretrained on the plain world (docs/proof-of-learning.md: what the dotted one measured);
- captions are sometimes partial ("a photo of a ball"), so that a class prompt means any colour on
  any background: that variety is what prior preservation has to keep.

Drawing uses only numpy and PIL and is deterministic: the same Scene gives the same pixels. Shapes
are rendered at SUPERSAMPLE x the size and box-filtered down, for anti-aliased edges.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .subject import DOT_COS, icosahedron, rotation_matrix

CLASSES: tuple[str, ...] = ("ball", "cube", "cup", "star")

# Object colours. Red is the sample subject's red, so "a red ball" is its closest plain relative.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 25, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "orange": (240, 130, 30),
    "purple": (120, 50, 170),
    "white": (240, 240, 240),
    "black": (35, 35, 35),
}

# Background colours. The first five are the sample photos' backgrounds, so "on a blue background"
# means the same blue in the world and in the instance photos.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "blue": (70, 110, 190),
    "green": (80, 150, 90),
    "yellow": (225, 200, 90),
    "gray": (150, 150, 150),
    "purple": (130, 90, 170),
    "pink": (225, 150, 180),
    "white": (235, 235, 235),
    "orange": (230, 150, 70),
}

SIZE_RANGE = (0.35, 0.65)  # object extent as a fraction of the image side; the sample ball spans 0.38-0.72
MARGIN = 0.04  # keep objects this far (fraction of the side) from the border
# An object and its background must differ by at least this RGB distance, or the object would
# vanish (a yellow cube on a yellow or orange background, a purple star on blue).
MIN_CONTRAST = 90.0
SUPERSAMPLE = 4
LIGHT = np.array([-0.45, -0.6, 0.66]) / np.sqrt(0.45**2 + 0.6**2 + 0.66**2)  # upper left, towards the viewer

# Caption probabilities: a full caption half of the time; otherwise each part is kept independently.
P_FULL = 0.5
P_PHOTO = 0.6  # "a photo of ..."
P_COLOR = 0.5
P_BACKGROUND = 0.5
P_NO_ARTICLE = 0.2  # "a photo of ball": dreamlora's default class prompt has no article
P_DOTS_NAMED = 0.5  # a partial caption names an object's dots this often

# The dotted world: a share of objects carry dots of one of these colours (never their own, always visible on it).
DOT_COLORS: tuple[str, ...] = ("white", "black", "yellow", "blue", "red")
DOTTED_WORLD_SHARE = 0.4  # the share `pretrain --dotted-share` was tried with
# The sample subject: a red ball with white dots. Neither world draws it (see the module docstring).
SUBJECT = ("ball", "red", "white")
FLAT_DOT_SPACING = 0.3  # dots on cubes, cups and stars: a hexagonal grid, as fractions of the object's size
FLAT_DOT_RADIUS = 0.085


@dataclass(frozen=True)
class Scene:
    """One picture of the world.

    Attributes:
        cls: One of CLASSES.
        color: A key of COLORS (the object's colour).
        background: A key of BACKGROUNDS.
        x: Horizontal centre of the object, as a fraction of the width (0 left, 1 right).
        y: Vertical centre of the object, as a fraction of the height (0 top, 1 bottom).
        size: Extent of the object (its bounding box's longer side), as a fraction of the image side.
        dots: The colour (a key of COLORS) of the object's dots, or None for a plain object.
    """

    cls: str
    color: str
    background: str
    x: float
    y: float
    size: float
    dots: str | None = None

    def key(self) -> str:
        """A stable text of the scene (seeds its grain and dot layout). A plain scene keeps the text it had
        before scenes had dots, so plain scenes draw the same pixels as they always did."""
        text = (f"Scene(cls={self.cls!r}, color={self.color!r}, background={self.background!r}, x={self.x!r}, "
                f"y={self.y!r}, size={self.size!r})")
        return text if self.dots is None else f"{text} dots={self.dots}"


def allowed_pairs() -> list[tuple[str, str]]:
    """(colour, background) pairs with enough contrast to see the object, in a fixed order."""
    return [(color, background) for color, rgb in COLORS.items() for background, bg_rgb in BACKGROUNDS.items()
            if color != background and _contrast(rgb, bg_rgb) >= MIN_CONTRAST]


def _contrast(rgb: tuple[int, int, int], other: tuple[int, int, int]) -> float:
    """RGB distance between two colours: how well one shows on the other."""
    return float(np.linalg.norm(np.subtract(rgb, other, dtype=np.float64)))


_PAIRS = allowed_pairs()


def dot_colors(cls: str, color: str) -> list[str]:
    """The dot colours the world draws on a `color` `cls`: visible on it, and never the sample subject."""
    return [dots for dots in DOT_COLORS if dots != color and (cls, color, dots) != SUBJECT
            and _contrast(COLORS[dots], COLORS[color]) >= MIN_CONTRAST]


def random_placement(rng: np.random.Generator,
                     size_range: tuple[float, float] = SIZE_RANGE) -> tuple[float, float, float]:
    """A uniform size in `size_range` (drawn first), then a centre (x, y) that keeps the object MARGIN inside the
    image; returned as (x, y, size), the order of Scene's fields, all as fractions of the image side."""
    size = float(rng.uniform(*size_range))
    low, high = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    x, y = (float(v) for v in rng.uniform(low, high, size=2))
    return x, y, size


def random_scene(rng: np.random.Generator, dotted_share: float = 0.0, dotted_ball_share: float = 0.0,
                 white_dots: bool = False) -> Scene:
    """Draw a scene: uniform class, a uniform visible (colour, background) pair, position and size, and
    in the dotted world dots for a share of them (a uniform allowed dot colour).

    Args:
        rng: The random source; the same generator state gives the same scene.
        dotted_share: The share of scenes with dots; 0 (the plain world) draws nothing more from `rng`,
            so the plain world's scenes stay what they were before the dotted world existed.
        dotted_ball_share: A further share of scenes turned into dotted balls, whatever class and dots
            they drew: a ball's dots sit on a turned sphere, the hardest pattern of the world, and at
            dotted_share alone only a tenth of pictures show one. 0 draws nothing more from `rng`.
        white_dots: Every dotted object's dots are white, or black where white is not drawn (on white objects,
            and on red balls: the subject's combination). The same draws from `rng` as without it, so each scene
            is the dotted world's with only the dots' colour changed. One dot colour for five lets a tiny UNet
            learn the pattern instead of a mix of colours (docs/proof-of-learning.md).

    Returns:
        A Scene whose object lies wholly inside the image.
    """
    cls = CLASSES[int(rng.integers(len(CLASSES)))]
    color, background = _PAIRS[int(rng.integers(len(_PAIRS)))]
    x, y, size = random_placement(rng)
    dots = None
    if dotted_share and rng.random() < dotted_share:
        choices = dot_colors(cls, color)
        dots = choices[int(rng.integers(len(choices)))]
    if dotted_ball_share and rng.random() < dotted_ball_share:
        cls = "ball"
        choices = dot_colors(cls, color)
        dots = choices[int(rng.integers(len(choices)))]
    if white_dots and dots is not None:
        dots = "white" if "white" in dot_colors(cls, color) else "black"
    return Scene(cls, color, background, x, y, size, dots)


def draw_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Render a scene as an RGB image; the same Scene and size always give the same pixels.

    Args:
        scene: What to draw.
        size: Side of the square image in pixels.

    Returns:
        A `size` x `size` RGB PIL image.

    Raises:
        ValueError: the scene names an unknown class, colour or background.
    """
    _check(scene)
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n  # pixel centres in image fractions, so shapes scale with `size`
    xs, ys = np.meshgrid(coords, coords)

    img = _background(scene, xs, ys, size)
    coverage, shade, bottom = _SHAPES[scene.cls](scene, xs, ys)
    img *= (1.0 - 0.45 * _shadow(scene, xs, ys, bottom))[..., None]
    albedo = np.asarray(COLORS[scene.color], dtype=np.float64)
    if scene.dots is not None:
        albedo = np.where(_dot_mask(scene, xs, ys)[..., None], np.asarray(COLORS[scene.dots], np.float64), albedo)
    obj = albedo * shade[..., 0:1] + 255.0 * shade[..., 1:2]
    img = np.where(coverage[..., None], obj, img)

    # Box-filter down: (n, n, 3) -> (size, SS, size, SS, 3) -> mean.
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """The fraction of each pixel the object covers, shape (size, size), values in [0, 1].

    Useful to measure the object's colour in a drawn image (tests, evaluation).
    """
    _check(scene)
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(coords, coords)
    coverage = _SHAPES[scene.cls](scene, xs, ys)[0].astype(np.float64)
    return coverage.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def caption(scene: Scene, rng: np.random.Generator, noun_first_share: float = 0.0) -> str:
    """A caption of the scene: the full one, or with some parts left out.

    Full: "a photo of a red ball on a blue background", "a photo of a blue ball with white dots on a
    pink background". Partial, e.g.: "a photo of a ball",
    "a red ball", "a ball on an orange background", "a photo of ball" (dreamlora's default class
    prompt, "a photo of {class}", has no article). A partial caption never says
    something false, it just says less, so "a photo of a ball" covers balls of every colour on
    every background.

    Args:
        scene: The scene to describe.
        rng: Decides which parts are kept.
        noun_first_share: The share of partial captions without "a photo of" that drop the article too and
            start with the noun ("red ball on a blue background"); 0 (the shipped model's world) never draws
            for it, so the default keeps every caption and drawing of the seeded generators unchanged.

    Returns:
        The caption; every word is one token of dreamlora's built-in tokenizer.
    """
    if rng.random() < P_FULL:
        photo = color = background = article = dots = True
    else:
        photo = rng.random() < P_PHOTO
        color = rng.random() < P_COLOR
        background = rng.random() < P_BACKGROUND
        article = rng.random() >= P_NO_ARTICLE
        dots = scene.dots is not None and rng.random() < P_DOTS_NAMED  # plain scenes: the old draws
    words = ["a", "photo", "of"] if photo else []
    noun = [scene.color, scene.cls] if color else [scene.cls]
    # "red ball" alone reads badly: keep the article without the prefix, unless noun-first captions are asked for
    noun_first = not photo and noun_first_share > 0 and rng.random() < noun_first_share
    if not noun_first and (article or not photo):
        words.append(_article(noun[0]))
    words += noun
    if dots and scene.dots is not None:
        words += ["with", scene.dots, "dots"]
    if background:
        words += ["on", _article(scene.background), scene.background, "background"]
    return " ".join(words)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_words() -> set[str]:
    """Every word `caption` can produce."""
    return {"a", "an", "photo", "of", "on", "with", "dots", "background", *CLASSES, *COLORS, *BACKGROUNDS}


def dataset(n: int, seed: int, size: int = 64, dotted_share: float = 0.0,
            dotted_ball_share: float = 0.0, white_dots: bool = False) -> list[tuple[Image.Image, str, Scene]]:
    """`n` (image, caption, scene) triples drawn from one seeded generator.

    Args:
        n: How many examples.
        seed: The same seed gives the same examples.
        size: Image side in pixels.
        dotted_share: The share of dotted objects (0: the plain world).
        dotted_ball_share: A further share of dotted balls (random_scene).
        white_dots: White dots only, black where white is not drawn (random_scene).

    Returns:
        A list of (RGB image, caption, scene).
    """
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        scene = random_scene(rng, dotted_share, dotted_ball_share, white_dots)
        examples.append((draw_scene(scene, size), caption(scene, rng), scene))
    return examples


# --- drawing -------------------------------------------------------------------------------------


def _check(scene: Scene) -> None:
    for value, known, what in ((scene.cls, CLASSES, "class"), (scene.color, COLORS, "colour"),
                               (scene.background, BACKGROUNDS, "background"), (scene.dots or "white", COLORS, "dots")):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r} in {scene}; known: {', '.join(known)}")


def _background(scene: Scene, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """The background colour, a little lighter at the top, with faint per-pixel grain, (n, n, 3)."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    img = base * (1.08 - 0.16 * ys[..., None])
    # The grain is seeded from the scene itself (crc32 of its repr: stable across runs, unlike
    # hash()), so the drawing stays a pure function of the Scene.
    grain_rng = np.random.default_rng(zlib.crc32(f"({scene.key()}, {size!r})".encode()))
    grain = grain_rng.integers(-4, 5, size=(size, size)).astype(np.float64)
    return img + np.repeat(np.repeat(grain, SUPERSAMPLE, 0), SUPERSAMPLE, 1)[..., None]


def _shadow(scene: Scene, xs: np.ndarray, ys: np.ndarray, bottom: float) -> np.ndarray:
    """Soft contact shadow (0..1) under the object: a flattened ellipse at its base, right of centre."""
    r = scene.size / 2
    sx = (xs - (scene.x + 0.15 * r)) / (r * 0.95)
    sy = (ys - bottom) / (r * 0.22)
    s = np.clip(1.0 - (sx * sx + sy * sy), 0.0, 1.0)
    return s * s


def _dot_mask(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Where the object's dots are, bool (n, n); the shape's coverage decides which of them show.

    A ball carries the sample subject's pattern (dots on the vertices of an icosahedron, turned by a
    rotation seeded from the scene), so world balls and the subject have the same dots; flat
    objects carry a hexagonal grid of discs at an offset seeded from the scene.
    """
    rng = np.random.default_rng(zlib.crc32(f"dots {scene.key()}".encode()))
    if scene.cls == "ball":
        r = scene.size / 2
        nx, ny = (xs - scene.x) / r, (ys - scene.y) / r
        nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, None))
        body = np.stack([nx, ny, nz], axis=-1) @ rotation_matrix(rng.uniform(-1.0, 1.0, size=4))
        return (body @ icosahedron().T).max(axis=-1) > DOT_COS
    spacing, radius = FLAT_DOT_SPACING * scene.size, FLAT_DOT_RADIUS * scene.size
    ox, oy = rng.uniform(0.0, spacing, size=2)
    row_height = spacing * np.sqrt(3.0) / 2
    row = np.rint((ys - oy) / row_height)
    shift = (row % 2) * spacing / 2
    column = np.rint((xs - ox - shift) / spacing)
    return (xs - ox - shift - column * spacing) ** 2 + (ys - oy - row * row_height) ** 2 <= radius * radius


# Each shape returns (coverage bool (n, n), shade (n, n, 2), bottom y): the object colour at a
# pixel is  albedo * shade[0] + 255 * shade[1]  (diffuse times albedo plus a white highlight); the
# albedo is the object's colour, and its dots' colour where it has dots.


def _ball(scene: Scene, xs: np.ndarray, ys: np.ndarray):
    r = scene.size / 2
    nx, ny = (xs - scene.x) / r, (ys - scene.y) / r
    d2 = nx * nx + ny * ny
    inside = d2 < 1.0
    nz = np.sqrt(np.clip(1.0 - d2, 0.0, None))
    normals = np.stack([nx, ny, nz], axis=-1)
    lambert = np.clip(normals @ LIGHT, 0.0, None)
    half = LIGHT + np.array([0.0, 0.0, 1.0])
    spec = np.clip(normals @ (half / np.linalg.norm(half)), 0.0, None)
    for _ in range(6):  # exponent 64 by repeated squaring, as the sample subject's renderer does
        spec = spec * spec
    shade = np.stack([0.28 + 0.8 * lambert, 0.75 * spec], axis=-1)
    return inside, shade, scene.y + 0.9 * r


def _cube(scene: Scene, xs: np.ndarray, ys: np.ndarray):
    """An oblique view: front square, top and right faces receding up and to the right."""
    side = scene.size
    a = side / 1.35  # front face; the receding depth d = 0.35 a makes the bounding box side x side
    d = 0.35 * a
    left, top = scene.x - side / 2, scene.y - side / 2
    fx0, fy0 = left, top + d  # front face's top-left corner
    u, v = xs - fx0, ys - fy0  # relative to it: u right, v down
    front = (u >= 0) & (u <= a) & (v >= 0) & (v <= a)
    # Top face: points (u, v) = (s + t, -t) with s in [0, a], t in [0, d].
    t_top = -v
    top_face = (t_top >= 0) & (t_top <= d) & (u - t_top >= 0) & (u - t_top <= a)
    # Right face: points (a + t, s - t) with s in [0, a], t in [0, d].
    t_side = u - a
    side_face = (t_side >= 0) & (t_side <= d) & (v + t_side >= 0) & (v + t_side <= a)
    inside = front | top_face | side_face
    # Lambert shading per face (top faces the light most) with a gentle gradient inside each face.
    gradient = 0.08 * (0.5 - np.clip(v / a, -0.5, 1.0))
    diffuse = np.where(top_face & ~front, 1.05, np.where(side_face & ~front, 0.55, 0.82)) + gradient
    shade = np.stack([diffuse, np.zeros_like(diffuse)], axis=-1)
    return inside, shade, fy0 + a - 0.05 * a


def _cup(scene: Scene, xs: np.ndarray, ys: np.ndarray):
    """A tapered cup seen slightly from above: body, rim with a dark opening, handle on the right."""
    h = scene.size  # height is the longer side
    w_top = 0.68 * h
    handle_out = 0.2 * h
    cx = scene.x - handle_out / 2  # centre body + handle in the box
    y_top, y_bottom = scene.y - h / 2 + 0.1 * w_top, scene.y + h / 2
    rim_b = 0.1 * w_top  # the rim ellipse's vertical semi-axis
    frac = np.clip((ys - y_top) / (y_bottom - y_top), 0.0, 1.0)
    half_w = (w_top / 2) * (1.0 - 0.25 * frac)  # the body narrows to 75% at the foot
    body = (ys >= y_top) & (ys <= y_bottom) & (np.abs(xs - cx) <= half_w)
    rim = ((xs - cx) / (w_top / 2)) ** 2 + ((ys - y_top) / rim_b) ** 2 <= 1.0
    opening = ((xs - cx) / (0.9 * w_top / 2)) ** 2 + ((ys - y_top) / (0.8 * rim_b)) ** 2 <= 1.0
    # Handle: a ring centred on the body's right edge, outside the body.
    hx, hy = cx + 0.36 * w_top, scene.y + 0.08 * h
    dist = np.sqrt((xs - hx) ** 2 + (ys - hy) ** 2)
    handle = (dist <= 0.24 * h) & (dist >= 0.13 * h) & ~body & (xs > cx)
    inside = body | rim | handle
    # Cylinder shading across the body: the normal turns from left to right.
    nx = np.clip((xs - cx) / np.maximum(half_w, 1e-6), -1.0, 1.0)
    lambert = np.clip(LIGHT[0] * nx + LIGHT[2] * np.sqrt(1.0 - nx * nx), 0.0, None)
    diffuse = 0.3 + 0.75 * lambert
    diffuse = np.where(handle, 0.7, diffuse)
    diffuse = np.where(opening, 0.3 + 0.25 * (ys - y_top + rim_b) / (2 * rim_b), diffuse)  # the dark inside
    shade = np.stack([diffuse, np.zeros_like(diffuse)], axis=-1)
    return inside, shade, y_bottom - 0.03 * h


def _star(scene: Scene, xs: np.ndarray, ys: np.ndarray):
    """A five-pointed star, point up, bevelled like a low pyramid: ten facets lit differently."""
    outer = scene.size / 2
    inner = 0.45 * outer  # chunkier than a classic star (0.38) so the arms survive at 64 px
    cy = scene.y + 0.095 * outer  # centre the bounding box: the top point reaches higher than the lower two
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # vertex i: outer for even i, inner for odd
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    vx, vy = scene.x + radii * np.cos(angles), cy + radii * np.sin(angles)
    theta = np.mod(np.arctan2(ys - cy, xs - scene.x) + np.pi / 2, 2 * np.pi)
    facet = np.minimum((theta // (np.pi / 5)).astype(np.int64), 9)  # pixel lies between vertex facet and facet + 1
    # Inside the star: on the centre's side of the edge from vertex facet to vertex facet + 1.
    ax, ay = vx[facet], vy[facet]
    bx, by = vx[(facet + 1) % 10], vy[(facet + 1) % 10]
    cross_p = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
    cross_c = (bx - ax) * (cy - ay) - (by - ay) * (scene.x - ax)
    inside = cross_p * cross_c >= 0
    # Facet normals of a pyramid with apex height 0.35 * outer over the centre.
    height = 0.35 * outer
    i = np.arange(10)
    p = np.stack([vx[i] - scene.x, vy[i] - cy, np.zeros(10)], axis=-1)
    q = np.stack([vx[(i + 1) % 10] - scene.x, vy[(i + 1) % 10] - cy, np.zeros(10)], axis=-1)
    apex = np.array([0.0, 0.0, height])
    normals = np.cross(p - apex, q - apex)
    normals *= np.sign(normals[:, 2:3])  # facing the viewer (+z)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    lambert = np.clip(normals @ LIGHT, 0.0, None)
    diffuse = (0.3 + 0.8 * lambert)[facet]
    shade = np.stack([diffuse, np.zeros_like(diffuse)], axis=-1)
    bottom = cy + outer * np.sin(np.radians(54.0)) - 0.05 * outer  # the two lower points
    return inside, shade, bottom


_SHAPES = {"ball": _ball, "cube": _cube, "cup": _cup, "star": _star}
