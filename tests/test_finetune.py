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

    planned = CliRunner().invoke(app, ["finetune", str(jsonl_folder(tmp_path)), "--out", str(tmp_path / "s.safetensors"),
                                       "--model", "builtin:tiny-sd", "--steps", "6", "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert "epochs: 2.0 over 3 instance images" in planned.output, planned.output
    assert "class images: none (prior preservation off)" in planned.output


def test_cli_finetune_bad_data_path_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    missing = CliRunner().invoke(app, ["finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "s.safetensors")])
    assert missing.exit_code == 1 and "DATA" in missing.output and "nope' does not exist" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
