"""LoRA injection, checkpoints, the kohya and diffusers file formats, and metadata, on a tiny SD1 pipeline."""

from __future__ import annotations

import datetime
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreamlora.errors import ConfigError, ModelLoadError
from dreamlora.lora import (
    DIFFUSERS_METADATA_KEY,
    add_lora_adapters,
    adapter_state_dict,
    load_adapter_state_dict,
    lora_metadata,
    read_lora_file,
    save_lora_file,
    strip_local_paths,
    to_kohya_state_dict,
    trainable_parameters,
)
from dreamlora.models import StableDiffusionFamily

SD1 = StableDiffusionFamily(name="sd1", v2=False, v_prediction=False)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a photo of sks dog"


# ----------------------------------------------------------------------------- fixtures


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, which CLIP's byte-level BPE uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE vocabulary with no merges: every character is a token (514 in all)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_pipeline(tokenizer_dir) -> StableDiffusionPipeline:
    """A seeded SD1-shaped pipeline small enough to run two denoising steps on CPU in well under a second."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=1000,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    scheduler = PNDMScheduler(  # SD 1.5's schedule
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: StableDiffusionPipeline):
    """One 64 px image, fixed seed, two steps: (1, 64, 64, 3) floats in [0, 1]."""
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=64,
        width=64,
    )
    return torch.from_numpy(out.images)


def inject(pipe, *, rank=4, alpha=2.0, train_text_encoder=True):
    add_lora_adapters(
        pipe.unet,
        [pipe.text_encoder],
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        unet_targets=UNET_TARGETS,
        train_text_encoder=train_text_encoder,
        text_targets=TEXT_TARGETS,
    )


def perturb(pipe, seed=1):
    """Give every lora_B a seeded non-zero value so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def pipe(tokenizer_dir):
    return build_pipeline(tokenizer_dir)


@pytest.fixture
def base_image(tokenizer_dir):
    return render(build_pipeline(tokenizer_dir))


# ----------------------------------------------------------------------------- injection and training


def test_only_lora_params_train(pipe):
    inject(pipe)
    for model in (pipe.unet, pipe.text_encoder):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert len(trainable_parameters(model)) == len(names)
    unet_lora = [n for n, _ in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert len(trainable_parameters(pipe.unet)) == 2 * len(unet_lora)
    assert len(trainable_parameters(pipe.text_encoder)) == 2 * 4 * 5  # A and B x 4 targets x 5 layers


def test_unet_only_freezes_text_encoder(pipe):
    inject(pipe, train_text_encoder=False)
    assert trainable_parameters(pipe.text_encoder) == []
    assert not any(".lora_" in n for n, _ in pipe.text_encoder.named_parameters())
    keys = adapter_state_dict(pipe.unet, [pipe.text_encoder])
    assert keys and all(k.startswith("unet.") for k in keys)


def test_fresh_adapter_is_a_noop(pipe, base_image):
    inject(pipe)
    torch.testing.assert_close(render(pipe), base_image, rtol=0, atol=0)


def test_training_step_moves_lora_and_keeps_base(pipe):
    inject(pipe)
    base_before = {
        f"{i}.{n}": p.detach().clone()
        for i, model in enumerate((pipe.unet, pipe.text_encoder))
        for n, p in model.named_parameters()
        if ".lora_" not in n
    }
    lora_before = {n: p.detach().clone() for n, p in adapter_state_dict(pipe.unet, [pipe.text_encoder]).items()}
    params = trainable_parameters(pipe.unet) + trainable_parameters(pipe.text_encoder)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 514, (2, 77), generator=g)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    hidden = pipe.text_encoder(ids)[0]  # (2, 77, 32)
    pred = pipe.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    optimizer.step()

    after = adapter_state_dict(pipe.unet, [pipe.text_encoder])
    # With B = 0 the first step only moves B (A's gradient is B^T @ ..., zero); every B must move.
    moved_b = [k for k in after if ".lora_B." in k and not torch.equal(after[k], lora_before[k])]
    assert len(moved_b) == sum(".lora_B." in k for k in after)
    for i, model in enumerate((pipe.unet, pipe.text_encoder)):
        for n, p in model.named_parameters():
            if ".lora_" not in n:
                assert torch.equal(p, base_before[f"{i}.{n}"]), n
                assert p.grad is None, n


def test_unknown_target_is_a_config_error(pipe):
    with pytest.raises(ConfigError, match=r"lora.unet_targets \['to_qq'\]"):
        add_lora_adapters(
            pipe.unet,
            [pipe.text_encoder],
            rank=4,
            alpha=4,
            dropout=0.0,
            unet_targets=["to_q", "to_qq"],
            train_text_encoder=False,
            text_targets=TEXT_TARGETS,
        )


# ----------------------------------------------------------------------------- checkpoints


