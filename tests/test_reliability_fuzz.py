"""Generated bad inputs: malformed LoRA files, captions, prompts and flag values, fed to every command.

Each input is drawn from a seeded generator (mutations of a valid file, text in wrong encodings and with
stray braces, non-finite and out-of-range numbers for every declared numeric key), so a failure reproduces
and `FUZZ_SEED=n pytest tests/test_reliability_fuzz.py` explores other draws. For every input and command
the outcome must be what a user can act on: exit code 1 with exactly one `error:` line (2 with click's one
`Error:` line for a value click itself cannot parse), no traceback, and nothing written. No model loads:
`load_base_model` is replaced by a function that fails the test.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import typing
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dreamlora.models
from dreamlora.config import DreamLoraConfig, EvalSettings, SampleSettings, keys
from test_reliability import INSTANCES, runner, smooth_image, train_module
from cli.main import app

SEED = int(os.environ.get("FUZZ_SEED", "13"))
KOHYA = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
PEFT = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for an input that should have been refused first")

    monkeypatch.setattr(dreamlora.models, "load_base_model", refuse)
    monkeypatch.setattr(train_module, "load_base_model", refuse)


def files_under(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def refused(folder: Path, *args: object) -> str:
    """Run the CLI; assert one line, exit 1 (or 2 for click's usage error), no traceback, nothing written."""
    before = files_under(folder)
    result = runner.invoke(app, [str(a) for a in args])
    shown = f"{args}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
    else:
        assert result.exit_code == 2 and sum(line.startswith("Error: ") for line in lines) == 1, shown
    assert files_under(folder) == before, f"{shown}\nwrote files"
    return lines[-1]


# ----------------------------------------------------------------------------------------------
# Malformed LoRA files


def valid_kohya() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for module, width in zip(KOHYA, (64, 32)):
        tensors[f"{module}.lora_down.weight"] = torch.full((4, width), 0.01)
        tensors[f"{module}.lora_up.weight"] = torch.full((width, 4), 0.01)
        tensors[f"{module}.alpha"] = torch.tensor(4.0)
    return tensors, {"dreamlora.config": json.dumps({"data": {"token": "sks", "class_word": "ball"},
                                                     "model": {"name": "builtin:tiny-sd"}})}


def valid_diffusers() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"{PEFT}.lora_A.weight": torch.full((4, 64), 0.01), f"{PEFT}.lora_B.weight": torch.full((64, 4), 0.01)}
    return tensors, {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}


BAD_SHAPES = [(), (4,), (4, 64, 1), (4, 64, 1, 1, 1), (0, 64), (4, 0)]
BAD_CONFIGS = ["[1]", '"text"', "3", "null", "{", '{"data": "sks"}', '{"model": []}', '{"data": {"token": 5}}',
               '{"data": {"class_word": ["ball"]}}', '{"model": {"name": {"x": 1}}}']
BAD_ADAPTER_METADATA = ["[]", '"x"', '{"unet.lora_alpha": "four"}', '{"unet.lora_alpha": NaN}',
                        '{"unet.lora_alpha": Infinity}', '{"unet.lora_alpha": true}', '{"unet.alpha_pattern": []}',
                        '{"unet.alpha_pattern": {"(": 1}}', '{"unet.alpha_pattern": {".*": null}}', "{"]


