"""dreamlora.evaluation and `dreamlora eval`: report structure, ranges, DINO/CLIP metrics, the CLI, errors.

The last test is the one that shows DreamBooth works: a short seeded run on builtin:toy must make
the oracle find the subject far more often than in the base model's renders, while plain class
renders stay free of it (prior preservation).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dreamlora import load_config, train
from dreamlora.errors import ConfigError, ModelLoadError
from dreamlora.evaluation import EvalReport, evaluate, strip_token, subject_prompt

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"
SCORE_KEYS = {"subject_detected", "dots_detected", "subject_similarity", "background_match", "class_shows_subject",
              "class_shift", "other_classes_color_shift", "other_classes_background_shift",
              "other_classes_show_subject", "attributes_obeyed", "base_color_spread", "base_background_spread",
              "dino", "clip_i", "clip_t"}
FRACTIONS = ("subject_detected", "dots_detected", "background_match", "class_shows_subject")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A 2-step LoRA on builtin:tiny-sd (random weights), no prior: enough to change the renders a little."""
    tmp = tmp_path_factory.mktemp("eval-lora")
    config = load_config(None, {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp / "ball.safetensors"),
        "train.steps": 2, "train.learning_rate": 5e-3, "train.checkpoint_every": 0, "prior.enabled": False,
        "validation.steps": 1, "validation.seeds": [0], "validation.prompts": ["a photo of {class}"],
    })
    return train(config).output


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A tiny random ViT with its image processor, saved as a local transformers folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP with a CLIPProcessor (dreamlora's built-in tokenizer), saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dreamlora.models.tokenizer import load_tokenizer, write_tokenizer_files

    folder = tmp_path_factory.mktemp("clip")
    vocab_size = write_tokenizer_files(folder / "tok")
    tokenizer = load_tokenizer(folder / "tok")
    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, **specials},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def check_scores(scores: dict, *, oracle: bool, base: bool) -> None:
    assert set(scores) == SCORE_KEYS
    if not oracle:
        assert all(scores[k] is None for k in ("subject_detected", "subject_similarity", "background_match",
                                               "class_shows_subject", "class_shift"))
        return
    assert all(isinstance(scores[k], float) for k in (*FRACTIONS, "subject_similarity", "class_shift"))
    if base:
        assert scores["class_shift"] == 0.0


@pytest.fixture(scope="module")
def report_and_events(lora_file, dino_dir, clip_dir, tmp_path_factory):
    """One evaluation with every metric: the oracle (forced on tiny-sd), DINO and CLIP; 1 sampling step."""
    events = []
    grid = tmp_path_factory.mktemp("eval-grid") / "renders.png"
    report = evaluate(lora_file, seeds=[0, 1], steps=1, backgrounds=["blue", "orange"], oracle=True, dino=dino_dir,
                      clip=clip_dir, grid=grid, progress=events.append)
    return report, events


def test_evaluate_reports_lora_and_base_side_by_side(report_and_events):
    report, events = report_and_events
    data = json.loads(json.dumps(report.to_dict()))  # JSON-ready
    check_scores(data["lora"], oracle=True, base=False)
    check_scores(data["base"], oracle=True, base=True)
    # the report set leads: other phrasings; --backgrounds and --seeds replaced each set's own
    assert data["prompts"] == ["a sks ball on a blue background", "a sks ball on an orange background",
                               "sks ball on a blue background", "sks ball on an orange background", "a photo of a ball"]
    tuning, reported = data["sets"]
    assert (tuning["name"], reported["name"]) == ("tuning", "report") and reported["lora"] == data["lora"]
    assert tuning["subject_prompts"] == ["a photo of sks ball on a blue background",
                                         "a photo of sks ball on an orange background"]
    assert reported["bleed_prompts"] == ["a photo of a cube", "a photo of a cup", "a photo of a star",
                                         "a photo of a blue ball on a yellow background",
                                         "a photo of a green ball on a white background",
                                         "a photo of a yellow ball on a purple background"]
    assert set(tuning["per_background"]) == {"blue", "orange"} and not tuning["bleed_prompts"]
    for scores in (data["lora"], data["base"]):  # bleed is measured on the report set only
        assert all(isinstance(scores[k], float) for k in ("other_classes_color_shift", "attributes_obeyed"))
    assert data["base"]["other_classes_color_shift"] == 0.0 and tuning["lora"]["attributes_obeyed"] is None
    assert data["seeds"] == [0, 1] and data["model"] == "builtin:tiny-sd" and data["token"] == "sks"
    assert data["instance_images"] == 5 and Path(data["instance_dir"]).name == "polkaball"
    assert data["lora"]["class_shift"] > 0  # the LoRA changed the class renders a little
    # each prompt and seed list renders once with and once without the LoRA (the shared class prompt once), and
    # the base renders the other classes from a second seed list: (3 + 10) x 2 x 2 seeds + 3 x 2 seeds = 58
    assert [e.step for e in events] == list(range(2, 60, 2)) and events[-1].total == 58
    assert Path(data["grid"]).is_file()


