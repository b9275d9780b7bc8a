"""The command line through Typer's CliRunner: help, one-line errors with exit code 1, a real run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("command, flags", [
    ("train", ["--token", "--class-word", "--out", "--model", "--steps", "--num-class-images", "--class-dir",
               "--no-prior", "--resolution", "--rank", "--seed", "--batch-size", "--format", "--save-dtype",
               "--resume", "--config", "--train-text-encoder", "--mixed-precision"]),
    ("priors", ["--model", "--class-prompt", "--num-images", "--out", "--seed"]),
    ("sample", ["--model", "--lora", "--prompt", "--seeds", "--scales", "--out"]),
    ("inspect", ["--json"]),
])
def test_help_lists_the_documented_flags(command, flags):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    for flag in flags:
        assert flag in result.output, flag


def one_error_line(result):
    lines = [line for line in (result.stderr or result.output).splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    return lines[0]


def test_a_command_that_loads_every_library_prints_only_its_own_line(tmp_path):
    # A fresh process, so the libraries' import-time notices are seen: on AVX512-BF16 CPUs bitsandbytes (imported by
    # peft) logs through `kernels` that it goes without a hub kernel, a line on every command before this was quieted.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    result = subprocess.run([sys.executable, "-m", "cli", "inspect", str(bad)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_missing_instance_folder_is_one_line_and_exit_1(tmp_path):
    line = one_error_line(runner.invoke(app, ["train", str(tmp_path / "nope"), "--class-word", "dog",
                                              "--out", str(tmp_path / "x.safetensors")]))
    assert "nope' does not exist" in line


def test_bad_flag_values_are_reported_together(tmp_path):
    line = one_error_line(runner.invoke(app, ["train", str(tmp_path), "--class-word", "dog", "--out",
                                              str(tmp_path / "x.safetensors"), "--steps", "0", "--rank", "-1"]))
    assert "--steps" in line and "--rank" in line


def test_missing_config_file(tmp_path):
    line = one_error_line(runner.invoke(app, ["train", "--config", str(tmp_path / "none.toml")]))
    assert "none.toml' does not exist" in line


def test_inspect_of_a_non_lora_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert "bad.safetensors" in one_error_line(runner.invoke(app, ["inspect", str(bad)]))


def test_sample_with_a_missing_lora(tmp_path):
    line = one_error_line(runner.invoke(app, ["sample", "--lora", str(tmp_path / "x.safetensors"), "--prompt", "p",
                                              "--out", str(tmp_path / "g.png")]))
    assert "--lora" in line and "x.safetensors" in line


def test_bad_seeds_list(tmp_path):
    line = one_error_line(runner.invoke(app, ["sample", "--prompt", "p", "--seeds", "a,b", "--out", str(tmp_path / "g.png")]))
    assert "--seeds" in line


def test_unknown_model(tmp_path):
    line = one_error_line(runner.invoke(app, ["priors", "--class-prompt", "a photo of a dog", "--out", str(tmp_path),
                                              "--model", "builtin:nope", "--num-images", "1"]))
    assert "builtin:nope" in line


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_train_from_the_sample_toml_then_inspect_and_priors(tmp_path):
    toml = ROOT / "sample_instances" / "polkaball" / "dreamlora.toml"
    out = tmp_path / "s.safetensors"
    result = runner.invoke(app, ["train", "--config", str(toml), "--out", str(out), "--steps", "2",
                                 "--num-class-images", "2", "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote" in result.output
    info = runner.invoke(app, ["inspect", str(out), "--json"])
    assert info.exit_code == 0 and '"trigger_phrase": "sks ball"' in info.output
    priors = runner.invoke(app, ["priors", "--class-prompt", "a photo of a ball", "--num-images", "2",
                                 "--out", str(tmp_path / "priors"), "--steps", "2"])
    assert priors.exit_code == 0, priors.output
    assert sorted(p.name for p in (tmp_path / "priors").glob("*.png")) == ["00000.png", "00001.png"]


def test_python_dash_m_cli_works():
    result = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "train" in result.stdout


def test_importing_the_package_and_the_command_line_loads_no_heavy_library():
    """`dreamlora --help`, a bad flag or a missing path answer in well under a second because nothing imports
    torch, diffusers or transformers until a command needs them."""
    code = ("import sys, dreamlora, dreamlora.config, cli.main; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'PIL', 'safetensors') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_the_package_names_are_the_functions_even_after_their_modules_are_imported():
    code = ("import dreamlora.training, dreamlora.evaluation, dreamlora.sampling, dreamlora\n"
            "from dreamlora import train, evaluate, sample, load_config\n"
            "assert all(callable(f) and f.__name__ == n for f, n in ((train, 'train'), (evaluate, 'evaluate'), "
            "(sample, 'sample'), (load_config, 'load_config')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_readme_flag_table_is_the_declarations():
    from dreamlora.config import flag_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- flags: start (scripts/update_readme_flags.py) -->\n", "\n<!-- flags: end -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == flag_table(), "run python scripts/update_readme_flags.py"


def test_every_declared_key_has_help_and_every_flag_reaches_its_key(tmp_path):
    """One declaration a key: --help shows each flag with its choices, and each flag sets the key it names."""
    from dreamlora.config import DreamLoraConfig, keys

    declared = keys(DreamLoraConfig)
    assert all(k.help.strip() for k in declared)
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    help_text += runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"}).output  # its data columns
    for k in declared:
        if k.flag and k.flag != "INSTANCE_DIR":
            assert k.flag.split("/")[0] in help_text, k.dotted
            if k.choices:
                assert "|".join(map(str, k.choices)) in help_text, k.dotted
    seen = {}

    def capture(config, progress=None):  # stands in for the library's train(): records what the flags set
        seen["config"] = config
        raise SystemExit(0)

    import dreamlora
    original = dreamlora.__dict__.get("train")
    dreamlora.train = capture
    try:
        runner.invoke(app, ["train", str(ROOT / "sample_instances" / "polkaball"), "--class-word", "ball",
                            "--out", str(tmp_path / "x.safetensors"), "--crop", "random", "--no-prior",
                            "--validation-prompt", "a {class}", "--validation-prompt", "b {class}",
                            "--validation-seeds", "3,4", "--lora-targets", "to_q,to_v", "--weight-decay", "0.5",
                            "--prior-seed", "9"])
    finally:
        if original is None:
            del dreamlora.train
        else:
            dreamlora.train = original
    c = seen["config"]
    assert (c.data.crop, c.prior.enabled, c.validation.prompts, c.validation.seeds) == \
        ("random", False, ["a {class}", "b {class}"], [3, 4])
    assert (c.lora.target_modules, c.train.weight_decay, c.prior.seed) == (["to_q", "to_v"], 0.5, 9)


def test_a_bad_choice_or_a_non_finite_number_is_one_line(tmp_path):
    bad_choice = runner.invoke(app, ["train", "x", "--crop", "diagonal"])
    assert bad_choice.exit_code == 2 and "'diagonal' is not one of 'center', 'random'" in bad_choice.output
    result = runner.invoke(app, ["train", str(ROOT / "sample_instances" / "polkaball"), "--class-word", "ball",
                                 "--out", str(tmp_path / "x.safetensors"), "--alpha", "inf"])
    assert "lora.alpha (flag --alpha): must be a finite number (got inf)" in one_error_line(result)


def test_train_on_a_flux_transformer_file_without_model_config_is_one_line_naming_the_flag(tmp_path):
    """BFL's flux1-dev.safetensors holds the transformer alone; its VAE and text encoders must come from somewhere."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "flux1-dev.safetensors"  # the key names are all that is read before refusing
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1), "guidance_in.in_layer.weight": torch.zeros(1)},
              str(model))
    result = runner.invoke(app, ["train", str(ROOT / "sample_instances" / "polkaball"), "--class-word", "ball",
                                 "--out", str(tmp_path / "x.safetensors"), "--model", str(model), "--no-prior"])
    line = one_error_line(result)
    assert "flux1-dev.safetensors' is a Flux.1 [dev] transformer alone" in line
    assert "pass --model-config with a diffusers Flux folder or hub id" in line


def test_base_quantization_without_bitsandbytes_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    # diffusers imports its pipelines lazily, and one imported while bitsandbytes is blocked fails to import at all
    # (a machine without bitsandbytes has no such entry): import them first, as earlier tests of a full run do.
    import diffusers.pipelines.flux.pipeline_flux  # noqa: F401
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: F401

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    result = runner.invoke(app, ["train", str(ROOT / "sample_instances" / "polkaball"), "--class-word", "ball",
                                 "--out", str(tmp_path / "x.safetensors"), "--model", "builtin:tiny-flux",
                                 "--no-prior", "--steps", "1", "--base-quantization", "nf4"])
    line = one_error_line(result)
    assert "--base-quantization nf4 needs a working bitsandbytes" in line
    assert "pass --base-quantization none" in line
    assert not (tmp_path / "x.safetensors").exists()
