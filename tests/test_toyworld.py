"""The toy world (deterministic drawing, captions; plain, or dotted but never the subject) and the shipped builtin:toy."""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamlora.models.tokenizer import load_tokenizer, write_tokenizer_files
from dreamlora.toyworld.world import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    DOTTED_WORLD_SHARE,
    MIN_CONTRAST,
    SUBJECT,
    Scene,
    caption,
    caption_words,
    dataset,
    dot_colors,
    draw_scene,
    object_mask,
    random_scene,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "dreamlora" / "builtin_models" / "toy"
MAX_SHIPPED_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def examples():
    return dataset(300, seed=0)


@pytest.fixture(scope="module")
def dotted_examples():
    return dataset(300, seed=0, dotted_share=DOTTED_WORLD_SHARE)


# --- the world -----------------------------------------------------------------------------------


def test_same_scene_draws_identical_pixels():
    scene = Scene("cup", "orange", "pink", 0.4, 0.6, 0.5)
    first, second = np.asarray(draw_scene(scene)), np.asarray(draw_scene(scene))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert draw_scene(scene, size=32).size == (32, 32)
    assert not np.array_equal(first, np.asarray(draw_scene(replace(scene, x=0.45))))


def test_dataset_is_reproducible_from_its_seed():
    a, b, c = dataset(12, seed=5), dataset(12, seed=5), dataset(12, seed=6)
    assert [(cap, scene) for _, cap, scene in a] == [(cap, scene) for _, cap, scene in b]
    for (image_a, _, _), (image_b, _, _) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(image_a), np.asarray(image_b))
    assert [scene for _, _, scene in a] != [scene for _, _, scene in c]


def test_every_class_colour_and_background_appears(examples):
    scenes = [scene for _, _, scene in examples]
    assert {s.cls for s in scenes} == set(CLASSES)
    assert {s.color for s in scenes} == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert set(CLASSES) >= {"ball", "cube", "cup", "star"}


def test_scenes_fit_the_image_and_stand_out_from_their_background():
    rng = np.random.default_rng(1)
    for _ in range(500):
        s = random_scene(rng)
        assert 0.3 <= s.size <= 0.7
        assert s.size / 2 <= s.x <= 1 - s.size / 2 and s.size / 2 <= s.y <= 1 - s.size / 2
        assert s.color != s.background
        assert np.linalg.norm(np.subtract(COLORS[s.color], BACKGROUNDS[s.background])) >= MIN_CONTRAST


def test_every_caption_word_is_one_token(tokenizer, examples):
    for word in caption_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for _, text, _ in examples:
        assert set(text.split()) <= caption_words(), text


@pytest.mark.parametrize("world", ["examples", "dotted_examples"])
def test_captions_are_true_and_sometimes_partial(world, request):
    examples = request.getfixturevalue(world)
    texts = [text for _, text, _ in examples]
    for _, text, scene in examples:
        words = text.split()
        assert scene.cls in words
        # A caption may leave a part out, but what it names is the scene's.
        assert not (set(words) & set(COLORS)) - {scene.color, scene.background, scene.dots}
        assert ("dots" in words) <= (scene.dots is not None)
    full = [t for t in texts if t.startswith("a photo of") and "background" in t and len(t.split()) in (10, 13)]
    assert 0.3 < len(full) / len(texts) < 0.8
    assert any(t in ("a photo of a ball", "a photo of ball") for t in texts)
    assert any(not t.startswith("a photo") for t in texts)
    rng = np.random.default_rng(0)
    scene = Scene("ball", "red", "blue", 0.5, 0.5, 0.5)
    variants = {caption(scene, rng) for _ in range(200)}
    assert {"a photo of a red ball on a blue background", "a photo of a ball", "a red ball"} <= variants
    dotted = {caption(replace(scene, color="blue", dots="white"), rng) for _ in range(200)}
    assert {"a photo of a blue ball with white dots on a blue background", "a photo of a ball",
            "a ball with white dots"} <= dotted


def test_noun_first_captions_are_opt_in_and_stay_true():
    scene = Scene("ball", "red", "blue", 0.5, 0.5, 0.5)
    by_default = {caption(scene, np.random.default_rng(3)) for _ in range(300)}
    assert all(text.split()[0] in ("a", "an") for text in by_default)
    rng = np.random.default_rng(3)
    asked = [caption(scene, rng, noun_first_share=0.5) for _ in range(2000)]
    noun_first = [text for text in asked if text.split()[0] not in ("a", "an")]
    # partial captions without "a photo of" are 0.5 * 0.4 = 20 % of all; half of those start with the noun
    assert 0.07 < len(noun_first) / len(asked) < 0.13
    assert {"red ball on a blue background", "ball on a blue background", "red ball", "ball"} == set(noun_first)
    assert all(text.startswith("a photo of") for text in asked if "photo" in text)


