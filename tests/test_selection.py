"""--eval-every, the recommended step, the plot, report.html and `dreamlora export` (dreamlora.selection)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from dreamlora import load_config, train
from dreamlora.config import DreamLoraConfig
from dreamlora.errors import ConfigError
from dreamlora.selection import StepScore, export, plot_scores, read_scores, recommend, report_html

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def row(step: int, fidelity: float | None, drift: float | None) -> StepScore:
    return StepScore(step, fidelity, drift, {"subject_detected": fidelity, "class_shift": drift}, f"eval/step-{step:06d}.png")


def test_the_recommended_step_is_the_best_fidelity_within_the_drift_limit():
    rows = [row(100, 0.5, 0.2), row(200, 0.9, 0.6), row(300, 0.8, 0.4), row(400, 0.8, 0.45)]
    assert recommend(rows, 0.5) == 300  # 200 is better but drifts too far; 400 ties 300 and comes later
    assert recommend(rows, 0.7) == 200
    assert recommend(rows, 0.1) == 100  # nothing within the limit: the least drifting step
    assert recommend([row(100, None, 0.1)], 0.5) is None


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def decoded(source: str) -> Image.Image:
    assert source.startswith("data:image/png;base64,"), source[:40]  # inline: the page opens offline, anywhere
    return Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2]))).convert("RGB")


def test_report_page_holds_every_image_inline_and_the_plot_marks_the_pick(tmp_path):
    rows = [row(2, 0.25, 0.3), row(4, 0.75, 0.35)]
    for r in rows:
        (tmp_path / "eval").mkdir(exist_ok=True)
        Image.new("RGB", (40, 20), (r.step * 40, 0, 0)).save(tmp_path / r.grid)
    plot = plot_scores(rows, 0.5, 4)
    plot.save(tmp_path / "eval" / "scores.png")
    assert plot.size == (640, 360)
    page = report_html(tmp_path, rows, 4, 0.5, DreamLoraConfig())
    parser = Images()
    parser.feed(page)
    assert len(parser.sources) == 3 and parser.scripts == 0
    assert [decoded(s).size for s in parser.sources] == [(640, 360), (40, 20), (40, 20)]
    assert decoded(parser.sources[2]).getpixel((0, 0)) == (160, 0, 0)  # step 4's renders, in step order
    assert "step 4</b>" in page and "dreamlora export" in page


def test_eval_seeds_choose_the_seeds_each_checkpoint_renders(tmp_path):
    """--eval-seeds: every scored render (LoRA and base, subject and class prompts) is drawn from those seeds, and the
    score is read over the tuning set's backgrounds x those seeds; without it, the tuning set's own seeds 0-7."""
    from dreamlora.models import load_base_model
    from dreamlora.selection import CheckpointScorer

    base = load_base_model("builtin:toy")
    settings = {"model.name": "builtin:toy", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
                "output.path": str(tmp_path / "a.safetensors"), "validation.eval_every": 2}
    seeds_seen = []

    def blank(prompts: list[str], seeds: list[int], adapter_on: bool) -> list[Image.Image]:
        seeds_seen.append(tuple(seeds))
        return [Image.new("RGB", (64, 64), (200, 200, 200)) for _ in prompts for _ in seeds]

    for chosen, expected in (([5, 6], (5, 6)), (None, tuple(range(8)))):
        config = load_config(None, {**settings, "validation.eval_seeds": chosen} if chosen else settings)
        scorer = CheckpointScorer(base, config, 64, tmp_path, start_step=0, write=False)
        seeds_seen.clear()
        scorer.render = blank
        row = scorer(2)
        assert seeds_seen and set(seeds_seen) == {expected}
        assert row.fidelity == 0.0  # a gray picture shows no subject


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """builtin:toy, 4 steps scored every 2 (1 sampling step per render): the run folder and its final file."""
    tmp = tmp_path_factory.mktemp("scored")
    config = load_config(None, {
        "model.name": "builtin:toy", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp / "ball.safetensors"), "train.steps": 4, "train.checkpoint_every": 0,
        "prior.enabled": False, "validation.final": False, "validation.eval_every": 2, "validation.steps": 1,
    })
    events = []
    result = train(config, progress=events.append)
    return result, events


@pytest.mark.slow  # trains and scores builtin:toy (about 10 s on 2 cores): run by .ci/run with -m slow
def test_eval_every_scores_the_steps_and_keeps_their_weights(scored_run):
    result, events = scored_run
    rows = read_scores(result.run_dir)
    assert [r.step for r in rows] == [2, 4]
    assert all(0.0 <= r.fidelity <= 1.0 and r.drift > 0.0 for r in rows)  # the oracle read them; the LoRA moved
    data = json.loads((result.run_dir / "eval" / "scores.json").read_text())
    assert data["recommended_step"] == recommend(rows, 0.5) and data["prompt_set"] == "tuning"
    assert data["config"]["validation"]["eval_every"] == 2
    for step in (2, 4):
        assert (result.run_dir / "eval" / f"step-{step:06d}.png").is_file()
    assert (result.run_dir / "report.html").is_file() and (result.run_dir / "eval" / "scores.png").is_file()
    # the last step's kept weights are the file's weights (before the file's fp16 cast)
    kept = load_file(result.run_dir / "eval" / "step-000004.safetensors")
    assert len(kept) > 0 and all(v.dtype == torch.float32 for v in kept.values())
    assert any("scoring step 2" in (e.message or "") for e in events)


@pytest.mark.slow  # trains and scores builtin:toy (about 10 s on 2 cores): run by .ci/run with -m slow
def test_export_writes_the_file_of_any_kept_step(scored_run, tmp_path):
    from dreamlora.lora import read_lora_file

    result, _ = scored_run
    last = export(result.run_dir, tmp_path / "last.safetensors", 4)
    trained, exported = load_file(result.output), load_file(last.output)
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)  # same step: the same file's tensors
    early = export(result.run_dir, tmp_path / "early.safetensors", "2")
    assert early.step == 2 and any(not torch.equal(trained[k], v) for k, v in load_file(early.output).items())
    assert read_lora_file(early.output).config["data"]["class_word"] == "ball"
    best = export(result.run_dir, tmp_path / "best.safetensors")  # default: the recommended step
    assert best.step == json.loads((result.run_dir / "eval" / "scores.json").read_text())["recommended_step"]
    with pytest.raises(ConfigError, match="keeps steps 2, 4"):
        export(result.run_dir, tmp_path / "x.safetensors", 3)
    with pytest.raises(ConfigError, match="already exists"):
        export(result.run_dir, last.output, 4)


@pytest.mark.slow  # trains and scores builtin:toy (about 10 s on 2 cores): run by .ci/run with -m slow
def test_export_cli_and_its_errors(scored_run, tmp_path):
    from cli.main import app

    result, _ = scored_run
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(result.run_dir), "--step", "latest", "--out", str(tmp_path / "a.safetensors")])
    assert done.exit_code == 0 and "step 4" in done.stdout
    for args, message in ((["export", str(tmp_path / "nothing"), "--out", "x.safetensors"], "does not exist"),
                          (["export", str(result.run_dir), "--step", "soon", "--out", str(tmp_path / "b.safetensors")],
                           "--step must be a step number, best or latest")):
        failed = runner.invoke(app, args)
        assert failed.exit_code == 1 and message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_eval_every_needs_a_scorer_for_models_the_oracle_does_not_read(tmp_path):
    values = {"data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "output.path": str(tmp_path / "a.safetensors"), "validation.eval_every": 10}
    with pytest.raises(ConfigError, match="flag --eval-every. needs something to score the renders of .builtin:tiny-sd."):
        load_config(None, {**values, "model.name": "builtin:tiny-sd"})
    # a rebuilt toy-world model (any name): --eval-oracle says the oracle reads it; --no-eval-oracle turns it off
    assert load_config(None, {**values, "model.name": "builtin:tiny-sd", "validation.eval_oracle": True})
    with pytest.raises(ConfigError, match="needs something to score the renders of .builtin:toy."):
        load_config(None, {**values, "validation.eval_oracle": False})


@pytest.mark.slow  # needs Chromium (CI installs it): run by .ci/run with -m slow
def test_report_opens_in_headless_chromium_with_every_image_loaded(scored_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("DREAMLORA_REQUIRE_CHROMIUM"):
            pytest.fail("Chromium is not installed (CI installs it: apt-get install chromium)")
        pytest.skip("no Chromium on this machine")
    result, _ = scored_run
    page = (result.run_dir / "report.html").read_text()
    # After the load event every image has loaded or failed: count both into the body, which --dump-dom prints.
    probe = ("<script>addEventListener('load', () => { const all = [...document.images]; "
             "document.body.setAttribute('data-loaded', all.filter(i => i.complete && i.naturalWidth > 0).length); "
             "document.body.setAttribute('data-images', all.length); });</script>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = int(dom.split('data-images="')[1].split('"')[0])
    assert images == 3 and f'data-loaded="{images}"' in dom  # the plot and both steps' renders


def test_overwrite_removes_the_scored_steps_and_the_report_but_not_a_users_files(tmp_path):
    from dreamlora.checkpoints import remove_run_files

    scored = tmp_path / "eval"
    scored.mkdir()
    own = ["step-000200.safetensors", "step-000200.png", "scores.json", "scores.png"]
    for name in own + ["notes.txt"]:
        (scored / name).write_text("x")
    (tmp_path / "report.html").write_text("<html></html>")
    remove_run_files(tmp_path)
    assert sorted(p.name for p in scored.iterdir()) == ["notes.txt"] and not (tmp_path / "report.html").exists()


@pytest.mark.slow  # trains builtin:tiny-sd 2 steps and scores them with the toy oracle: run by .ci/run with -m slow
def test_eval_oracle_scores_a_model_the_oracle_does_not_read_by_name(tmp_path):
    config = load_config(None, {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp_path / "ball.safetensors"), "train.steps": 2, "train.checkpoint_every": 0,
        "train.learning_rate": 5e-3, "prior.enabled": False, "validation.final": False, "validation.eval_every": 1,
        "validation.steps": 1, "validation.eval_oracle": True,
    })
    rows = read_scores(train(config).run_dir)
    assert [r.step for r in rows] == [1, 2]
    assert all(r.scores["subject_detected"] is not None and r.fidelity == r.scores["subject_detected"]
               and r.scores["dino"] is None for r in rows)


@pytest.mark.slow  # trains builtin:tiny-sd and scores it with a tiny DINO: run by .ci/run with -m slow
def test_eval_every_scores_any_model_with_a_local_dino_folder(tmp_path):
    """No oracle reads builtin:tiny-sd: fidelity is DINO's cosine to the photos, drift 1 - DINO cosine of the
    class renders to the base's, and the pick and export work the same."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    dino = tmp_path / "dino"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8), add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino)
    config = load_config(None, {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
        "output.path": str(tmp_path / "ball.safetensors"), "train.steps": 2, "train.checkpoint_every": 0,
        "train.learning_rate": 5e-3, "prior.enabled": False, "validation.final": False, "validation.eval_every": 1,
        "validation.steps": 1, "validation.eval_dino": str(dino),
    })
    result = train(config)
    rows = read_scores(result.run_dir)
    assert [r.step for r in rows] == [1, 2]
    assert all(r.fidelity == r.scores["dino"] and r.drift == r.scores["class_shift"] for r in rows)
    assert all(r.scores["subject_detected"] is None for r in rows) and rows[-1].drift > 0
    exported = export(result.run_dir, tmp_path / "best.safetensors", "best")
    assert exported.step in (1, 2) and exported.output.is_file()
