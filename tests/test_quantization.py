"""--base-quantization: the frozen denoiser's linear layers in int8 or NF4 (bitsandbytes) under fp32 adapters (QLoRA),
on builtin:tiny-flux on the CPU: the layers compute what the full-precision ones do (within the format's error),
only the adapters train, the memory plan counts the bytes bitsandbytes really keeps, class images are cached apart,
and the trained file is an ordinary LoRA that FluxPipeline loads over the unquantized model."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreamlora import train
from dreamlora.identity import model_identity
from dreamlora.lora import add_lora_adapters, trainable_parameters
from dreamlora.memory.estimate import MemorySettings, denoiser_bytes
from dreamlora.models import load_base_model
from dreamlora.priors import training_prior_spec
from dreamlora.quantization import quantize_denoiser, quantized_weight_bytes

from test_flux import flux_config, tiny_flux_renderer

bnb = pytest.importorskip("bitsandbytes")
KINDS = ("int8", "nf4")


def quantized_tiny_flux(kind: str):
    base = load_base_model("builtin:tiny-flux")
    inputs = flux_inputs(base)
    with torch.no_grad():
        reference = base.family.predict(base.unet, *inputs)
    replaced = quantize_denoiser(base.unet, kind, torch.device("cpu"), torch.float32)
    base.unet.requires_grad_(False)
    return base, inputs, reference, replaced


def flux_inputs(base):
    family, generator = base.family, torch.Generator().manual_seed(0)
    embeddings = family.encode_prompts(base.tokenizers, base.text_encoders, ["a photo of sks ball", "a photo of ball"])
    kwargs = {k: v.detach() for k, v in family.denoiser_kwargs(embeddings, {}).items()}
    return torch.randn(2, 16, 8, 8, generator=generator), torch.tensor([700.0, 250.0]), kwargs


def device_bytes(module: torch.nn.Module) -> int:
    """What a module really keeps: its tensors, and bitsandbytes' quantization state beside the packed weights."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for layer in module.modules():
        state = getattr(layer.weight, "quant_state", None) if hasattr(layer, "weight") else None
        if state is not None:  # NF4: block scales, the code table, and the nested scales' state
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset,
                                                                 state.state2.absmax, state.state2.code))
        scales = getattr(getattr(layer, "weight", None), "SCB", None)
        if scales is not None:  # int8: a scale a row
            total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize("kind,bound", [("int8", 0.02), ("nf4", 0.25)])
def test_quantized_layers_compute_what_the_full_precision_ones_do(kind, bound):
    base, inputs, reference, replaced = quantized_tiny_flux(kind)
    linears = [m for m in base.unet.modules() if type(m) is torch.nn.Linear]
    assert replaced == 30 and linears == []  # every linear layer of the transformer, none left behind
    with torch.no_grad():
        quantized = base.family.predict(base.unet, *inputs)
    error = float((quantized - reference).norm() / reference.norm())
    # measured: int8 0.006, nf4 0.13 (random weights, the worst case for NF4's normal-shaped code)
    assert 0 < error < bound


@pytest.mark.parametrize("kind", KINDS)
def test_the_plan_counts_the_bytes_bitsandbytes_keeps(kind):
    full = load_base_model("builtin:tiny-flux").unet
    config = flux_config(Path("unused"), **{"train.base_quantization": kind})
    settings = MemorySettings.from_config(config, device_type="cpu", resolution=64)
    estimated = denoiser_bytes(full, settings)
    base, *_ = quantized_tiny_flux(kind)
    assert estimated == device_bytes(base.unet)
    assert estimated < denoiser_bytes(full, dataclasses.replace(settings, base_quantization="none"))


def test_weight_bytes_per_format():
    assert quantized_weight_bytes(3072, 3072, "int8") == 3072 * 3072 + 4 * 3072
    # 4.5 MiB of packed nibbles, 147456 block scales, 576 nested fp32 scales, the layer's 273 fp32 table entries
    assert quantized_weight_bytes(3072, 3072, "nf4") == 4718592 + 147456 + 4 * 576 + 4 * 273


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_adapters_train_over_a_quantized_base(kind):
    base, (noisy, timesteps, kwargs), _, _ = quantized_tiny_flux(kind)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        add_lora_adapters(base.unet, [], rank=4, alpha=4.0, dropout=0.0, unet_targets=list(base.family.default_targets),
                          train_text_encoder=False, text_targets=[])
    to_q = base.unet.transformer_blocks[0].attn.to_q
    assert type(to_q).__module__ == "peft.tuners.lora.bnb"  # peft's bitsandbytes LoRA layer, not the plain one
    frozen = {name: p.detach().clone() for name, p in base.unet.named_parameters() if not p.requires_grad}
    adapters = trainable_parameters(base.unet)
    assert adapters and all("lora_" in name for name, p in base.unet.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in adapters]
    optimizer = torch.optim.AdamW(adapters, lr=1e-2)
    for _ in range(2):  # B starts at zero: the second step moves A too
        base.family.predict(base.unet, noisy, timesteps, kwargs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(adapters, before))
    assert all(torch.equal(p, frozen[name]) for name, p in base.unet.named_parameters() if name in frozen)