def _off_colour_share(image: np.ndarray, scene: Scene) -> float:
    """Share of the object's fully covered pixels whose chromaticity is far from the object colour."""
    return 1.0 - _share_of_colour(image, scene, scene.color)


def _share_of_colour(image: np.ndarray, scene: Scene, color: str) -> float:
    """Share of the object's fully covered pixels whose chromaticity is within 0.15 of `color`'s."""
    pixels = image.astype(np.float64)[object_mask(scene) >= 1.0]
    chroma = pixels / np.maximum(pixels.sum(axis=-1, keepdims=True), 1.0)
    base = np.asarray(COLORS[color], dtype=np.float64)
    return float((np.abs(chroma - base / base.sum()).max(axis=-1) <= 0.15).mean())


def test_objects_are_plain_or_dotted_and_never_the_subject(examples, dotted_examples):
    """Plain objects show only their colour (and a highlight); dotted ones show their dot colour on a part of them."""
    assert all(scene.dots is None for _, _, scene in examples)  # the plain world: builtin:toy's
    plain = dotted = 0
    for image, _, scene in dotted_examples:
        if "black" in (scene.color, scene.dots):  # too dark for chromaticity to mean anything
            continue
        image = np.asarray(image)
        if scene.dots is None:
            assert _off_colour_share(image, scene) < 0.06, scene
            plain += 1
        else:
            assert 0.05 < _share_of_colour(image, scene, scene.dots) < 0.6, scene
            assert _off_colour_share(image, scene) > 0.05, scene
            dotted += 1
    assert plain > 120 and dotted > 60
    # The subject (a red ball with white dots) is never drawn, while each of its parts is.
    scenes = [random_scene(np.random.default_rng(seed), DOTTED_WORLD_SHARE) for seed in range(3000)]
    assert SUBJECT not in {(s.cls, s.color, s.dots) for s in scenes}
    assert {("ball", "red", "yellow"), ("ball", "blue", "white"), ("cube", "red", "white")} <= \
        {(s.cls, s.color, s.dots) for s in scenes}
    assert "white" not in dot_colors("ball", "red") and "white" in dot_colors("cube", "red")
    # The check does see a pattern: white dots painted on a plain red ball.
    scene = Scene("ball", "red", "blue", 0.5, 0.5, 0.6)
    painted = np.asarray(draw_scene(scene)).copy()
    for cx, cy in ((26, 26), (38, 30), (30, 40), (40, 42)):
        yy, xx = np.ogrid[:64, :64]
        painted[(xx - cx) ** 2 + (yy - cy) ** 2 <= 9] = (245, 242, 235)
    assert _off_colour_share(painted, scene) > 0.1


def test_dotted_ball_share_adds_dotted_balls_and_leaves_the_dotted_world_alone():
    """A share of 0 draws exactly the dotted world; a share p turns about p of the other scenes into dotted
    balls, never the subject."""
    def kinds(ball_share):
        return [random_scene(np.random.default_rng(seed), DOTTED_WORLD_SHARE, ball_share) for seed in range(2000)]

    assert kinds(0.0) == [random_scene(np.random.default_rng(seed), DOTTED_WORLD_SHARE) for seed in range(2000)]
    before, after = kinds(0.0), kinds(0.5)
    dotted_balls = [scene for scene in after if scene.cls == "ball" and scene.dots is not None]
    expected = 0.5 + 0.5 * sum(scene.cls == "ball" and scene.dots is not None for scene in before) / len(before)
    assert abs(len(dotted_balls) / len(after) - expected) < 0.04
    assert SUBJECT not in {(scene.cls, scene.color, scene.dots) for scene in after}
    # What a scene keeps when it becomes a dotted ball: its colour, background, place and size.
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert changed
    for b, a in changed:
        assert (a.cls, a.color, a.background, a.x, a.y, a.size) == ("ball", b.color, b.background, b.x, b.y, b.size)
        assert a.dots in dot_colors("ball", a.color)


