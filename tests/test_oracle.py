"""The shipped toy oracle reads drawn toy-world pictures and finds the polka-dot subject; its trainer runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlora.errors import ModelLoadError
from dreamlora.toyworld import BACKGROUNDS, CLASSES, COLORS, dataset
from dreamlora.toyworld.oracle import ORACLE_DIR, OracleConfig, load_oracle
from dreamlora.toyworld.subject import random_polka_ball
from dreamlora.toyworld.train_oracle import (TrainSettings, augment, draw_dotted_distractors, draw_glossy_balls,
                                             draw_other_dots, draw_red_balls, draw_textures, draw_world, save_oracle,
                                             train_oracle, uint8_to_tensor, write_log)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def test_shipped_oracle_is_small_and_names_the_world(oracle):
    assert (ORACLE_DIR / "model.safetensors").stat().st_size <= 2_000_000
    config = json.loads((ORACLE_DIR / "config.json").read_text())
    assert tuple(config["classes"]) == CLASSES and tuple(config["colors"]) == tuple(COLORS)
    assert tuple(config["backgrounds"]) == tuple(BACKGROUNDS)
    assert (ORACLE_DIR / "TRAIN_LOG.md").is_file()


def test_oracle_reads_fresh_world_scenes(oracle):
    examples = dataset(64, seed=424242)
    reading = oracle.read([image for image, _, _ in examples])
    scenes = [scene for _, _, scene in examples]
    for got, field in ((reading.classes, "cls"), (reading.colors, "color"), (reading.backgrounds, "background")):
        accuracy = np.mean([g == getattr(s, field) for g, s in zip(got, scenes)])
        assert accuracy >= 0.9, (field, accuracy)
    assert np.mean(reading.subject_detected) <= 0.05  # the (plain) world never draws dots
    assert reading.embeddings.shape == (64, oracle.config.embed_dim)
    torch.testing.assert_close(reading.embeddings.norm(dim=1), torch.ones(64))


def test_oracle_tells_polka_balls_from_plain_balls(oracle):
    rng = np.random.default_rng(99)
    names = list(BACKGROUNDS)
    polka = [random_polka_ball(rng, BACKGROUNDS[names[i % len(names)]]) for i in range(32)]
    plain = [Image.fromarray(a) for a in draw_red_balls(oracle.config, 32, seed=98).images]
    assert np.mean(oracle.read(polka).subject_detected) >= 0.9
    assert np.mean(oracle.read(plain).subject_detected) <= 0.1
    # the five shipped photos of the subject (128 px, resized to 64) are recognised too
    photos = [Image.open(p) for p in sorted((ROOT / "sample_instances" / "polkaball").glob("*.png"))]
    assert all(oracle.read(photos).subject_detected)
    # embeddings: a polka ball is closer to the photos than a plain red ball is
    photo_emb = oracle.embed(photos)
    assert (oracle.embed(polka) @ photo_emb.T).mean() > (oracle.embed(plain) @ photo_emb.T).mean() + 0.2


def test_oracle_ignores_noise_dots_off_a_ball_glossy_balls_and_other_dots(oracle):
    # what a broken model renders, white dots on the background or on other objects, a ball with a big
    # highlight or one white spot, a red ball with dots of another colour: none of them is the subject
    textures = draw_textures(oracle.config, 32, seed=77)
    dotted = draw_dotted_distractors(oracle.config, 32, seed=78)
    glossy = draw_glossy_balls(oracle.config, 32, seed=79)
    other_dots = draw_other_dots(oracle.config, 32, seed=80)  # red balls with black, yellow or blue dots
    for drawn in (textures, dotted, glossy, other_dots):
        reading = oracle.read([Image.fromarray(a) for a in drawn.images])
        assert np.mean(reading.subject_detected) <= 0.1


def test_load_oracle_from_a_folder_without_weights_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="lacks model.safetensors"):
        load_oracle(tmp_path)


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = uint8_to_tensor(np.stack([np.asarray(image) for image, _, _ in dataset(4, seed=1)]))
    a = augment(x.clone(), torch.Generator().manual_seed(0))
    b = augment(x.clone(), torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_trainer_writes_a_loadable_oracle(tmp_path):
    settings = TrainSettings(world=32, red_balls=8, polka=16, textures=4, dotted=4, glossy=4, other_dots=4, steps=2,
                             batch_size=8, held_out=8, held_out_subject=4)
    config = OracleConfig()
    net, metrics = train_oracle(settings, config, log=lambda message: None)
    save_oracle(net, config, tmp_path)
    log = write_log(tmp_path, settings, metrics, config).read_text()
    assert "class accuracy" in log and "subject recall" in log
    reading = load_oracle(tmp_path).read([image for image, _, _ in dataset(2, seed=3)])
    assert len(reading.classes) == 2 and all(0 <= p <= 1 for p in reading.subject_probability)


# slow: trains an oracle (16 s measured beside another job); kept out of the README's 4-minute test command
@pytest.mark.slow
def test_the_dotted_worlds_oracle_learns_white_dots_on_balls_as_the_dot_detectors_positives(tmp_path):
    """In the dotted world (world.py) a blue ball with white dots has the subject's pattern; red balls with other
    dots and dotted cubes do not, and no world scene is the subject itself."""
    config = OracleConfig()
    world = draw_world(config, 200, seed=11, dotted_share=0.4)
    balls_with_white_dots = world.subject == 1
    assert balls_with_white_dots.any()
    assert (world.cls[balls_with_white_dots] == config.classes.index("ball")).all()
    assert not (world.color[balls_with_white_dots] == config.colors.index("red")).any()
    assert not draw_world(config, 50, seed=11).subject.any()  # the plain world: no positives
    settings = TrainSettings(world=32, red_balls=8, polka=16, textures=4, dotted=4, glossy=4, other_dots=4, steps=2,
                             batch_size=8, held_out=64, held_out_subject=4, dotted_share=0.4)
    net, metrics = train_oracle(settings, config, log=lambda message: None)
    save_oracle(net, config, tmp_path)
    log = write_log(tmp_path, settings, metrics, config).read_text()
    assert "(40% with dots)" in log and "white dots detected on the world's white-dotted balls" in log
