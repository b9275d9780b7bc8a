"""Sharing LoRA files: the compatibility check, convert, merge (bake and combine), resize, extract, DoRA, metadata.

Everything runs on the built-in tiny models (random weights). Adapters get random, non-zero up weights so every
update is visible; comparisons are tensor by tensor (bit-equal where nothing is computed) or of UNet / text-encoder
outputs on fixed inputs (fp32 tolerance where something is).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cli.main import app
from dreamlora.errors import ConfigError
from dreamlora.interop.check import CompatibilityError, check_file, check_lora
from dreamlora.interop.convert import convert_lora
from dreamlora.interop.extract import extract_lora
from dreamlora.interop.formats import parse_lora, read_lora, to_targets
from dreamlora.interop.keymaps import ModelLayout, Target
from dreamlora.interop.merge import bake_loras, combine_loras
from dreamlora.interop.resize import resize_lora
from dreamlora.lora import add_lora_adapters, lora_metadata, save_lora_file
from dreamlora.models import load_base_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MODELS = ("builtin:tiny-sd", "builtin:tiny-sd2", "builtin:tiny-sdxl")


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def bases(session_cache):
    return {name: load_base_model(name) for name in MODELS}


@pytest.fixture(scope="module")
def sd1(bases):
    return bases["builtin:tiny-sd"]


def adapted(base, *, rank=4, alpha=2.0, text=True, dora=False, seed=0, unet_targets=UNET_TARGETS):
    """A copy of `base` with adapters whose up weights (and DoRA magnitudes) are random: a visible update."""
    model = copy.deepcopy(base)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        add_lora_adapters(model.unet, model.text_encoders, rank=rank, alpha=alpha, dropout=0.0,
                          unet_targets=unet_targets, train_text_encoder=text, text_targets=TEXT_TARGETS, dora=dora)
        for module in (model.unet, *model.text_encoders):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.05)
                elif "lora_magnitude_vector" in name:
                    param.data.mul_(1 + 0.2 * torch.rand_like(param))
    return model


def write(model, path, fmt="kohya", dtype=torch.float32, alpha=2.0, **meta):
    metadata = lora_metadata(family=model.family, rank=4, alpha=alpha, resolution=64, output_name=path.stem,
                             trigger_phrase="sks ball", title=path.stem, train_text_encoder=True,
                             config_json=json.dumps({"model": {"name": model.identity}}), **meta)
    save_lora_file(path, model.unet, model.text_encoders, model.family, format=fmt, alpha=alpha, dtype=dtype,
                   metadata=metadata)
    return path


def outputs(model):
    """UNet and text-encoder outputs on fixed inputs (64 px latents of the tiny SD 1/2 models)."""
    g = torch.Generator().manual_seed(0)
    width = model.unet.config.cross_attention_dim
    sample = torch.randn(1, 4, 32, 32, generator=g)
    hidden = torch.randn(1, 77, width, generator=g)
    ids = torch.randint(0, 300, (1, 77), generator=g)
    with torch.no_grad():
        unet = model.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample
        text = model.text_encoders[0](ids)[0]
    return unet, text


def tensors_of(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def assert_same_file_content(a, b):
    (ta, ma), (tb, mb) = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert ma == mb


# ----------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("name", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_kohya_diffusers_round_trips_are_bit_equal(name, bases, tmp_path):
    model = adapted(bases[name])
    kohya = write(model, tmp_path / "k.safetensors", dtype=torch.float16)
    convert_lora(kohya, tmp_path / "d.safetensors", "diffusers")
    convert_lora(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", "kohya")
    assert_same_file_content(kohya, tmp_path / "k2.safetensors")

    diffusers = write(model, tmp_path / "d0.safetensors", fmt="diffusers", dtype=torch.float16)
    convert_lora(diffusers, tmp_path / "k3.safetensors", "kohya")
    convert_lora(tmp_path / "k3.safetensors", tmp_path / "d1.safetensors", "diffusers")
    assert_same_file_content(diffusers, tmp_path / "d1.safetensors")

    # alpha travels as each format's readers expect: .alpha tensors, or the peft config
    converted, meta = tensors_of(tmp_path / "d.safetensors")
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 2.0 and config["unet.r"] == 4 and not any(k.endswith(".alpha") for k in converted)
    assert not any(k.startswith("ss_") for k in meta) and meta["modelspec.implementation"] == "diffusers"
    kohya_tensors, kohya_meta = tensors_of(kohya)
    assert all(v.dtype == torch.float32 and v.item() == 2.0 for k, v in kohya_tensors.items() if k.endswith(".alpha"))
    assert kohya_meta["ss_network_module"] == "networks.lora"


def test_sd_scripts_fp16_alphas_and_missing_alphas_round_trip(sd1, tmp_path):
    # sd-scripts saves .alpha in the weights' dtype; some files have no .alpha (applied at alpha = rank)
    tensors, _ = tensors_of(write(adapted(sd1), tmp_path / "k.safetensors", dtype=torch.float16))
    tensors = {k: (v.half() if k.endswith(".alpha") else v) for k, v in tensors.items()}
    dropped = next(k for k in tensors if k.endswith(".alpha") and "lora_te" in k)
    del tensors[dropped]
    src = tmp_path / "sd_scripts.safetensors"
    safetensors.torch.save_file(tensors, str(src), metadata={"ss_network_module": "networks.lora"})
    convert_lora(src, tmp_path / "d.safetensors", "diffusers", model="builtin:tiny-sd")
    data = read_lora(tmp_path / "d.safetensors")
    assert data.modules[_peft_stem(dropped)].alpha == 4.0  # alpha = rank: as every loader applied it
    convert_lora(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya", model="builtin:tiny-sd",
                 overwrite=True)
    back, _ = tensors_of(tmp_path / "k.safetensors")
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert back[dropped].item() == 4.0


def _peft_stem(kohya_alpha_key):
    layer = int(kohya_alpha_key.split("_layers_")[1].split("_")[0])
    proj = kohya_alpha_key.split("_self_attn_")[1].removesuffix(".alpha")
    return f"text_encoder.text_model.encoder.layers.{layer}.self_attn.{proj}"


def test_older_diffusers_and_cloneofsimo_files_are_read(sd1, tmp_path):
    model = adapted(sd1, alpha=4.0)  # alpha = rank: these layouts carry no alpha
    kohya = write(model, tmp_path / "k.safetensors", alpha=4.0)
    layout = ModelLayout.from_modules(sd1.family, sd1.unet, sd1.text_encoders)
    modules = to_targets(read_lora(kohya), layout)

    # diffusers 0.14-0.21: attention-processor keys for the UNet, lora_linear_layer for the text encoder, a .bin
    procs = {}
    for target, m in modules.items():
        if target.component == "unet":
            attention, _, proj = target.module.rpartition(".to_")
            stem = f"unet.{attention}.processor.to_{proj.removesuffix('.0')}_lora"
            procs[f"{stem}.down.weight"], procs[f"{stem}.up.weight"] = m.down, m.up
        else:
            stem = f"text_encoder.{target.module}.lora_linear_layer"
            procs[f"{stem}.down.weight"], procs[f"{stem}.up.weight"] = m.down, m.up
    torch.save(procs, tmp_path / "pytorch_lora_weights.bin")
    convert_lora(tmp_path / "pytorch_lora_weights.bin", tmp_path / "from_procs.safetensors", "kohya",
                 model="builtin:tiny-sd")
    # the same weights; no .alpha (these files carry none: alpha = rank, which kohya readers assume without one)
    _same_tensors(tmp_path / "from_procs.safetensors", kohya, alphas=False)

    # cloneofsimo's lora: module i is the i-th Linear inside an Attention/GEGLU module, in module order; files from
    # diffusers < 0.12 put each block's feed-forward between its attentions
    unet_order = [f"{name}.{sub}" for name, m in sd1.unet.named_modules() if type(m).__name__ in ("Attention", "GEGLU")
                  for sub, s in m.named_modules() if isinstance(s, torch.nn.Linear)]
    assert any(n.endswith("ff.net.0.proj") for n in unet_order)
    rng = torch.Generator().manual_seed(1)
    weights = {}
    for i, name in enumerate(unet_order):
        layer = sd1.unet.get_submodule(name)
        weights[name] = (torch.randn(layer.out_features, 2, generator=rng), torch.randn(2, layer.in_features, generator=rng))
    legacy = sorted(unet_order, key=lambda n: _legacy_key(n, unet_order))
    for order, file in ((unet_order, "modern.safetensors"), (legacy, "legacy.safetensors")):
        state = {f"unet:{i}:{part}": weights[n][j] for i, n in enumerate(order) for j, part in enumerate(("up", "down"))}
        safetensors.torch.save_file(state, str(tmp_path / file), metadata={"unet": json.dumps(["Attention", "GEGLU"])})
        convert_lora(tmp_path / file, tmp_path / f"k_{file}", "kohya", model="builtin:tiny-sd")
        converted = to_targets(read_lora(tmp_path / f"k_{file}"), layout)
        for name, (up, down) in weights.items():
            m = converted[Target("unet", name)]
            assert torch.equal(m.up, up) and torch.equal(m.down, down) and m.scale == 1.0, (file, name)
    # its .pt files: a list up, down, up, down ...
    torch.save([t for n in unet_order for t in weights[n]], tmp_path / "lora_weight.pt")
    convert_lora(tmp_path / "lora_weight.pt", tmp_path / "k_pt.safetensors", "kohya", model="builtin:tiny-sd")
    _same_tensors(tmp_path / "k_pt.safetensors", tmp_path / "k_modern.safetensors")


def _legacy_key(name, order):
    """diffusers < 0.12 registered a transformer block's attn1, ff, attn2 in that order."""
    block, _, rest = name.partition(".transformer_blocks.")
    index, _, inner = rest.partition(".")
    rank = 0 if inner.startswith("attn1") else 1 if inner.startswith("ff") else 2
    first = min(i for i, n in enumerate(order) if n.startswith(f"{block}.transformer_blocks.{index}."))
    return (first, rank, order.index(name))