def test_white_dots_recolour_only_the_dots_and_never_draw_the_subject():
    """The white-dot world is the dotted world scene for scene, every dot white, or black on white objects and on
    red balls (where white would draw the subject)."""
    dotted = [random_scene(np.random.default_rng(seed), DOTTED_WORLD_SHARE) for seed in range(2000)]
    white = [random_scene(np.random.default_rng(seed), DOTTED_WORLD_SHARE, white_dots=True) for seed in range(2000)]
    assert [replace(scene, dots=None) for scene in dotted] == [replace(scene, dots=None) for scene in white]
    assert [scene.dots is None for scene in dotted] == [scene.dots is None for scene in white]
    blacks = {(scene.cls, scene.color) for scene in white if scene.dots == "black"}
    assert blacks == {(cls, "white") for cls in CLASSES} | {("ball", "red")}
    assert {scene.dots for scene in white} == {None, "white", "black"}
    assert SUBJECT not in {(scene.cls, scene.color, scene.dots) for scene in white}
    # the pictures and captions follow: the same example, white dots named where the dotted world named others
    for (_, text, scene), (_, white_text, white_scene) in zip(dataset(60, seed=3, dotted_share=DOTTED_WORLD_SHARE),
                                                           dataset(60, seed=3, dotted_share=DOTTED_WORLD_SHARE,
                                                                   white_dots=True)):
        assert white_text == (text if scene.dots is None else text.replace(f"{scene.dots} dots",
                                                                           f"{white_scene.dots} dots"))


def test_the_plain_world_is_what_it_was_before_the_dotted_world_existed():
    """Hashes of drawings and captions made before dots were added (commit f00b085): builtin:toy's pretraining data."""
    digest = hashlib.sha256()
    for image, text, _ in dataset(40, seed=0):
        digest.update(np.asarray(image).tobytes())
        digest.update(text.encode())
    assert digest.hexdigest()[:16] == "535e3edcc3b4c70e"
    for args, expected in ((("cup", "orange", "pink", 0.4, 0.6, 0.5), "3ed0bc635e4d71fe"),
                           (("ball", "red", "blue", 0.5, 0.5, 0.6), "d87b4155e9047f6a"),
                           (("star", "green", "white", 0.45, 0.5, 0.4), "11ed44a7df5760da")):
        pixels = np.asarray(draw_scene(Scene(*args)))
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == expected, args
    with_dots = np.asarray(draw_scene(Scene("cup", "orange", "pink", 0.4, 0.6, 0.5, dots="white")))
    assert hashlib.sha256(with_dots.tobytes()).hexdigest()[:16] != "3ed0bc635e4d71fe"


def test_unknown_scene_values_are_refused():
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        draw_scene(Scene("dog", "red", "blue", 0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="unknown dots 'gold'"):
        draw_scene(Scene("ball", "red", "blue", 0.5, 0.5, 0.5, dots="gold"))


# --- the shipped model ---------------------------------------------------------------------------
# The pretrained weights ship in dreamlora/builtin_models/toy/; a package without them fails here.


@pytest.mark.parametrize("name", ["toy", "toy-dots"])
def test_shipped_model_is_small_and_packaged(name):
    folder = SHIPPED.parent / name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "model_index.json").is_file()
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    # every shipped weight together stays within the repository's 30 MB for built-in models
    assert sum(p.stat().st_size for p in SHIPPED.parent.rglob("*") if p.is_file()) <= 30 * 1024 * 1024
    # Every file a loader needs matches pyproject's package-data, so a wheel carries it.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dreamlora"]
    for path in files:
        if path.suffix == ".md":
            continue  # the pretraining log is documentation, not needed to load
        relative = path.relative_to(ROOT / "dreamlora").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_toy_dots_loads_offline_with_32x32_latents_and_its_recipe():
    """builtin:toy-dots: the white-dot world's model, shipped; builtin:toy's recipe at --lr 3e-4 decaying on a cosine,
    with 50 class images and a checkpoint scored from four seeds every 250 steps (the main job's 3 minutes), read by
    the oracle."""
    from dreamlora.config import TOY, TOY_DOTS, load_config, recommended_settings
    from dreamlora.evaluation import oracle_reads
    from dreamlora.models import load_base_model

    base = load_base_model("builtin:toy-dots")
    assert base.vae_scale_factor == 2 and base.unet.config.sample_size == 32
    assert not any("attn" in name for name, _ in base.unet.down_blocks[0].named_modules())  # none at 32x32
    recipe = recommended_settings(TOY_DOTS)
    assert recipe == {**recommended_settings(TOY), "train.learning_rate": 3e-4, "train.lr_scheduler": "cosine",
                      "prior.num_class_images": 50, "validation.eval_every": 250, "validation.eval_seeds": [0, 1, 2, 3]}
    config = load_config(None, {"model.name": TOY_DOTS, "data.instance_dir": "photos", "data.class_word": "ball",
                                "output.path": "x.safetensors"})
    assert config.train.learning_rate == 3e-4 and config.train.lr_scheduler == "cosine"
    assert config.validation.eval_every == 250 and config.validation.eval_seeds == [0, 1, 2, 3]  # scored by the oracle
    assert oracle_reads(TOY_DOTS, None)


