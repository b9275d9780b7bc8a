"""The memory plan: no weights read, counts and epochs, the estimate against real runs, the budget ladder, --dry-run."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from dreamlora import load_config
from dreamlora.errors import ConfigError
from dreamlora.memory import (GIB, LiveBytes, MemorySettings, estimate_memory, meta_unet, plan, read_model_configs)

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"
SD15_UNET = {"sample_size": 64, "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
             "attention_head_dim": 8}


def config(tmp_path, **overrides):
    values = {"model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "output.path": str(tmp_path / "out.safetensors"), "train.steps": 50,
              "data.class_prompt": "a plan-test photo of a {class}"}  # no other test fills this prompt's cache
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if anything loads a model or builds the built-in's weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the plan must not load weights")

    import dreamlora.models.builtin as builtin
    import dreamlora.models.loading as loading
    monkeypatch.setattr(loading, "load_base_model", refuse)
    monkeypatch.setattr(loading, "builtin_model_dir", refuse)
    monkeypatch.setattr(builtin, "builtin_model_dir", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)


def test_plan_counts_steps_epochs_and_class_images_without_loading_weights(tmp_path, no_weights):
    p = plan(config(tmp_path, **{"train.batch_size": 2, "train.gradient_accumulation_steps": 2}), device_type="cpu")
    assert p.instance_images == 5 and p.images_per_step == 4 and p.epochs == pytest.approx(50 * 4 / 5)
    assert p.class_images == 100 and p.class_images_to_generate == 100  # an empty cache
    assert p.resolution == 64 and set(p.memory.phases) == {"loading", "class images", "caching", "training", "validation"}
    text = "\n".join(p.lines())
    assert "steps: 50" in text and "epochs: 40.0" in text and "class images: 100 (100 to generate)" in text
    assert "estimated peak" in text


def test_plan_with_a_class_folder_counts_its_images(tmp_path, no_weights):
    import shutil

    classes = tmp_path / "classes"
    classes.mkdir()
    for image in sorted(INSTANCES.glob("*.png"))[:3]:
        shutil.copy(image, classes / image.name)
    p = plan(config(tmp_path, **{"prior.class_dir": str(classes)}), device_type="cpu")
    assert p.class_images == 3 and "class images" not in p.memory.phases  # nothing is generated


def test_meta_models_have_the_real_parameter_counts(tiny_sd):
    models = read_model_configs("builtin:tiny-sd")
    assert sum(p.numel() for p in meta_unet(models.unet).parameters()) == sum(p.numel() for p in tiny_sd.unet.parameters())
    assert sum(p.numel() for p in meta_unet(SD15_UNET).parameters()) == 859_520_964  # SD 1.5's UNet, as published


def test_simulated_step_matches_the_tensors_of_a_real_cpu_step(tiny_sd):
    """The meta-device step (flash-attention stand-in included) against live tensor bytes of a real step."""
    import copy

    from dreamlora.lora import add_lora_adapters
    from dreamlora.memory import CACHE_BATCH  # noqa: F401  (the cache batch the estimate assumes)

    models = read_model_configs("builtin:tiny-sd")
    settings = MemorySettings.from_config(config(Path("/tmp")), device_type="cpu", resolution=64)
    simulated = estimate_memory(models, settings).training["activations + gradients"]
    unet = copy.deepcopy(tiny_sd.unet)
    add_lora_adapters(unet, [], rank=4, alpha=4.0, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                      train_text_encoder=False, text_targets=[])
    unet.train()
    live = LiveBytes()
    with live:
        x, noise = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
        pred = unet(x, torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 77, 32)).sample
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
    assert simulated == pytest.approx(live.peak, rel=0.15)


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_memory_savers_lower_the_estimate_and_bigger_batches_raise_it(tmp_path):
    models = read_model_configs("builtin:tiny-sd")

    def training(**overrides):
        c = config(tmp_path, **overrides)
        return estimate_memory(models, MemorySettings.from_config(c, device_type="cuda", resolution=64)).training

    base = training()
    assert training(**{"train.gradient_checkpointing": True})["activations + gradients"] < base["activations + gradients"]
    assert training(**{"train.mixed_precision": "bf16"})["frozen UNet"] == base["frozen UNet"] // 2
    assert training(**{"train.batch_size": 2})["activations + gradients"] > base["activations + gradients"]
    with_text = training(**{"lora.train_text_encoder": True})
    assert with_text["text encoders"] > 0 and base["text encoders"] == 0  # frozen encoders leave the GPU
    # bitsandbytes keeps tensors under 4096 elements in fp32: rank-4 LoRA on the tiny model saves nothing.
    assert training(**{"train.optimizer": "adamw8bit"})["optimizer states"] == base["optimizer states"]
    assert training(**{"train.optimizer": "adamw8bit", "lora.rank": 128})["optimizer states"] < \
        training(**{"lora.rank": 128})["optimizer states"]


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_budget_turns_savers_on_until_the_estimate_fits(tmp_path, no_weights):
    loose = plan(config(tmp_path, **{"train.batch_size": 4, "lora.train_text_encoder": True}), device_type="cuda")
    budget = round(loose.memory.needs() - 0.01, 3)
    p = plan(config(tmp_path, **{"train.batch_size": 4, "lora.train_text_encoder": True,
                                 "train.memory_budget": budget}), device_type="cuda")
    assert p.fits and p.changes and p.memory.needs() <= budget
    assert "train.mixed_precision (flag --mixed-precision) fp16" in p.changes[0]  # the cheapest saver first
    assert p.config.train.mixed_precision == "fp16"
    assert "fits" in p.lines()[-1]


def test_the_last_saver_turns_the_token_embedding_off_with_the_text_encoder(tmp_path, monkeypatch):
    """The token's embedding is learnt inside the trained text encoder: the ladder cannot keep one without the other."""
    import importlib

    plan_module = importlib.import_module("dreamlora.memory.plan")  # the package's `plan` is the function

    class Estimate:  # 2 GiB with a trained text encoder, 1 GiB without; no other saver changes anything
        def __init__(self, c):
            self.peak = (2 if c.lora.train_text_encoder else 1) * GIB

        def needs(self):
            return self.peak / GIB

    monkeypatch.setattr(plan_module, "estimate_memory", lambda models, c: Estimate(c))
    monkeypatch.setattr(plan_module, "detect_family", lambda models: SimpleNamespace(cached_text_encoder=None))
    start = config(tmp_path, **{"lora.train_text_encoder": True, "lora.train_token_embedding": True,
                                "train.gradient_checkpointing": True})
    fitted, changes, _ = plan_module.fit_budget(start, None, lambda c: c, 1.5, "cpu")
    assert not fitted.lora.train_text_encoder and not fitted.lora.train_token_embedding
    assert changes == ["lora.train_text_encoder (flag --train-text-encoder) and lora.train_token_embedding "
                       "(flag --train-token-embedding) off (estimate 1.00 GiB)"]


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_a_budget_nothing_fits_is_one_error_naming_the_flag(tmp_path, no_weights):
    with pytest.raises(ConfigError, match=r"--memory-budget.*too small.*Lower --resolution"):
        plan(config(tmp_path, **{"train.memory_budget": 0.5}), device_type="cuda")