def _same_tensors(a, b, alphas=True):
    ta, tb = tensors_of(a)[0], tensors_of(b)[0]
    if not alphas:
        assert not any(k.endswith(".alpha") for k in ta)
        tb = {k: v for k, v in tb.items() if not k.endswith(".alpha")}
    assert sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ----------------------------------------------------------------------------------------------- check


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("text", [False, True])
def test_check_passes_every_file_dreamlora_writes(name, text, bases, tmp_path):
    model = adapted(bases[name], text=text)
    for fmt in ("kohya", "diffusers"):
        report = check_file(write(model, tmp_path / f"{fmt}.safetensors", fmt=fmt), name)
        assert report.errors == [], report.errors
        for tool in report.tools:
            assert tool.ok == (tool.intended or fmt == "kohya"), (fmt, tool)
        if fmt == "diffusers":  # ComfyUI maps diffusers' text-encoder keys but not peft's UNet keys
            comfy = next(t for t in report.tools if t.tool == "comfyui")
            assert comfy.loaded == sum(1 for s in read_lora(tmp_path / f"{fmt}.safetensors").modules
                                       if s.startswith("text_encoder"))


def test_check_catches_a_misspelt_key_a_wrong_shape_and_wrong_headers(sd1, tmp_path):
    layout = ModelLayout.from_modules(sd1.family, sd1.unet, sd1.text_encoders)
    tensors, meta = tensors_of(write(adapted(sd1), tmp_path / "k.safetensors"))
    good = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    misspelt = {k.replace(good, good + "q"): v for k, v in tensors.items()}
    errors = " ".join(check_lora(parse_lora(misspelt, meta, "m"), layout).errors)
    assert f"'{good}q'" in errors and "name no module" in errors and "AUTOMATIC1111/Forge would not load 1 of" in errors

    wide = dict(tensors)
    wide[f"{good}.lora_down.weight"] = torch.zeros(4, 65)
    errors = " ".join(check_lora(parse_lora(wide, meta, "w"), layout).errors)
    assert f"'{good}' takes 65 inputs" in errors and "weight (64, 64)" in errors

    sd2_header = {**meta, "ss_base_model_version": "sd_v2"}
    assert "'ss_base_model_version' is 'sd_v2'" in " ".join(check_lora(parse_lora(tensors, sd2_header, "h"), layout).errors)

    peft, peft_meta = tensors_of(write(adapted(sd1), tmp_path / "d.safetensors", fmt="diffusers"))
    labelled = {**peft_meta, "ss_network_module": "networks.lora"}
    assert "carries kohya's header entries ('ss_network_module')" in \
        " ".join(check_lora(parse_lora(peft, labelled, "l"), layout).errors)

    safetensors.torch.save_file(misspelt, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CompatibilityError, match="to_qq"):
        check_file(tmp_path / "bad.safetensors").raise_for_errors()
    result = CliRunner().invoke(app, ["check", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 1
    assert "AUTOMATIC1111/Forge  loads 67 of 68" in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "to_qq" in error[0]
    ok = CliRunner().invoke(app, ["check", str(tmp_path / "k.safetensors")])
    assert ok.exit_code == 0 and "ok: every tool" in ok.output


def test_tool_key_maps_follow_the_tools_rules(bases):
    sd2, sdxl = bases["builtin:tiny-sd2"], bases["builtin:tiny-sdxl"]
    layout = ModelLayout.from_modules(sd2.family, sd2.unet, sd2.text_encoders)
    q = Target("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
    # AUTOMATIC1111 reaches SD 2's OpenCLIP q projection through the fused in_proj of resblock 0
    assert layout._a1111_names["model_transformer_resblocks_0_attn_q_proj"] == q
    assert layout.resolve("automatic1111", "kohya", "lora_te_text_model_encoder_layers_0_self_attn_q_proj") == q
    assert layout.resolve("automatic1111", "kohya", "lora_te_text_model_final_layer_norm") is None
    # one-encoder files say lora_te_ or lora_te1_ (ComfyUI and diffusers read both; AUTOMATIC1111 only for CLIP-L)
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert layout.read("kohya", te1) == layout.resolve("comfyui", "kohya", te1) == q
    assert layout.resolve("automatic1111", "kohya", te1) is None
    # ComfyUI: older diffusers attention-processor names, and no peft UNet names
    to_out = Target("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert layout.resolve("comfyui", "attn-procs", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out") == to_out
    assert layout.resolve("comfyui", "peft", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") is None
    assert layout.resolve("diffusers", "peft", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == to_out
    # SDXL: SGM names everywhere, CLIP-G as lora_te2 / text_encoder_2
    xl = ModelLayout.from_modules(sdxl.family, sdxl.unet, sdxl.text_encoders)
    stem = xl.kohya_stem(Target("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"))
    assert stem == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert all(xl.resolve(t, "kohya", stem) is not None for t in ("automatic1111", "comfyui", "diffusers"))
    g = Target("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1")
    assert xl.resolve("automatic1111", "kohya", "lora_te2_text_model_encoder_layers_1_mlp_fc1") == g
    assert xl.resolve("comfyui", "peft", "text_encoder_2.text_model.encoder.layers.1.mlp.fc1") == g
    # AUTOMATIC1111's fixed SD block numbering holds only for UNets with two resnets a level (the toy model has one:
    # no model AUTOMATIC1111 loads), so a file for the toy model is not held to it
    from dreamlora.models.configs import read_model_configs

    assert layout.a1111_loads_unet and xl.a1111_loads_unet
    assert not ModelLayout.from_configs(read_model_configs("builtin:toy")).a1111_loads_unet
    # only ComfyUI and diffusers reach CLIP-G's projection
    assert xl.resolve("automatic1111", "kohya", "lora_te2_text_projection") is None
    assert xl.resolve("comfyui", "kohya", "lora_te2_text_projection") == Target("text_encoder_2", "text_projection")


# ----------------------------------------------------------------------------------------------- merge


def test_baked_model_equals_base_plus_lora(sd1, tmp_path):
    model = adapted(sd1)
    with_lora = outputs(model)
    path = write(model, tmp_path / "k.safetensors")
    report = bake_loras(copy.deepcopy(sd1), [path], tmp_path / "merged", save_dtype="fp32")
    assert report.layers == 68
    merged = outputs(load_base_model(str(tmp_path / "merged")))
    base = outputs(sd1)
    for got, want, before in zip(merged, with_lora, base):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - before).abs().max() > 1e-3

    single = bake_loras(copy.deepcopy(sd1), [path], tmp_path / "merged.safetensors", weights=[0.5])
    assert single.kind == "single file"
    with safe_open(str(tmp_path / "merged.safetensors"), framework="pt") as f:
        assert any(k.startswith("model.diffusion_model.input_blocks.") for k in f.keys())


def test_combined_lora_equals_applying_both(sd1, tmp_path):
    a = write(adapted(sd1, seed=1), tmp_path / "a.safetensors")
    b = write(adapted(sd1, rank=2, alpha=3.0, seed=2, unet_targets=["to_q", "to_v"]), tmp_path / "b.safetensors",
              alpha=3.0, fmt="diffusers")
    weights = [0.7, -0.4]
    combine_loras([a, b], tmp_path / "ab.safetensors", weights=weights)
    combined = read_lora(tmp_path / "ab.safetensors")
    assert combined.style == "kohya" and {m.rank for m in combined.modules.values()} == {6, 4}

    one = bake_loras(copy.deepcopy(sd1), [tmp_path / "ab.safetensors"], tmp_path / "one", save_dtype="fp32")
    both = copy.deepcopy(sd1)
    bake_loras(both, [a, b], tmp_path / "both", weights=weights, save_dtype="fp32")
    for got, want in zip(outputs(load_base_model(str(tmp_path / "one"))), outputs(both)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert one.layers == 68

    # and in diffusers' own loader: the combined file equals both files with their weights
    pipe = copy.deepcopy(sd1).pipeline()
    pipe.load_lora_weights(str(tmp_path / "ab.safetensors"), adapter_name="ab")
    pipe.unet.eval()
    torch.testing.assert_close(outputs(_as_model(pipe, sd1))[0], outputs(both)[0], rtol=1e-4, atol=1e-5)


def _as_model(pipe, like):
    model = copy.copy(like)
    model.unet, model.text_encoders = pipe.unet, [pipe.text_encoder]
    return model


# ----------------------------------------------------------------------------------------------- resize


def test_resize_to_full_rank_is_exact_and_reports_energy(sd1, tmp_path):
    src = write(adapted(sd1), tmp_path / "k.safetensors")
    full = resize_lora(src, tmp_path / "full.safetensors", energy=1.0)
    before, after = read_lora(src).modules, read_lora(tmp_path / "full.safetensors").modules
    assert sorted(before) == sorted(after)
    for stem in before:
        torch.testing.assert_close(after[stem].delta(), before[stem].delta(), rtol=1e-5, atol=1e-7)
        assert after[stem].rank == 4
    assert min(m.energy for m in full.modules) > 1 - 1e-9

    half = resize_lora(src, tmp_path / "r2.safetensors", rank=2)
    resized = read_lora(tmp_path / "r2.safetensors")
    for m in half.modules:
        s = torch.linalg.svdvals(before[m.stem].delta().double().flatten(1))
        assert m.rank_after == 2 and m.energy == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
        # the file's alpha is kept (the strength change is in up), and the update is the best rank-2 one
        assert resized.modules[m.stem].alpha == before[m.stem].alpha == 2.0
        error = (resized.modules[m.stem].delta().double() - before[m.stem].delta().double()).norm()
        assert float(error) == pytest.approx(float(s[2:].norm()), rel=1e-4)
    assert resized.metadata["ss_network_dim"] == "2" and resized.metadata["ss_network_alpha"] == "2.0"
    assert check_file(tmp_path / "r2.safetensors").errors == []


# ----------------------------------------------------------------------------------------------- extract


def test_extract_recovers_a_known_low_rank_delta(sd1, tmp_path):
    tuned = copy.deepcopy(sd1)
    rng = torch.Generator().manual_seed(3)
    known = {}
    for component, model, name in (("unet", tuned.unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
                                   ("unet", tuned.unet, "mid_block.attentions.0.proj_in"),
                                   ("text_encoder", tuned.text_encoders[0], "encoder.layers.2.mlp.fc1")):
        layer = model.get_submodule(name)
        delta = torch.randn(layer.weight.shape[0], 2, generator=rng) @ torch.randn(2, layer.weight.shape[1],
                                                                                    generator=rng) * 0.05
        with torch.no_grad():
            layer.weight += delta.reshape(layer.weight.shape)
        known[Target(component, name if component == "unet" else "text_model." + name)] = delta
    report = extract_lora(sd1, tuned, tmp_path / "x.safetensors", rank=4, save_dtype="fp32")
    assert report.total_relative_error < 1e-5
    layout = ModelLayout.from_modules(sd1.family, sd1.unet, sd1.text_encoders)
    extracted = to_targets(read_lora(tmp_path / "x.safetensors"), layout)
    assert set(extracted) == set(known)
    for target, delta in known.items():
        torch.testing.assert_close(extracted[target].delta().reshape(delta.shape), delta, rtol=1e-4, atol=1e-6)
    assert check_file(tmp_path / "x.safetensors").errors == []  # it names its base model


# ----------------------------------------------------------------------------------------------- DoRA


def test_dora_file_loads_in_diffusers_and_changes_the_output(sd1, tmp_path):
    model = adapted(sd1, dora=True)
    with_dora = outputs(model)
    path = write(model, tmp_path / "dora.safetensors", fmt="diffusers")
    data = read_lora(path)
    assert data.has_dora and json.loads(data.metadata["lora_adapter_metadata"])["unet.use_dora"] is True

    pipe = copy.deepcopy(sd1).pipeline()
    pipe.load_lora_weights(str(path), adapter_name="dora")
    loaded = outputs(_as_model(pipe, sd1))
    base = outputs(sd1)
    for got, want, before in zip(loaded, with_dora, base):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        assert (got - before).abs().max() > 1e-3

    # baked, DoRA's normalisation is applied as peft applies it
    baked = copy.deepcopy(sd1)
    bake_loras(baked, [path], tmp_path / "merged", save_dtype="fp32")
    for got, want in zip(outputs(baked), with_dora):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)

    # the kohya layout cannot carry it: refused, when training is configured and when writing or converting
    with pytest.raises(ConfigError, match="cannot carry a DoRA"):
        write(model, tmp_path / "k.safetensors")
    with pytest.raises(ConfigError, match="cannot carry a DoRA"):
        convert_lora(path, tmp_path / "k.safetensors", "kohya")
    from dreamlora import load_config

    with pytest.raises(ConfigError, match=r"lora\.dora \(flag --dora\) needs --format diffusers"):
        load_config(None, {"lora.dora": True, "data.instance_dir": "x", "data.class_word": "ball",
                           "output.path": "x.safetensors"})


# ----------------------------------------------------------------------------------------------- metadata


def test_sshs_hashes_are_sd_scripts_and_inspect_shows_them(sd1, tmp_path):
    from dreamlora import describe_lora
    from dreamlora.interop.thumbnail import thumbnail_data_url

    from PIL import Image

    Image.new("RGB", (640, 320), (200, 30, 30)).save(tmp_path / "grid.png")
    thumb = thumbnail_data_url(tmp_path / "grid.png")
    path = write(adapted(sd1, rank=4), tmp_path / "k.safetensors", thumbnail=thumb)
    tensors, meta = tensors_of(path)
    # sd-scripts: serialise with only the ss_* entries; sha256 after the header, and of 64 KiB at 1 MiB
    data = safetensors.torch.save(tensors | {"pad": torch.zeros(400_000)},
                                  metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    from dreamlora.interop.hashes import addnet_hashes

    size = int.from_bytes(data[:8], "little")
    assert addnet_hashes(tensors | {"pad": torch.zeros(400_000)}, meta) == (
        hashlib.sha256(data[8 + size:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])
    assert meta["sshs_model_hash"] == addnet_hashes(tensors, meta)[0]

    info = describe_lora(path)
    assert info["sshs_model_hash"] == meta["sshs_model_hash"] and info["sshs_legacy_hash"] == meta["sshs_legacy_hash"]
    assert info["trigger_words"] == ["sks ball"]
    assert info["thumbnail"].startswith("JPEG 256x128")
    assert meta["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert "sshs_model_hash: " + meta["sshs_model_hash"] in result.output and "thumbnail: JPEG" in result.output


def test_cli_convert_resize_merge_extract(sd1, tmp_path):
    src = write(adapted(sd1), tmp_path / "k.safetensors")
    run = CliRunner().invoke
    result = run(app, ["convert", str(src), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 0 and "kohya -> diffusers" in result.output
    result = run(app, ["convert", str(src), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = run(app, ["resize", str(tmp_path / "d.safetensors"), "--energy", "0.9"])
    assert result.exit_code == 0 and "energy kept" in result.output and (tmp_path / "d-energy0.9.safetensors").is_file()
    result = run(app, ["merge", str(src), str(tmp_path / "d.safetensors"), "--weights", "1,1,1",
                       "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1 and "3 weights for 2 LoRA files" in result.output
    result = run(app, ["merge", str(src), str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0 and "LoRA file" in result.output
    result = run(app, ["extract", "--base", "builtin:tiny-sd", "--tuned", "builtin:tiny-sd", "--rank", "2",
                       "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "nothing to extract" in result.output


def test_train_with_dora_writes_a_checked_diffusers_file(tmp_path):
    from pathlib import Path

    from dreamlora import load_config, train

    instances = Path(__file__).resolve().parents[1] / "sample_instances" / "polkaball"
    config = load_config(None, {
        "model.name": "builtin:tiny-sd", "data.instance_dir": str(instances), "data.class_word": "ball",
        "prior.enabled": False, "output.path": str(tmp_path / "dora.safetensors"), "output.format": "diffusers",
        "lora.dora": True, "lora.train_text_encoder": True, "train.steps": 2, "train.checkpoint_every": 0,
        "validation.final": False,
    })
    data = read_lora(train(config).output)
    assert data.has_dora and all(m.magnitude is not None for m in data.modules.values())
    assert not any(k.startswith("ss_") for k in data.metadata)
    assert check_file(tmp_path / "dora.safetensors").errors == []