def test_pretraining_can_keep_the_shipped_vae(tmp_path):
    """`pretrain --vae-from`: the VAE and its scaling factor come as they are, and a rerun loads the copy."""
    import json

    from diffusers import AutoencoderKL

    from dreamlora.toyworld.pretrain import Settings, train_vae

    images = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in dataset(4, seed=0)])).permute(0, 3, 1, 2)
    kept = train_vae(Settings(vae_from=str(SHIPPED / "vae")), {"images": images}, tmp_path)
    shipped = AutoencoderKL.from_pretrained(SHIPPED / "vae")
    assert kept.config.scaling_factor == shipped.config.scaling_factor
    for (name, a), (_, b) in zip(kept.state_dict().items(), shipped.state_dict().items()):
        assert torch.equal(a, b), name
    stats = json.loads((tmp_path / "vae_stats.json").read_text())
    assert stats["psnr"] > 25  # the world, as the shipped one reads it
    assert stats["scaling_factor"] == shipped.config.scaling_factor  # the one kept, not one this world would give
    reloaded = train_vae(Settings(), {}, tmp_path)  # the finished stage: no data needed, nothing trained
    assert torch.equal(reloaded.decoder.conv_out.weight, shipped.decoder.conv_out.weight)


def test_pretraining_can_start_from_a_finished_model():
    """`pretrain --unet-from`: longer pretraining as a warm restart. The UNet and text encoder start as the finished
    model's (fp16 shipped weights upcast to fp32); a model of other settings is refused, naming the flag."""
    from dreamlora.toyworld.pretrain import Settings, build_unet_and_text, main, start_from_model

    dots = SHIPPED.parent / "toy-dots"
    tokenizer = load_tokenizer(dots / "tokenizer")
    unet, text = build_unet_and_text(Settings(latent_size=32), tokenizer)
    start_from_model(str(dots), unet, text)
    shipped = load_file(dots / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, shipped[name].float()), name
    shipped_text = load_file(dots / "text_encoder" / "model.safetensors")
    (embedding,) = [tensor for name, tensor in shipped_text.items() if name.endswith("token_embedding.weight")]
    assert torch.equal(text.get_input_embeddings().weight, embedding.float())
    unet_16, text_16 = build_unet_and_text(Settings(latent_size=16), tokenizer)
    with pytest.raises(ValueError, match="--unet-from .*toy-dots: its UNet2DConditionModel is not the one"):
        start_from_model(str(dots), unet_16, text_16)
    for wrong in (["--unet-from", str(dots)], ["--latent-size", "32", "--unet-from", str(SHIPPED.parent)]):
        with pytest.raises(SystemExit):  # argparse's one-line error, before the run folder exists
            main(["--out", "/nonexistent/never-made", *wrong])