def test_adapter_state_dict_round_trip(pipe, tokenizer_dir):
    inject(pipe)
    perturb(pipe)
    state = {k: v.clone() for k, v in adapter_state_dict(pipe.unet, [pipe.text_encoder]).items()}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in state

    other = build_pipeline(tokenizer_dir)
    inject(other)
    load_adapter_state_dict(other.unet, [other.text_encoder], state)
    again = adapter_state_dict(other.unet, [other.text_encoder])
    assert again.keys() == state.keys()
    for k in state:
        assert torch.equal(again[k], state[k]), k


def test_load_adapter_state_dict_rejects_other_rank(pipe, tokenizer_dir):
    inject(pipe, rank=4)
    state = adapter_state_dict(pipe.unet, [pipe.text_encoder])
    other = build_pipeline(tokenizer_dir)
    inject(other, rank=8)
    with pytest.raises(ModelLoadError, match="rank"):
        load_adapter_state_dict(other.unet, [other.text_encoder], state)


# ----------------------------------------------------------------------------- kohya names


def test_kohya_state_dict_names_alpha_shapes(pipe):
    inject(pipe, rank=4, alpha=2.0)
    sd = to_kohya_state_dict(pipe.unet, [pipe.text_encoder], SD1, alpha=2.0)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    cross = "lora_unet_up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_k"
    for key in (te, unet, cross):
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= sd.keys()
    assert sd[f"{te}.lora_down.weight"].shape == (4, 32)  # (r, in)
    assert sd[f"{te}.lora_up.weight"].shape == (32, 4)  # (out, r)
    assert sd[f"{cross}.lora_down.weight"].shape == (4, 32)  # cross-attention input is the text width
    assert sd[f"{unet}.lora_up.weight"].shape == (64, 4)
    assert sd[f"{unet}.alpha"].shape == () and sd[f"{unet}.alpha"].item() == 2.0
    assert all(sd[k].item() == 2.0 for k in sd if k.endswith(".alpha"))
    assert all(sd[k].dtype == torch.float16 for k in sd if k.endswith(".weight"))
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in sd)
    assert sum(k.startswith("lora_te_") for k in sd) == 3 * 4 * 5
    # The peft lora_A is the down projection, byte for byte (before the fp16 cast).
    peft_a = pipe.text_encoder.encoder.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(sd[f"{te}.lora_down.weight"], peft_a.detach().half(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="alpha"):
        to_kohya_state_dict(pipe.unet, [pipe.text_encoder], SD1, alpha=4.0)


# ----------------------------------------------------------------------------- files load in diffusers


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_file_loads_in_diffusers_with_alpha(fmt, pipe, base_image, tokenizer_dir, tmp_path):
    inject(pipe, rank=4, alpha=2.0)  # alpha != rank: a loader that assumes alpha = rank doubles the update
    perturb(pipe)
    in_memory = render(pipe)
    assert (in_memory - base_image).abs().max() > 1e-2

    path = tmp_path / f"lora_{fmt}.safetensors"
    meta = {"ss_network_dim": "4"}
    save_lora_file(path, pipe.unet, [pipe.text_encoder], SD1, format=fmt, alpha=2.0, dtype=torch.float32, metadata=meta)

    loaded = build_pipeline(tokenizer_dir)
    loaded.load_lora_weights(str(path), adapter_name="loaded")
    assert ".lora_A." in next(n for n, _ in loaded.text_encoder.named_parameters() if ".lora_A." in n)
    assert any(".lora_A." in n for n, _ in loaded.unet.named_parameters())
    image = render(loaded)
    assert (image - base_image).abs().max() > 1e-2
    torch.testing.assert_close(image, in_memory, rtol=1e-5, atol=1e-5)

    loaded.set_adapters(["loaded"], [0.0])
    torch.testing.assert_close(render(loaded), base_image, rtol=0, atol=0)


def test_fp16_file_is_close_and_diffusers_needs_the_metadata(pipe, base_image, tokenizer_dir, tmp_path):
    inject(pipe, rank=4, alpha=2.0)
    perturb(pipe)
    in_memory = render(pipe)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, pipe.unet, [pipe.text_encoder], SD1, format="diffusers", alpha=2.0, metadata={})
    info = read_lora_file(path)
    assert info.dtype == torch.float16

    loaded = build_pipeline(tokenizer_dir)
    loaded.load_lora_weights(str(path))
    torch.testing.assert_close(render(loaded), in_memory, rtol=0, atol=2e-3)

    # Control: the same weights without lora_adapter_metadata load with alpha = rank, a different
    # image; so the equality above really shows the metadata carrying alpha.
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(info.tensors, str(bare), metadata={"format": "pt"})
    wrong = build_pipeline(tokenizer_dir)
    wrong.load_lora_weights(str(bare))
    assert (render(wrong) - in_memory).abs().max() > 1e-2


# ----------------------------------------------------------------------------- metadata and reading


def make_metadata(**overrides):
    args = dict(
        family=SD1,
        rank=4,
        alpha=2.0,
        resolution=512,
        output_name="sks_dog",
        trigger_phrase="sks dog",
        title="sks dog",
        config_json=json.dumps({"data": {"instance_dir": "/home/u/x/photos"}, "out": "C:\\Users\\u\\out"}),
        train_text_encoder=True,
        date="2025-01-02T03:04:05+00:00",
    )
    args.update(overrides)
    return lora_metadata(**args)