def test_the_phrasings_set_moves_the_training_prompt_one_word_and_keeps_the_tuning_backgrounds_and_seeds(lora_file):
    """What recipes are chosen on for other phrasings: never the report set's phrasings, backgrounds or seeds."""
    report = evaluate(lora_file, prompt_sets=["phrasings"], steps=1, oracle=False)
    (phrasings,) = report.sets
    assert phrasings.name == "phrasings" and phrasings.seeds == list(range(8))
    assert phrasings.backgrounds == ["blue", "gray", "pink", "orange"]
    assert phrasings.subject_prompts[:2] == ["a photo of a sks ball on a blue background",
                                             "a photo of a sks ball on a gray background"]
    assert phrasings.subject_prompts[4] == "photo of sks ball on a blue background"
    others = {p for name in ("tuning", "report") for p in evaluate_prompts(name)}
    assert not others & set(phrasings.subject_prompts)
    assert not {1000, 1001} & set(phrasings.seeds)
    with pytest.raises(ConfigError, match="--prompt-sets: must be one of tuning, report, phrasings"):
        evaluate(lora_file, prompt_sets=["held-out"], steps=1, oracle=False)


def test_lora_scale_zero_renders_the_base_model_and_scale_one_is_the_default(lora_file, report_and_events):
    """--lora-scale reaches the LoRA's renders only: at 0 they are the base model's, score for score."""
    off = evaluate(lora_file, seeds=[0, 1], steps=1, backgrounds=["blue", "orange"], oracle=True, lora_scale=0.0)
    assert off.lora_scale == 0.0 and off.lora == off.base and off.lora.class_shift == 0.0
    full, _ = report_and_events  # the same prompts and seeds at the default scale (and with DINO and CLIP too)
    assert full.lora_scale == 1.0 and full.lora.class_shift > 0
    assert full.lora.subject_similarity != off.lora.subject_similarity == off.base.subject_similarity \
        == full.base.subject_similarity
    with pytest.raises(ConfigError, match="--lora-scale"):
        evaluate(lora_file, steps=1, oracle=False, lora_scale=-1.0)


def evaluate_prompts(name: str) -> list[str]:
    from dreamlora.evaluation import PROMPT_SETS, fill_subject

    chosen = PROMPT_SETS[name]
    return [fill_subject(phrasing, "sks", "ball", bg) for phrasing in chosen.phrasings for bg in chosen.backgrounds]


def test_subject_present_needs_the_dots_on_a_round_ball_of_the_subjects_colour():
    from dreamlora.evaluation import total_variation
    from dreamlora.toyworld.oracle import OracleReading

    reading = OracleReading(classes=["ball", "cube", "ball", "ball", "ball"], colors=["red", "red", "white", "red", "red"],
                            backgrounds=["blue"] * 5, subject_probability=[0.9] * 5,
                            subject_detected=[True, True, True, False, True], embeddings=torch.zeros(5, 2),
                            subject_shape=[True, True, True, True, False])
    assert reading.subject_present("ball", "red") == [True, False, False, False, False]
    assert total_variation(["red", "red", "blue", "blue"], ["red", "blue", "blue", "blue"]) == 0.25
    assert total_variation(["red"] * 4, ["blue"] * 4) == 1.0 and total_variation(["a", "b"], ["b", "a"]) == 0.0