def test_a_32_latent_model_makes_32x32_latents_and_refuses_a_x4_vae(tmp_path):
    """`pretrain --latent-size 32`: a x2 VAE and a UNet whose 32x32 level has no attention, the same 4.2 M-weight
    scale as the shipped UNet; keeping the shipped (x4) VAE for it is refused, naming the flag."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreamlora.toyworld.pretrain import Settings, model_configs, train_vae

    torch.manual_seed(0)
    vae_32, unet_32 = model_configs(32)
    vae, unet = AutoencoderKL(**vae_32), UNet2DConditionModel(**unet_32)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 4, 32, 32)
        assert unet(latents, 500, torch.zeros(1, 77, 128)).sample.shape == (1, 4, 32, 32)
    top = unet.down_blocks[0]
    assert not hasattr(top, "attentions") and hasattr(unet.down_blocks[1], "attentions")
    vae_16, unet_16 = model_configs(16)
    assert vae_16["block_out_channels"] == (16, 32, 64) and unet_16["sample_size"] == 16
    with pytest.raises(ValueError, match="--vae-from .* makes 16-sided latents .* not --latent-size 32"):
        train_vae(Settings(latent_size=32, vae_from=str(SHIPPED / "vae")), {"images": torch.zeros(1, 3, 64, 64)},
                  tmp_path)
    with pytest.raises(ValueError, match=r"--latent-size must be one of \[16, 32\] \(got 24\)"):
        model_configs(24)


def test_unet_top_channels_widens_only_the_finest_level():
    """`pretrain --unet-top-channels 64`: the 32x32 level's convolutions get 64 channels, the levels below keep
    theirs, and the UNet still maps 32x32 latents to 32x32; a width groupnorm cannot split is refused."""
    from diffusers import UNet2DConditionModel

    from dreamlora.toyworld.pretrain import main, model_configs

    plain_channels = model_configs(32)[1]["block_out_channels"]  # a tuple: kept as it is now
    _, wide = model_configs(32, unet_top_channels=64)
    assert plain_channels == (32, 64, 128) and wide["block_out_channels"] == (64, 64, 128)
    assert model_configs(32)[1]["block_out_channels"] == plain_channels  # the shared table is not changed
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**wide)
    assert unet.conv_in.out_channels == 64 and unet.down_blocks[0].resnets[0].out_channels == 64
    assert [block.resnets[0].out_channels for block in unet.down_blocks[1:]] == [64, 128]
    with torch.no_grad():
        assert unet(torch.zeros(1, 4, 32, 32), 500, torch.zeros(1, 77, 128)).sample.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match=r"--unet-top-channels must be a positive multiple of 8 \(got 20\)"):
        model_configs(32, unet_top_channels=20)
    with pytest.raises(SystemExit):  # argparse's one-line error, before the run folder exists
        main(["--out", "/nonexistent/never-made", "--unet-top-channels", "-8"])


@pytest.fixture(scope="module")
def toy():
    from dreamlora.models import load_base_model

    return load_base_model("builtin:toy")


def test_toy_loads_offline_as_an_sd1_model(toy):
    from dreamlora.identity import folder_fingerprint

    assert toy.identity == "builtin:toy"
    assert toy.family.name == "sd1" and not toy.family.v_prediction
    assert toy.default_resolution == 64
    assert toy.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert toy.noise_scheduler.config.num_train_timesteps == 1000
    assert toy.fingerprint == folder_fingerprint(SHIPPED)
    assert all(p.dtype == torch.float32 for p in toy.unet.parameters())


def test_toy_pipeline_renders_a_64px_image(toy):
    pipe = toy.pipeline("dpm++2m")
    image = pipe("a photo of a red ball on a blue background", num_inference_steps=2, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0  # not a blank (NaN-decoded) picture


# --- reproducing the shipped model ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dotted_share", [0.0, DOTTED_WORLD_SHARE])
def test_reproduce_quick_runs_every_stage_and_compares_with_the_shipped_pair(tmp_path, dotted_share):
    """`python -m dreamlora.toyworld.reproduce --quick [--dotted-share 0.4]`: pretraining, oracle training and the
    scoring run end to end at a few steps; the architecture is the shipped one, the 2-step weights are not."""
    import json

    from safetensors.torch import load_file

    from dreamlora.models import load_base_model
    from dreamlora.toyworld.oracle import load_oracle
    from dreamlora.toyworld.reproduce import reproduce

    figures = reproduce(tmp_path, quick=True, dotted_share=dotted_share, log=lambda message: None)
    assert json.loads((tmp_path / "pretrain" / "pretrain_settings.json").read_text())["dotted_share"] == dotted_share
    assert f"({dotted_share:.0%} with dots)" in (tmp_path / "oracle" / "TRAIN_LOG.md").read_text()
    model_dir = tmp_path / "pretrain" / "model"
    rebuilt = load_base_model(str(model_dir))
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        new, shipped = load_file(model_dir / part), load_file(SHIPPED / part)
        assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in shipped.items()}
    assert rebuilt.family.name == "sd1" and rebuilt.default_resolution == 64
    assert not any(figures["identical_to_shipped"].values())  # two steps of training are not the shipped weights
    assert load_oracle(tmp_path / "oracle").config.backgrounds == load_oracle().config.backgrounds
    # The shipped pair reads its own renders correctly, so the comparison column means something.
    assert min(figures["rendered"]["shipped"][k] for k in ("class", "color", "background")) >= 0.75
    assert json.loads((tmp_path / "reproduce.json").read_text()) == figures
    report = (tmp_path / "REPRODUCE.md").read_text()
    assert "| renders read correctly: class |" in report and "byte-identical" in report