def test_sampling_then_training_over_an_nf4_base_computes_the_same_and_still_trains():
    # A run samples class images and grids between training steps in one process. On CPUs with AVX512-BF16,
    # bitsandbytes 0.50 repacked NF4 weights on the first eval pass: tiny-flux's 32-wide layers failed there, and
    # wider ones computed in bf16 and then broke the next backward (dreamlora/quantization.py turns that off).
    base, (noisy, timesteps, kwargs), _, _ = quantized_tiny_flux("nf4")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        add_lora_adapters(base.unet, [], rank=4, alpha=4.0, dropout=0.0, unet_targets=list(base.family.default_targets),
                          train_text_encoder=False, text_targets=[])
    base.unet.eval()
    with torch.no_grad():
        sampled = base.family.predict(base.unet, noisy, timesteps, kwargs)
    base.unet.train()
    trained = base.family.predict(base.unet, noisy, timesteps, kwargs)
    assert torch.equal(sampled, trained)
    trained.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for name, p in base.unet.named_parameters() if "lora_B" in name)  # A: zero while B is


def test_quantized_class_images_are_cached_apart():
    config = flux_config(Path("unused"))
    identity = model_identity("builtin:tiny-flux")
    plain = training_prior_spec(config, identity, 64, "cpu")
    nf4 = training_prior_spec(dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                     base_quantization="nf4")),
                              identity, 64, "cpu")
    assert plain.dtype == "fp32" and nf4.dtype == "fp32+nf4" and plain.key() != nf4.key()


@pytest.mark.slow  # trains tiny-flux (about 5 s on 2 cores)
def test_a_qlora_run_writes_a_file_flux_loads_over_the_unquantized_model(tmp_path):
    def shapes(path):
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    result = train(flux_config(tmp_path, name="qlora", **{"train.base_quantization": "nf4"}))
    plain_run = train(flux_config(tmp_path, name="plain"))
    # the same adapters, key for key and shape for shape, as over the full-precision base: nothing of bitsandbytes'
    assert shapes(result.output) == shapes(plain_run.output)
    assert {k.split(".")[0] for k in shapes(result.output)} == {"transformer", "text_encoder"}
    pipe, render = tiny_flux_renderer()
    plain = render()
    pipe.load_lora_weights(str(result.output), adapter_name="subject")
    assert np.abs(render() - plain).max() > 1e-3


# --- T5 off the accelerator --------------------------------------------------------------------------------------


def test_t5_encodes_every_prompt_of_the_run_once_before_training(tmp_path):
    from dreamlora.data import training_set
    from dreamlora.preflight import preflight_training_data
    from dreamlora.training import encode_cached_prompts, training_prompts

    config = flux_config(tmp_path, **{"prior.negative_prompt": "blurry"})
    images = preflight_training_data(config.data, config.prior)
    images.finish(64, lambda event: None)
    instances = training_set(config.data, images.instance)
    base = load_base_model("builtin:tiny-flux")
    prompts = [*training_prompts(config, instances).values(), "", "blurry"]
    encode_cached_prompts(base, config, prompts, torch.device("cpu"))
    t5 = base.text_encoders[base.family.cached_text_encoder]
    assert {p for p, _ in base.family.t5.states} == set(prompts)  # captions, class, validation, negatives
    assert "a photo of sks ball" in prompts and "a photo of ball" in prompts
    assert t5.device.type == "cpu" and not any(p.requires_grad for p in t5.parameters())


@pytest.mark.slow  # five plans of tiny-flux (about 6 s on 2 cores)
def test_the_plan_keeps_t5_off_the_card_after_encoding_and_the_budget_moves_it_to_the_cpu(tmp_path):
    from dreamlora.memory import plan

    def planned(**values):
        return plan(flux_config(tmp_path, **{"train.mixed_precision": "bf16", **values}), device_type="cuda")

    on_card, on_cpu = planned(), planned(**{"train.t5_on_cpu": True})
    assert "prompt encoding" in on_card.memory.phases and "prompt encoding" not in on_cpu.memory.phases
    # after encoding, the phases are the same wherever T5 encoded: it is on the CPU from then on
    assert {k: v for k, v in on_card.memory.phases.items() if k != "prompt encoding"} == on_cpu.memory.phases
    nf4 = planned(**{"train.base_quantization": "nf4"})
    assert nf4.memory.training["frozen UNet"] < on_card.memory.training["frozen UNet"]
    assert nf4.memory.training["dequantized layer"] > 0 == on_card.memory.training["dequantized layer"]
    assert "frozen denoiser in nf4" in "\n".join(nf4.lines()) and "T5 on the CPU" in "\n".join(on_cpu.lines())
    # a budget between the two: the ladder's first change is T5 on the CPU
    assert on_card.memory.peak_phase == "prompt encoding"  # tiny-flux's T5 is its biggest part
    between = round((on_card.memory.needs() + on_cpu.memory.needs()) / 2, 4)
    fitted = planned(**{"train.memory_budget": between})
    assert fitted.config.train.t5_on_cpu and "--t5-on-cpu" in fitted.changes[0]


def test_a_half_precision_load_keeps_only_the_vae_in_fp32():
    """A bf16 run loads FLUX.1's transformer and T5 in bf16 (host memory: 24 + 9.5 GB, not twice that in fp32);
    the VAE encodes the caches in fp32."""
    base = load_base_model("builtin:tiny-flux", dtype=torch.bfloat16)
    assert base.unet.dtype == torch.bfloat16 and {t.dtype for t in base.text_encoders} == {torch.bfloat16}
    assert base.vae.dtype == torch.float32


def test_sampling_placement_encodes_the_prompts_with_t5_first_and_leaves_it_behind():
    from dreamlora.sampling import place_for_sampling, render_images

    base = load_base_model("builtin:tiny-flux")
    place_for_sampling(base, torch.device("cpu"), ["a photo of sks ball", ""])
    base.text_encoders[base.family.cached_text_encoder].to("meta")  # never used again
    images = render_images(base.pipeline(), "a photo of sks ball", [0], steps=1, guidance=3.5, resolution=64,
                           family=base.family)
    assert images[0].size == (64, 64)
