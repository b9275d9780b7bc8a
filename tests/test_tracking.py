"""--report-to: accelerate's trackers get the losses, learning rate, validation grids and the resolved config."""

import json

import pytest

from dreamlora import load_config, train
from dreamlora.config import to_portable_json
from dreamlora.errors import ConfigError
from dreamlora.tracking import hyperparameters, tracker_names

from test_finetune import caption_folder, finetune_config


def test_a_missing_tracker_package_is_one_line_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^--report-to wandb needs the 'wandb' package: pip install wandb$"):
        tracker_names("wandb")
    assert tracker_names("none") == []


def test_hyperparameters_are_the_flat_resolved_config(tmp_path):
    config = load_config(None, {"data.instance_dir": str(tmp_path), "data.class_word": "dog", "train.steps": 7,
                                "output.path": str(tmp_path / "x.safetensors"), "train.report_to": "tensorboard"})
    flat = hyperparameters(to_portable_json(config))
    assert flat["train.steps"] == 7 and flat["data.class_word"] == "dog" and flat["lora.alpha"] == ""
    assert flat["lora.target_modules"] == "to_q, to_k, to_v, to_out.0"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert "train.report_to" not in flat  # how the run is watched is not how the file is made
    assert len(flat) == sum(len(section) for section in json.loads(to_portable_json(config)).values())


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_tensorboard_event_file_holds_the_losses_lr_a_grid_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = finetune_config(caption_folder(tmp_path), tmp_path / "style.safetensors", **{
        "train.report_to": "tensorboard", "train.log_every": 1, "train.steps": 3, "validation.final": True,
        "validation.steps": 1})
    result = train(config)
    logs = result.run_dir / "logs" / "dreamlora"
    events = [p for p in logs.rglob("events.out.tfevents.*")]
    assert events
    scalars, images = {}, {}
    for path in events:
        accumulator = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["images"]:
            images[tag] = accumulator.Images(tag)
    assert {"loss", "instance_loss", "prior_loss", "lr"} <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["loss"][-1][1] == pytest.approx(result.loss, rel=1e-6)
    assert scalars["lr"][0][1] == pytest.approx(config.train.learning_rate)
    (grid,) = images["validation"]
    assert grid.step == 3 and grid.width > 0 and grid.height > 0
    assert any(p.name == "hparams.yml" for p in logs.rglob("*"))
