"""The pixels' test of the subject (dreamlora/toyworld/shapes.py): one round object of the subject's colour carrying
separate white dots; and what it adds to the oracle's reading, against the renders labelled by eye."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dreamlora.toyworld import BACKGROUNDS, COLORS
from dreamlora.toyworld.world import draw_scene, random_scene
from dreamlora.toyworld.oracle import OracleConfig, images_to_tensor, load_oracle
from dreamlora.toyworld.shapes import ShapeReading, shows_subject_shape
from dreamlora.toyworld.shapes import read_shape as read_pixels
from dreamlora.toyworld.subject import random_polka_ball
from dreamlora.toyworld.train_oracle import draw_glossy_balls

ROOT = Path(__file__).resolve().parents[1]
RED, CONFIG = COLORS["red"], OracleConfig()


def read_shape(image: Image.Image, color: tuple[int, int, int]) -> ShapeReading:
    """The pixels' test on a picture as the oracle reads it (resized to 64 px, [0, 1], channels last)."""
    return read_pixels(images_to_tensor([image])[0].permute(1, 2, 0).numpy(), color)


def world_pictures(cls: str, color: str, n: int, seed: int) -> list[Image.Image]:
    """n world pictures of a `color` `cls` (scenes drawn at random until n match; only those are rendered)."""
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        scene = random_scene(rng)
        if scene.cls == cls and scene.color == color:
            scenes.append(scene)
    return [draw_scene(scene) for scene in scenes]


def ball(marks=(), background=(70, 110, 190), radius=18) -> Image.Image:
    """A red disc at the centre of a 64 px picture with white marks drawn on it: ("dot", x, y, r) or
    ("bar", x0, y0, x1, y1)."""
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((32 - radius, 32 - radius, 32 + radius, 32 + radius), fill=RED)
    for kind, *at in marks:
        if kind == "dot":
            x, y, r = at
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(245, 242, 235))
        else:
            draw.rectangle(at, fill=(245, 242, 235))
    return image


def test_separate_dots_on_a_round_ball_are_counted():
    reading = read_shape(ball([("dot", 25, 25, 3), ("dot", 39, 27, 3), ("dot", 31, 40, 3)]), RED)
    assert reading.roundness >= 0.9 and reading.dots == 3
    assert shows_subject_shape(reading, CONFIG.subject_min_roundness, CONFIG.subject_min_dots)


@pytest.mark.parametrize("marks, why", [
    ([("dot", 27, 26, 3)], "one highlight is not polka dots"),
    ([("bar", 18, 30, 46, 33)], "a streak is not a dot"),
    ([("dot", 30, 30, 9)], "a smear over a third of the ball is not a dot"),
    ([("dot", 25, 30, 3), ("dot", 30, 30, 3)], "two touching blobs are one mark"),
])
def test_what_is_not_separate_dots(marks, why):
    reading = read_shape(ball(marks), RED)
    assert not shows_subject_shape(reading, CONFIG.subject_min_roundness, CONFIG.subject_min_dots), why


def test_a_lumpy_or_pointed_object_is_not_round():
    lumpy = ball([("dot", 25, 25, 3), ("dot", 39, 27, 3), ("dot", 31, 40, 3)])
    draw = ImageDraw.Draw(lumpy)
    for dx, dy in ((-20, -10), (17, 15), (-8, 22)):  # red lobes sticking out of the disc
        draw.ellipse((32 + dx - 10, 32 + dy - 10, 32 + dx + 10, 32 + dy + 10), fill=RED)
    assert read_shape(lumpy, RED).roundness < CONFIG.subject_min_roundness
    stars = world_pictures("star", "red", 12, seed=5)
    assert all(read_shape(s, RED).roundness < CONFIG.subject_min_roundness for s in stars)


def test_drawn_subjects_and_the_photos_pass_and_plain_balls_do_not():
    rng = np.random.default_rng(3)
    names = list(BACKGROUNDS)
    polka = [random_polka_ball(rng, BACKGROUNDS[names[i % len(names)]]) for i in range(64)]
    passed = [shows_subject_shape(read_shape(p, RED), CONFIG.subject_min_roundness, CONFIG.subject_min_dots)
              for p in polka]
    assert np.mean(passed) >= 0.8  # poses that turn most dots away fail, as they would fail a person
    photos = [Image.open(p) for p in sorted((ROOT / "sample_instances" / "polkaball").glob("*.png"))]
    plain = world_pictures("ball", "red", 12, seed=6)
    for drawn, expected in ((photos, True), (plain, False)):
        assert all(shows_subject_shape(read_shape(d, RED), CONFIG.subject_min_roundness, CONFIG.subject_min_dots)
                   == expected for d in drawn)


def test_a_glossy_ball_is_left_to_the_network():
    """A highlight and one white spot count two marks on the pixels; the oracle's dot head, trained with such balls
    as negatives, rejects them, so the reading as a whole does."""
    glossy = [Image.fromarray(a) for a in draw_glossy_balls(CONFIG, 64, seed=7).images]
    reading = load_oracle().read(glossy)
    assert any(reading.subject_shape)
    assert not any(reading.subject_present("ball", "red"))


def test_no_object_of_the_colour_reads_as_nothing():
    assert read_shape(Image.new("RGB", (64, 64), BACKGROUNDS["white"]), RED) == read_shape(
        Image.new("RGB", (32, 32), BACKGROUNDS["pink"]), RED)
    assert read_shape(Image.new("RGB", (64, 64), BACKGROUNDS["white"]), RED).roundness == 0.0


def test_the_oracle_against_both_sets_of_renders_labelled_by_eye():
    """benchmarks/oracle_labels: renders a person labelled before any oracle read them. On the first set (15 of 152
    show the subject) the dot head alone is right about 1 time in 4 when it fires, with the pixels' test about 1 in
    2; on the held-out set, made after the pixels' test was set (5 of 152), it finds none of the 5 and fires on 10
    others. These are the README's figures; a better oracle changes them here first."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from oracle_labels import load_renders

    oracle = load_oracle()
    for folder, dots_alone, present in (("oracle_labels", (10, 36), (7, 8)), ("oracle_labels/heldout", (2, 51), (0, 10))):
        folder = ROOT / "benchmarks" / folder
        labels = {int(k): v for k, v in json.loads((folder / "labels.json").read_text())["labels"].items()}
        reading = oracle.read(load_renders(folder))

        def counts(predicted):
            return (sum(predicted[i] and bool(t) for i, t in labels.items()),
                    sum(predicted[i] and not t for i, t in labels.items()))

        assert counts(reading.subject_detected) == dots_alone
        assert counts(reading.subject_present("ball", "red")) == present