def malformed_lora(rng: random.Random) -> tuple[str, bytes]:
    """One malformed file: (what was done, the file's bytes)."""
    kind = rng.choice(["shape", "dtype", "value", "alpha", "pair", "rank", "config", "adapter", "bytes"])
    tensors, metadata = valid_diffusers() if kind == "adapter" or rng.random() < 0.25 else valid_kohya()
    weights = sorted(k for k in tensors if k.endswith(".weight"))
    key = rng.choice(weights)
    if kind == "shape":
        shape = rng.choice(BAD_SHAPES)
        tensors[key] = torch.ones(shape)
        what = f"{key} shape {shape}"
    elif kind == "dtype":
        dtype = rng.choice([torch.int32, torch.int8, torch.bool, torch.uint8])
        tensors[key] = tensors[key].to(dtype)
        what = f"{key} {dtype}"
    elif kind == "value":
        bad = rng.choice([math.nan, math.inf, -math.inf])
        flat = tensors[key].flatten().clone()
        flat[rng.randrange(flat.numel())] = bad
        tensors[key] = flat.reshape(tensors[key].shape)
        what = f"{key} holds {bad}"
    elif kind == "alpha" and any(k.endswith(".alpha") for k in tensors):
        alpha = rng.choice(sorted(k for k in tensors if k.endswith(".alpha")))
        tensors[alpha] = rng.choice([torch.tensor([1.0, 2.0]), torch.zeros(0), torch.tensor(math.nan),
                                     torch.tensor(-math.inf), torch.ones(2, 2)])
        what = f"{alpha} = {tensors[alpha].tolist()}"
    elif kind == "pair":
        del tensors[key]
        what = f"{key} removed"
    elif kind == "rank":
        shape = list(tensors[key].shape)
        shape[1 if "up" in key or "lora_B" in key else 0] += rng.randint(1, 3)
        tensors[key] = torch.ones(shape)
        what = f"{key} shape {tuple(shape)}"
    elif kind in ("config", "adapter"):
        name = "dreamlora.config" if kind == "config" else "lora_adapter_metadata"
        metadata[name] = rng.choice(BAD_CONFIGS if kind == "config" else BAD_ADAPTER_METADATA)
        what = f"{name} = {metadata[name]}"
    else:
        data = safetensors.torch.save(tensors, metadata=metadata)
        cut = rng.choice(["truncate", "header", "length", "noise"])
        if cut == "truncate":
            data = data[:rng.randrange(1, len(data))]
        elif cut == "header":
            length = int.from_bytes(data[:8], "little")
            data = data[:8] + b"{]" + data[10:8 + length].replace(b'"', b"'") + data[8 + length:]
        elif cut == "length":
            data = struct.pack("<Q", rng.choice([0, 2**40, 2**63 - 1])) + data[8:]
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        return f"bytes: {cut}", data
    return f"{kind}: {what}", safetensors.torch.save(tensors, metadata=metadata)


LORA_CASES = [malformed_lora(random.Random(SEED * 1000 + i)) for i in range(30)]


@pytest.mark.parametrize("what, data", LORA_CASES, ids=[what[:60] for what, _ in LORA_CASES])
def test_malformed_lora_files_are_refused_in_one_line_by_inspect_sample_and_eval(tmp_path, what, data):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(data)
    for args in (["inspect", lora], ["inspect", lora, "--json"],
                 ["sample", "--lora", lora, "--prompt", "a photo of {token} {class}", "--out", tmp_path / "g.png"],
                 ["eval", lora, "--seeds", "0"]):
        line = refused(tmp_path, *args)
        assert "x.safetensors" in line, f"{what}: {line}"


# ----------------------------------------------------------------------------------------------
# Captions and prompts


def bad_caption(rng: random.Random) -> tuple[str, bytes]:
    text = rng.choice(["a photo of sks ball on the grass", "sks ball, café au lait", "Straße, naïve sks résumé"])
    kind = rng.choice(["encoding", "bytes", "brace", "nul", "huge"])
    if kind == "encoding":
        encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252"])
        if encoding in ("latin-1", "cp1252"):
            text += " é"  # a character these encode as one non-UTF-8 byte
        return f"{encoding}: {text}", text.encode(encoding)
    if kind == "bytes":
        return "invalid UTF-8", text.encode() + bytes([rng.choice([0x80, 0xC3, 0xE9, 0xFF, 0xFE])]) + b" ball"
    if kind == "nul":
        return "NUL byte", text.encode().replace(b" ", b"\x00", 1)
    if kind == "huge":
        return "128 KiB", (text + " ") .encode() * (128 * 1024 // len(text))
    words = text.split()
    words.insert(rng.randrange(len(words) + 1), rng.choice(BRACES))
    return f"brace: {' '.join(words)}", " ".join(words).encode()


BRACES = ["{", "}", "{cute}", "{token.upper}", "{class[0]}", "{0}", "{}", "{token!r}", "{token:>9}", "}{", "{{token}"]
CAPTION_CASES = [bad_caption(random.Random(SEED * 2000 + i)) for i in range(16)]


@pytest.mark.parametrize("what, data", CAPTION_CASES, ids=[what[:50] for what, _ in CAPTION_CASES])
def test_bad_captions_are_refused_by_check_images_and_train_dry_run(tmp_path, what, data):
    folder = tmp_path / "photos"
    folder.mkdir()
    smooth_image(0).save(folder / "01.png")
    (folder / "01.txt").write_bytes(data)
    for args in (["check-images", folder, "--resolution", "64"],
                 ["train", folder, "--class-word", "ball", "--out", tmp_path / "x.safetensors", "--dry-run"],
                 ["train", folder, "--class-word", "ball", "--out", tmp_path / "x.safetensors", "--no-prior"]):
        line = refused(tmp_path, *args)
        assert "01.txt" in line, f"{what}: {line}"


def bad_prompt(rng: random.Random) -> str:
    words = "a photo of {token} {class} on a green background".split()
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(BRACES[:-1]))  # "{{token}" is valid with a "}" later
    return " ".join(words)