def test_budget_and_compile_are_validated_config_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"train.memory_budget \(flag --memory-budget\) must be > 0"):
        config(tmp_path, **{"train.memory_budget": 0})
    assert config(tmp_path, **{"train.compile": True}).train.compile is True


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, no_weights):
    out = tmp_path / "ball.safetensors"
    result = CliRunner().invoke(app, ["train", str(INSTANCES), "--class-word", "ball", "--out", str(out),
                                      "--steps", "20", "--dry-run"])
    assert result.exit_code == 0, result.output
    for text in ("steps: 20", "epochs: 4.0", "class images: 50", "estimated peak"):  # the default toy's 50
        assert text in result.output
    assert not out.exists() and not (tmp_path / "ball-run").exists()


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_dry_run_with_an_impossible_budget_is_one_line(tmp_path, no_weights):
    result = CliRunner().invoke(app, ["train", str(INSTANCES), "--class-word", "ball", "--out",
                                      str(tmp_path / "o.safetensors"), "--dry-run", "--memory-budget", "0.2"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--memory-budget" in lines[0]


def test_encoders_leave_the_accelerator_after_caching_and_come_back_for_validation():
    from dreamlora.training import encoders_on, offload_encoders

    class Module:
        def __init__(self):
            self.device = torch.device("cuda")

        def to(self, device):
            self.device = torch.device(device)
            return self

    base = SimpleNamespace(vae=Module(), text_encoders=[Module()], family=SimpleNamespace(cached_text_encoder=None))
    c = SimpleNamespace(lora=SimpleNamespace(train_text_encoder=False), data=SimpleNamespace(shuffle_tags=False))
    offload_encoders(base, c, torch.device("cuda"))
    assert base.vae.device.type == "cpu" and base.text_encoders[0].device.type == "cpu"
    with encoders_on(base, torch.device("cuda")):
        assert base.vae.device.type == "cuda" and base.text_encoders[0].device.type == "cuda"
    assert base.vae.device.type == "cpu" and base.text_encoders[0].device.type == "cpu"
    trained = SimpleNamespace(vae=Module(), text_encoders=[Module()],
                              family=SimpleNamespace(adapted_text_encoders=None))
    offload_encoders(trained, SimpleNamespace(lora=SimpleNamespace(train_text_encoder=True), data=c.data),
                     torch.device("cuda"))
    assert trained.text_encoders[0].device.type == "cuda"  # a trained encoder stays
    shuffled = SimpleNamespace(vae=Module(), text_encoders=[Module()])
    offload_encoders(shuffled, SimpleNamespace(lora=c.lora, data=SimpleNamespace(shuffle_tags=True)),
                     torch.device("cuda"))
    assert shuffled.text_encoders[0].device.type == "cuda"  # shuffled tags are encoded every step
    # Flux: CLIP-L trains, T5 (never adapted, its states cached) leaves with the VAE.
    flux = SimpleNamespace(vae=Module(), text_encoders=[Module(), Module()],
                           family=SimpleNamespace(adapted_text_encoders=1))
    offload_encoders(flux, SimpleNamespace(lora=SimpleNamespace(train_text_encoder=True), data=c.data),
                     torch.device("cuda"))
    assert [te.device.type for te in flux.text_encoders] == ["cuda", "cpu"]
    # T5 encoded the run's prompts before the transformer came (training.encode_cached_prompts): it stays on the CPU
    # through validation grids, whose prompts come from its cache.
    flux.family.cached_text_encoder = 1
    flux.text_encoders[0].device = torch.device("cpu")
    with encoders_on(flux, torch.device("cuda")):
        assert [te.device.type for te in flux.text_encoders] == ["cuda", "cpu"] and flux.vae.device.type == "cuda"
    cpu = SimpleNamespace(vae=Module(), text_encoders=[])
    cpu.vae.device = torch.device("cpu")
    offload_encoders(cpu, c, torch.device("cpu"))  # nothing to do on the CPU
    assert cpu.vae.device.type == "cpu"


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_estimate_in_gib_is_sane_for_sd15_fp16():
    from dreamlora.memory import ModelConfigs

    vae = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2}
    text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "vocab_size": 49408, "max_position_embeddings": 77}
    models = ModelConfigs(SD15_UNET, vae, (text,), "sd15")
    c = load_config(None, {"model.name": "builtin:tiny-sd", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
                           "output.path": "/tmp/x.safetensors", "train.mixed_precision": "fp16"})
    e = estimate_memory(models, MemorySettings.from_config(c, device_type="cuda", resolution=512))
    assert e.training["frozen UNet"] == 859_520_964 * 2
    assert 2.0 * GIB < e.phases["training"] < 6.0 * GIB  # fp16 SD 1.5 LoRA at 512 px, batch 1 + 1


def test_the_plan_finds_the_class_image_cache_as_training_names_it(tiny_sd):
    from dreamlora.identity import model_identity

    identity = model_identity("builtin:tiny-sd")
    assert (identity.name, identity.fingerprint) == (tiny_sd.identity, tiny_sd.fingerprint)


def test_models_attend_with_fused_sdpa_as_the_estimate_assumes(tiny_sd):
    """The plan models attention as fused SDPA (no L x L matrix kept); the loaded modules must use it."""
    assert {type(p).__name__ for p in tiny_sd.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in tiny_sd.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    assert tiny_sd.text_encoders[0].config._attn_implementation == "sdpa"