def test_dino_and_clip_metrics_from_local_folders(report_and_events, dino_dir, clip_dir):
    report, _ = report_and_events
    for scores in (report.to_dict()["lora"], report.to_dict()["base"]):
        for key in ("dino", "clip_i", "clip_t"):
            assert isinstance(scores[key], float), key
    assert report.dino_model == dino_dir.name and report.clip_model == clip_dir.name


def test_prompts_and_token_stripping():
    assert subject_prompt("sks", "ball", "orange") == "a photo of sks ball on an orange background"
    assert strip_token("a photo of sks ball on a blue background", "sks") == "a photo of ball on a blue background"
    assert strip_token("a sks ball on a white background", "sks") == "ball on a white background"


def test_bad_settings_and_folders_are_one_line_errors(lora_file, tmp_path):
    with pytest.raises(ConfigError, match="--instance-dir"):
        evaluate(lora_file, instance_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="--dino .* not a local transformers model folder"):
        evaluate(lora_file, dino=tmp_path)
    with pytest.raises(ConfigError, match="--steps must be > 0"):
        evaluate(lora_file, steps=0)
    with pytest.raises(ConfigError, match="not backgrounds the toy oracle knows"):
        evaluate(lora_file, seeds=[0], steps=1, oracle=True, backgrounds=["plaid"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        evaluate(bad)


def test_cli_json_is_one_parseable_object(lora_file):
    from cli.main import app

    result = CliRunner().invoke(app, ["eval", str(lora_file), "--json", "--seeds", "0", "--steps", "1", "--prompt-sets", "tuning",
                                      "--backgrounds", "gray"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"lora", "base", "prompts", "seeds"} <= set(data) and data["seeds"] == [0]
    # no oracle reads builtin:tiny-sd, and no --dino/--clip: every metric is null, and a note says why
    check_scores(data["lora"], oracle=False, base=False)
    assert data["oracle"] is None and any("oracle" in note for note in data["notes"])


def test_cli_table_and_bad_file(lora_file, tmp_path):
    from cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(lora_file), "--seeds", "0", "--steps", "1", "--backgrounds", "gray",
                                 "--oracle"])
    assert result.exit_code == 0, result.output
    assert "LoRA" in result.stdout and "subject detected" in result.stdout and "class shift" in result.stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    result = runner.invoke(app, ["eval", str(bad), "--json"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.safetensors" in lines[0]
    result = runner.invoke(app, ["eval", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1 and "does not exist" in result.stderr


# --- DreamBooth on the toy model -------------------------------------------------------------------


@pytest.mark.slow
def test_dreambooth_on_the_default_toy_learns_the_subject_with_its_recipe(tmp_path):
    """The README's main job as it is (the sample config, builtin:toy-dots' recommended recipe, seed 0), scored on the
    tuning set, and the same run without prior preservation.

    The bars are gains the recipe cleared on every one of the five training seeds benchmarks/dreambooth_toy.py
    measured on the tuning set (docs/proof-of-learning.md, "builtin:toy-dots becomes the default"): subject present
    0.47-0.75 against the base model's 0.00 (here at least 0.4), the oracle embeddings of the subject renders moved
    towards the photos by 0.58-0.72 (here at least 0.4), plain "ball" renders never showed the subject; without prior
    preservation the subject was found 0.34-0.59 less often (here at least 0.2) and the class drifted further by
    0.66-0.80 (here at least 0.4).
    """
    started = time.time()
    config = load_config(INSTANCES / "dreamlora.toml", {"output.path": str(tmp_path / "sks.safetensors"),
                                                       "validation.final": False, "validation.eval_every": 0})
    lora_settings = (config.lora.rank, config.lora.train_text_encoder, config.lora.train_token_embedding)
    assert config.model.name == "builtin:toy-dots"
    assert (config.train.steps, config.train.learning_rate, config.train.lr_scheduler, *lora_settings) == (
        1000, 3e-4, "cosine", 32, True, True)  # the recipe
    report: EvalReport = evaluate(train(config).output, instance_dir=INSTANCES, prompt_sets=["tuning"])
    lora, base = report.lora, report.base
    print(f"\nDreamBooth on builtin:toy-dots in {time.time() - started:.0f} s: lora {lora} base {base}")
    assert report.oracle is not None
    assert lora.subject_detected - base.subject_detected >= 0.4  # round red balls with separate white dots
    assert lora.subject_similarity - base.subject_similarity >= 0.4  # oracle embeddings moved to the photos
    assert lora.class_shows_subject <= 0.05  # prior preservation keeps plain "ball" renders dot-free

    # The same run without prior preservation: less of the subject, and plain "ball" renders drift further.
    config.prior.enabled = False
    config.output.path = str(tmp_path / "no-prior.safetensors")
    drifted = evaluate(train(config).output, instance_dir=INSTANCES, prompt_sets=["tuning"]).lora
    print(f"without prior: {drifted}")
    assert lora.subject_detected >= drifted.subject_detected + 0.2
    assert drifted.class_shift >= lora.class_shift + 0.4


def test_the_benchmarks_captioned_variant_names_each_photos_own_background(tmp_path):
    """`dreambooth_toy.py --variants prior-lr3e-4-cosine-captions`: each sample photo is trained with a caption naming
    the background it shows (its corner's nearest world background colour), read by dreamlora as the photo's prompt."""
    import importlib.util

    from PIL import Image

    from dreamlora.config import load_config
    from dreamlora.data import instance_set
    from dreamlora.toyworld.world import BACKGROUNDS

    spec = importlib.util.spec_from_file_location("dreambooth_toy", ROOT / "benchmarks" / "dreambooth_toy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = bench.captioned_photos(tmp_path / "photos")
    config = load_config(None, {"data.instance_dir": str(folder), "data.class_word": "ball",
                                "output.path": str(tmp_path / "x.safetensors")})
    images = instance_set(config.data)
    shown = []
    for path in images.paths:
        corner = np.asarray(Image.open(path).convert("RGB"), np.float32)[:8, :8].reshape(-1, 3).mean(axis=0)
        shown.append(min(BACKGROUNDS, key=lambda name: float(np.sum((corner - np.array(BACKGROUNDS[name])) ** 2))))
    assert images.prompts == [f"a photo of sks ball on a {name} background" for name in shown]
    assert len(set(shown)) == 5  # five photos, five backgrounds


def test_the_benchmarks_photo_variants_keep_the_sample_ball_and_change_only_what_they_name(tmp_path):
    """`prior-photos15` starts from the five sample photos byte for byte; `prior-photos-near` redraws those five
    with a bigger ball (more red pixels in every photo) on the same backgrounds."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("dreambooth_toy", ROOT / "benchmarks" / "dreambooth_toy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    samples = sorted(INSTANCES.glob("*.png"))
    more = sorted(bench.more_photos(tmp_path / "more").glob("*.png"))
    assert len(more) == 15 and [p.read_bytes() for p in more[:5]] == [p.read_bytes() for p in samples]
    assert len({p.read_bytes() for p in more}) == 15

    def red_share(path) -> float:
        pixels = np.asarray(Image.open(path).convert("RGB"), np.int32)
        return float(((pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)).mean())

    nearer = (38.0, 36.0, 42.0, 40.0, 34.0)
    near = sorted(bench.near_photos(tmp_path / "near", nearer).glob("*.png"))
    radii = sys.modules["make_sample_instances"].RADII  # the sample photos' (imported by the benchmark)
    for photo, sample, radius, bigger in zip(near, samples, radii, nearer, strict=True):
        corner = lambda path: np.asarray(Image.open(path).convert("RGB"), np.float32)[:4, :4].mean()  # noqa: E731
        assert abs(corner(photo) - corner(sample)) < 8  # the same background
        assert (red_share(photo) > red_share(sample)) == (bigger > radius)