PROMPT_CASES = [bad_prompt(random.Random(SEED * 3000 + i)) for i in range(12)]


@pytest.mark.parametrize("prompt", PROMPT_CASES)
def test_bad_prompt_templates_are_refused_before_any_model_loads(tmp_path, prompt):
    out = tmp_path / "x.safetensors"
    line = refused(tmp_path, "sample", "--prompt", prompt, "--out", tmp_path / "grid.png")
    assert "--prompt" in line
    for flag in ("--instance-prompt", "--validation-prompt"):
        line = refused(tmp_path, "train", INSTANCES, "--class-word", "ball", "--out", out, flag, prompt, "--dry-run")
        assert flag in line
    line = refused(tmp_path, "train", INSTANCES, "--class-word", "ball", "--out", out, "--dry-run",
                   "--class-prompt", prompt.replace("{token}", "a"))
    assert "--class-prompt" in line


# ----------------------------------------------------------------------------------------------
# Flag values: every declared numeric key of train, sample and eval, and the priors and check-images flags


def numeric_keys(settings_type: type) -> list:
    """Declared keys with a flag whose values are numbers or lists of numbers."""
    found = []
    for key in keys(settings_type):
        hint = key.hint
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else hint
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        if key.flag and key.flag != "INSTANCE_DIR" and item in (int, float):
            found.append((key, item, typing.get_origin(base) is list))
    return found


def bad_values(rng: random.Random, key, item: type, is_list: bool) -> list[str]:
    """Values no key accepts: not finite, or out of the declared range, drawn from each class."""
    values = [rng.choice(["nan", "inf", "-inf", "1e999", "NaN"])]
    low, high = key.meta["low"], key.meta["high"]
    if low is not None:
        values.append(str(int(low) - rng.randint(1, 10**6)) if item is int else repr(low - rng.random() - 1e-9))
    if high is not None:
        values.append(str(int(high) + rng.randint(1, 2**20)))
    if is_list:
        values = [f"{rng.randint(0, 9)},{v}" for v in values]
    return values


def flag_cases() -> list[tuple[str, str, str]]:
    rng = random.Random(SEED * 4000)
    cases = []
    for command, settings_type in (("train", DreamLoraConfig), ("sample", SampleSettings), ("eval", EvalSettings)):
        for key, item, is_list in numeric_keys(settings_type):
            flag = key.flag.partition("/")[0]
            cases += [(command, flag, value) for value in bad_values(rng, key, item, is_list)]
    cases += [("priors", "--guidance", v) for v in ("nan", "inf", "-1")]
    cases += [("priors", flag, v) for flag in ("--seed", "--steps", "--num-images", "--batch-size")
              for v in ("-1", "nan")]
    cases += [("priors", "--resolution", v) for v in ("-64", "12", "0", "1000000000")]
    cases += [("check-images", "--resolution", v) for v in ("-8", "12", "nan", "0", "1000000000")]
    return cases


FLAG_CASES = flag_cases()


def test_every_numeric_flag_is_covered():
    covered = {(command, flag) for command, flag, _ in FLAG_CASES}
    for command, settings_type in (("train", DreamLoraConfig), ("sample", SampleSettings), ("eval", EvalSettings)):
        for key, _, _ in numeric_keys(settings_type):
            assert (command, key.flag.partition("/")[0]) in covered
    assert ("train", "--alpha") in covered and ("sample", "--scales") in covered and ("eval", "--seeds") in covered


@pytest.mark.parametrize("command, flag, value", FLAG_CASES, ids=[f"{c} {f} {v}" for c, f, v in FLAG_CASES])
def test_bad_flag_values_are_refused_in_one_line(tmp_path, command, flag, value):
    lora = tmp_path / "x.safetensors"
    tensors, metadata = valid_kohya()
    safetensors.torch.save_file(tensors, str(lora), metadata=metadata)
    base = {"train": ["train", INSTANCES, "--class-word", "ball", "--out", tmp_path / "o.safetensors", "--dry-run"],
            "sample": ["sample", "--lora", lora, "--prompt", "a photo", "--out", tmp_path / "g.png"],
            "eval": ["eval", lora],
            "priors": ["priors", "--class-prompt", "a photo of a ball", "--out", tmp_path / "priors"],
            "check-images": ["check-images", INSTANCES]}[command]
    line = refused(tmp_path, *base, f"{flag}={value}")
    assert flag in line or "Invalid value" in line, line