def test_lora_metadata_keys_and_values():
    meta = make_metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sks_dog"
    assert meta["ss_resolution"] == "(512, 512)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.date"] == "2025-01-02T03:04:05+00:00"
    assert meta["modelspec.title"] == "sks dog"
    assert meta["dreamlora.version"]
    config = json.loads(meta["dreamlora.config"])
    assert config == {"data": {"instance_dir": "photos"}, "out": "out"}
    assert "/home/u" not in "".join(meta.values()) and "Users" not in "".join(meta.values())

    v = make_metadata(family=StableDiffusionFamily(name="sd2", v2=True, v_prediction=True), resolution=768)
    assert v["ss_base_model_version"] == "sd_v2_v" and v["ss_v2"] == "True"
    assert v["modelspec.prediction_type"] == "v"
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    at_512 = make_metadata(family=StableDiffusionFamily(name="sd2", v2=True, v_prediction=True), resolution=512)
    assert at_512["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"  # named by the model, not the size
    eps = make_metadata(family=StableDiffusionFamily(name="sd2", v2=True, v_prediction=False), resolution=512)
    assert eps["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


def test_lora_metadata_bounds_lengths():
    meta = make_metadata(title="t" * 10_000, config_json=json.dumps({"x": "y" * 200_000}))
    assert len(meta["modelspec.title"]) == 256
    assert len(meta["dreamlora.config"].encode()) <= 64 * 1024
    assert json.loads(meta["dreamlora.config"])["truncated"] is True
    now = make_metadata(date=None)["modelspec.date"]  # filled in: ISO 8601, UTC, whole seconds
    assert datetime.datetime.fromisoformat(now).utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"dir": "/home/u/x"}', '{"dir": "x"}'),
        ("saved to /tmp/run/out.safetensors.", "saved to out.safetensors."),
        ('"C:\\\\Users\\\\u\\\\dog.png"', '"dog.png"'),
        ("D:/data/cats", "cats"),
        ("~/photos/a.jpg and \\\\server\\share\\b.jpg", "a.jpg and b.jpg"),
        ("file:///home/u/z.png", "z.png"),
        ("relative/dir/a.png stays", "relative/dir/a.png stays"),
        ("see https://github.com/huggingface/diffusers", "see https://github.com/huggingface/diffusers"),
        ("ratio 1/2 and and/or", "ratio 1/2 and and/or"),
    ],
)
def test_strip_local_paths(text, expected):
    assert strip_local_paths(text) == expected


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_read_lora_file_describes_it(fmt, pipe, tmp_path):
    inject(pipe, rank=4, alpha=2.0)
    path = tmp_path / "x.safetensors"
    meta = make_metadata()
    save_lora_file(path, pipe.unet, [pipe.text_encoder], SD1, format=fmt, alpha=2.0, metadata=meta)
    info = read_lora_file(path)
    assert info.format == fmt
    assert info.rank == 4
    assert info.alpha == 2.0
    assert info.text_modules == 4 * 5
    assert info.unet_modules == sum(
        1 for n, _ in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    )
    assert info.dtype == torch.float16
    assert info.file_size == path.stat().st_size
    assert info.metadata["format"] == "pt"
    # kohya's ss_* entries only in kohya files: AUTOMATIC1111 takes a file that has them for a kohya network
    # (a diffusers file keeps them under dreamlora.kohya_metadata, for a conversion back).
    assert info.metadata.get("ss_network_alpha") == ("2.0" if fmt == "kohya" else None)
    assert ("dreamlora.kohya_metadata" in info.metadata) == (fmt == "diffusers")
    assert (DIFFUSERS_METADATA_KEY in info.metadata) == (fmt == "diffusers")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_read_lora_file_reports_per_module_alpha(tmp_path):
    path = tmp_path / "mixed.safetensors"
    down, up = torch.zeros(8, 16), torch.zeros(16, 8)
    safetensors.torch.save_file(
        {
            "lora_unet_a.lora_down.weight": down,
            "lora_unet_a.lora_up.weight": up,
            "lora_unet_a.alpha": torch.tensor(1.0),
            "lora_te_b.lora_down.weight": down.clone(),
            "lora_te_b.lora_up.weight": up.clone(),  # no alpha: loaders use alpha = rank
        },
        str(path),
    )
    info = read_lora_file(path)
    assert info.alpha == {"lora_unet_a": 1.0, "lora_te_b": 8.0}
    assert (info.unet_modules, info.text_modules, info.rank) == (1, 1, 8)


def test_malformed_files_are_model_load_errors(pipe, tmp_path):
    inject(pipe)
    good = tmp_path / "good.safetensors"
    save_lora_file(good, pipe.unet, [pipe.text_encoder], SD1, format="kohya", alpha=2.0, metadata={})
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    not_lora = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))

    for bad in (truncated, noise, short, not_lora, tmp_path / "missing.safetensors"):
        with pytest.raises(ModelLoadError, match=bad.name):
            read_lora_file(bad)
