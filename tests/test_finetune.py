"""Fine-tuning on captioned images (dreamlora finetune): the DATA forms, caption draws, the run and its resume."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreamlora import load_config, train
from dreamlora.captioned import read_captioned
from dreamlora.data import step_caption, with_prefix
from dreamlora.errors import ConfigError, DataError

CAPTIONS = ["a red ball, striped, grass", "a blue cube, striped", "a green cone, striped, sky"]
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
SIZES = [(64, 64), (96, 64), (64, 80)]


def make_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (colour, size) in enumerate(zip(COLOURS, SIZES)):
        image = Image.new("RGB", size, colour)
        for x in range(0, size[0], 8):  # stripes, so the images are not flat
            image.paste((255, 255, 255), (x, 0, x + 3, size[1]))
        path = folder / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def caption_folder(root: Path) -> Path:
    folder = root / "txt"
    for path, caption in zip(make_images(folder), CAPTIONS):
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def jsonl_folder(root: Path) -> Path:
    folder = root / "jsonl"
    paths = make_images(folder)
    lines = [json.dumps({"file_name": p.name, "text": c}) for p, c in zip(paths, CAPTIONS)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def csv_folder(root: Path) -> Path:
    folder = root / "csv"
    paths = make_images(folder)
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["file_name", "text"])
        writer.writerows([p.name, c] for p, c in zip(paths, CAPTIONS))
    return folder


def hf_dataset(root: Path, image_column="image", caption_column="text"):
    import datasets

    paths = make_images(root / "raw")
    features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
    return datasets.Dataset.from_dict({image_column: [str(p) for p in paths], caption_column: CAPTIONS},
                                      features=features)


def saved_folder(root: Path) -> Path:
    folder = root / "saved"
    hf_dataset(root, "picture", "caption").save_to_disk(str(folder))
    return folder


def parquet_file(root: Path) -> Path:
    path = root / "train.parquet"
    hf_dataset(root, "picture", "caption").to_parquet(str(path))
    return path


def pixels_and_captions(rows):
    return [(row.open().tobytes(), row.open().size, row.caption) for row in rows]


def test_every_data_form_yields_the_same_images_and_captions(tmp_path):
    expected = pixels_and_captions(read_captioned(caption_folder(tmp_path)))
    assert [caption for *_, caption in expected] == CAPTIONS
    assert [size for _, size, _ in expected] == SIZES
    for folder in (jsonl_folder(tmp_path), csv_folder(tmp_path)):
        assert pixels_and_captions(read_captioned(folder)) == expected, folder.name
    for source in (saved_folder(tmp_path), parquet_file(tmp_path)):
        rows = read_captioned(source, image_column="picture", caption_column="caption")
        assert pixels_and_captions(rows) == expected, source.name
        assert [row.name for row in rows] == ["row 0", "row 1", "row 2"]


def test_bad_rows_and_columns_are_named(tmp_path):
    folder = caption_folder(tmp_path)
    (folder / "01.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"1 of 3 images have no caption .*'01.png'"):
        read_captioned(folder)
    folder = jsonl_folder(tmp_path)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"file_name": "01.png", "text": ""})
    lines[2] = json.dumps({"file_name": "gone.png", "text": "x"})
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"2 of 3 rows .*row 2 \(01.png\) has an empty caption in 'text'.*"
                                        r"row 3 \(gone.png\): the file does not exist"):
        read_captioned(folder)
    with pytest.raises(DataError, match=r"has no column 'caption' \(flag --caption-column\); its columns are "
                                        "file_name, text"):
        read_captioned(jsonl_folder(tmp_path / "b"), caption_column="caption")
    with pytest.raises(DataError, match=r"no column 'image' \(flag --image-column\); its columns are picture, caption"):
        read_captioned(saved_folder(tmp_path))


def test_an_unreadable_dataset_image_is_named_by_its_row(tmp_path):
    import datasets

    from dreamlora.captioned import preflight_captioned

    good = (make_images(tmp_path / "raw")[0]).read_bytes()
    table = datasets.Dataset.from_dict({"image": [good, b"not an image"], "text": ["a", "b"]})
    rows = read_captioned(_save(table, tmp_path / "ds"))
    report = preflight_captioned(tmp_path / "ds", rows, 64)
    with pytest.raises(DataError, match=r"1 of 2 images cannot be used: 'row 1' cannot be read"):
        report.raise_for_errors()
    assert [row.name for row in report.usable_rows] == ["row 0"]


def _save(table, folder):
    table.save_to_disk(str(folder))
    return folder


def test_caption_draws_are_a_function_of_the_seed():
    caption = "sks style, a, b, c, d, e"
    draws = [step_caption(caption, seed, dropout=0.0, shuffle=True, keep=1) for seed in range(20)]
    assert draws == [step_caption(caption, seed, dropout=0.0, shuffle=True, keep=1) for seed in range(20)]
    assert all(d.startswith("sks style, ") and sorted(d.split(", ")) == sorted(caption.split(", ")) for d in draws)
    assert len(set(draws)) > 5  # shuffled
    dropped = [step_caption(caption, seed, dropout=0.3, shuffle=False, keep=0) for seed in range(1000)]
    assert set(dropped) == {"", caption} and 250 < dropped.count("") < 350
    assert step_caption(caption, 0, dropout=0.0, shuffle=False, keep=0) == caption
    assert with_prefix("a cat", "sks style,") == "sks style, a cat" and with_prefix("a cat", "") == "a cat"


def finetune_config(data, out: Path, **overrides):
    values = {"data.job": "finetune", "model.name": "builtin:tiny-sd", "data.instance_dir": str(data),
              "output.path": str(out), "train.steps": 4, "train.learning_rate": 5e-3, "train.checkpoint_every": 2,
              "validation.steps": 2, "validation.seeds": [0], "validation.final": False,
              "data.shuffle_tags": True, "data.keep_tags": 1, "data.caption_dropout": 0.3,
              "data.caption_prefix": "zzt style"}
    values.update(overrides)
    return load_config(None, values)


def test_finetune_config_needs_no_token_and_no_priors(tmp_path):
    config = finetune_config(tmp_path, tmp_path / "x.safetensors")
    assert not config.prior.enabled and config.data.class_word == ""
    regularised = finetune_config(tmp_path, tmp_path / "x.safetensors",
                                  **{"prior.class_dir": str(tmp_path / "reg"), "data.class_word": "toy"})
    assert regularised.prior.enabled
    with pytest.raises(ConfigError, match=r"prior.enabled .* needs --class-dir in a fine-tune"):
        finetune_config(tmp_path, tmp_path / "x.safetensors", **{"prior.enabled": True})
    with pytest.raises(ConfigError, match=r"data.keep_tags .* only applies with --shuffle-tags"):
        finetune_config(tmp_path, tmp_path / "x.safetensors", **{"data.shuffle_tags": False})


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_finetune_resumes_exactly_with_caption_draws(tmp_path):
    data = caption_folder(tmp_path)
    straight = train(finetune_config(data, tmp_path / "a" / "style.safetensors"))
    first = train(finetune_config(data, tmp_path / "b" / "style.safetensors", **{"train.steps": 2}))
    first.output.unlink()
    resumed = train(finetune_config(data, tmp_path / "b" / "style.safetensors", **{"train.resume": True}))
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train(finetune_config(data, tmp_path / "c" / "style.safetensors", **{"data.shuffle_tags": False,
                                                                                  "data.keep_tags": 0}))
    assert not all(torch.equal(a[k], v) for k, v in load_file(other.output).items())  # the draws take effect
    from dreamlora.lora import read_lora_file

    assert read_lora_file(straight.output).metadata["modelspec.trigger_phrase"] == "zzt style"


@pytest.mark.slow  # over 3 s on 2 cores (the plan imports torch): run by .ci/run with -m slow
def test_cli_finetune_dry_run_plans_on_the_captioned_rows(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    planned = CliRunner().invoke(app, ["finetune", str(jsonl_folder(tmp_path)), "--out",
                                       str(tmp_path / "s.safetensors"), "--model", "builtin:tiny-sd", "--steps", "6",
                                       "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert "epochs: 2.0 over 3 instance images" in planned.output, planned.output
    assert "class images: none (prior preservation off)" in planned.output


def test_cli_finetune_bad_data_path_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    missing = CliRunner().invoke(app, ["finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "s.safetensors")])
    assert missing.exit_code == 1 and "DATA" in missing.output and "nope' does not exist" in missing.output
    assert len(missing.output.strip().splitlines()) == 1


# --- aspect-ratio buckets ---------------------------------------------------------------------------------------

from dreamlora.buckets import assign_bucket, batch_at, bucket_sizes, epoch_batches, group_by_bucket  # noqa: E402


def test_buckets_hold_about_the_pixel_budget_in_steps():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert all((h, w) in sizes for w, h in sizes)
    assert sizes[0][0] > sizes[0][1] and sizes[-1][0] < sizes[-1][1]  # widest first


def test_each_image_goes_to_its_nearest_bucket_and_is_not_upscaled_beyond_the_factor():
    sizes = bucket_sizes(512, 64)
    assert assign_bucket((1024, 1024), sizes, 64, 1.0) == (512, 512)
    assert assign_bucket((1600, 900), sizes, 64, 1.0) == (640, 384)  # 16:9 -> the nearest ratio, 1.67
    assert assign_bucket((900, 1600), sizes, 64, 1.0) == (384, 640)
    assert assign_bucket((300, 300), sizes, 64, 1.0) == (256, 256)  # its own size, rounded down: no upscaling
    assert assign_bucket((300, 300), sizes, 64, 2.0) == (512, 512)  # 1.7x is allowed


def test_batches_never_mix_buckets_and_cover_each_image_once_an_epoch():
    assigned = [(64, 64), (80, 48), (64, 64), (48, 80), (80, 48), (64, 64), (80, 48)]
    groups = tuple(tuple(m) for m in group_by_bucket(assigned).values())
    for epoch in range(3):
        batches = epoch_batches(groups, 2, 7, epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(7))
        assert all(len({assigned[i] for i in batch}) == 1 for batch in batches)
        assert len(batches) == 5  # 3 images -> 2 batches, 3 -> 2, 1 -> 1
    assert [batch_at(groups, 2, 7, p) for p in range(10)] == list(epoch_batches(groups, 2, 7, 0) +
                                                                   epoch_batches(groups, 2, 7, 1))
    assert epoch_batches(groups, 2, 7, 0) != epoch_batches(groups, 2, 7, 1)  # reshuffled every epoch


def test_buckets_refuse_random_crops_and_class_images(tmp_path):
    with pytest.raises(ConfigError, match=r"data.buckets .* --crop random"):
        finetune_config(tmp_path, tmp_path / "x.safetensors", **{"data.buckets": True, "data.crop": "random"})
    with pytest.raises(ConfigError, match=r"data.buckets .* prior preservation"):
        load_config(None, {"data.instance_dir": str(tmp_path), "data.class_word": "dog", "data.buckets": True,
                           "output.path": str(tmp_path / "x.safetensors")})


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_a_bucketed_finetune_on_mixed_aspect_ratios_writes_a_file_diffusers_loads(tmp_path):
    from dreamlora.models import load_base_model

    data = caption_folder(tmp_path)  # 64x64, 96x64, 64x80
    config = finetune_config(data, tmp_path / "style.safetensors", **{"data.buckets": True, "data.bucket_step": 16,
                                                                        "train.batch_size": 2, "train.steps": 3})
    seen = []
    import dreamlora.training as training

    original = training.BatchSource.draw

    def draw(self, step, micro, text_encoders):
        batch = original(self, step, micro, text_encoders)
        seen.append(tuple(batch.latents.shape))
        return batch

    training.BatchSource.draw = draw
    try:
        result = train(config)
    finally:
        training.BatchSource.draw = original
    # 96x64 -> the 80x48 bucket (ratio 1.67, nearest 1.5); 64x64 and 64x80 -> 64x64 (no 48x64 bucket: each width
    # takes its largest height within 64²). tiny-sd's VAE halves each side.
    assert {shape[2:] for shape in seen} == {(32, 32), (24, 40)}
    assert all(shape[0] in (1, 2) for shape in seen)
    pipe = load_base_model("builtin:tiny-sd").pipeline()
    pipe.load_lora_weights(str(result.output))
    assert any("lora" in name for name, _ in pipe.unet.named_modules())


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_sdxl_time_ids_name_each_buckets_size_and_crop(tmp_path):
    from dreamlora.models.sdxl import StableDiffusionXLFamily

    data = caption_folder(tmp_path)  # 64x64, 96x64, 64x80 at the tiny SDXL's 64 px
    config = finetune_config(data, tmp_path / "x.safetensors", **{
        "model.name": "builtin:tiny-sdxl", "data.buckets": True, "data.bucket_step": 16, "train.steps": 6,
        "train.checkpoint_every": 0})
    seen = []
    original = StableDiffusionXLFamily.image_conditions

    def record(self, geometry):
        seen.append(original(self, geometry)["time_ids"].tolist())
        return original(self, geometry)

    StableDiffusionXLFamily.image_conditions = record
    try:
        train(config)
    finally:
        StableDiffusionXLFamily.image_conditions = original
    rows = {tuple(row) for batch in seen for row in batch}
    # (original h, w, crop top, left, target h, w): 96x64 goes to the 80x48 bucket (resized to 80x53, cut 2 px
    # from the top); 64x64 to 64x64; 64x80 to 64x64 too (cut 8 px from the top): each row names its own bucket.
    assert rows == {(64.0, 96.0, 2.0, 0.0, 48.0, 80.0), (64.0, 64.0, 0.0, 0.0, 64.0, 64.0),
                    (80.0, 64.0, 8.0, 0.0, 64.0, 64.0)}


# --- the built-in captioned example ------------------------------------------------------------------------------


def test_the_striped_toy_set_is_a_captioned_folder_and_its_style_is_measurable(tmp_path):
    from dreamlora.toyworld.style import STRIPED, stripe_strength, stylise, write_style_set
    from dreamlora.toyworld.world import dataset

    rows = read_captioned(write_style_set(tmp_path / "data", n=4, seed=3))
    drawn = dataset(4, 3)
    assert [row.caption for row in rows] == [text for _, text, _ in drawn]
    assert all(stripe_strength(row.open()) >= 3 * STRIPED for row in rows)
    assert all(stripe_strength(image) < STRIPED / 2 for image, _, _ in drawn)  # the world has no stripes
    assert [row.open().tobytes() for row in rows] == [stylise(image).tobytes() for image, _, _ in drawn]


def test_epochs_set_the_steps_from_the_images_and_the_batch(tmp_path):
    from dreamlora.config import with_epochs

    config = finetune_config(tmp_path, tmp_path / "x.safetensors", **{"train.epochs": 2.5, "train.batch_size": 2,
                                                                       "train.gradient_accumulation_steps": 4})
    assert with_epochs(config, 833, 1).train.steps == 261  # 2.5 x 833 images / 8 a step = 260.3, rounded up
    assert with_epochs(config, 16, 2).train.steps == 3  # 40 images / 16 a step (2 processes)
    assert with_epochs(config, 8, 1).train.epochs == 2.5 and config.train.steps == 4  # the input is not changed
    plain = finetune_config(tmp_path, tmp_path / "x.safetensors")
    assert with_epochs(plain, 833, 1) is plain
