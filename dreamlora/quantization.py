"""The frozen denoiser stored in 8 or 4 bits through bitsandbytes, under fp32 LoRA adapters: QLoRA.

Every `nn.Linear` of the denoiser becomes a bitsandbytes layer, one at a time on its way to the device, so the
accelerator never holds more than one layer in the loading dtype (FLUX.1-dev's transformer is 23.8 GB in bf16;
in NF4 it is about 6 GB). Convolutions, norms and embeddings stay in the frozen dtype: they are a few percent
of a transformer's weights.

- int8: LLM.int8() weights (bnb.nn.Linear8bitLt without fp16 copies): one byte a weight and an fp32 scale a row.
- nf4: 4-bit NormalFloat with double-quantized block scales (QLoRA's setting): half a byte a weight and
  about 0.016 bytes of scales; the layer computes in the frozen dtype.

peft reads the model's `is_loaded_in_8bit` / `is_loaded_in_4bit` to wrap these layers with its bitsandbytes LoRA
layers, which cast the LoRA path to the adapters' dtype and back. The LoRA file is the same as over a
full-precision base: its tensors are the adapters'.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import TrainingError

Quantization = Literal["none", "int8", "nf4"]
NF4_BLOCK = 64  # weights a 4-bit block scale covers (bitsandbytes' default blocksize)
NESTED_BLOCK = 256  # block scales a second-level scale covers (double quantization)


def quantized_weight_bytes(out_features: int, in_features: int, kind: Quantization) -> int:
    """Bytes a quantized Linear weight of this shape occupies on the device (the memory plan's figure)."""
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features  # int8 weights and a fp32 absmax a row
    if kind == "nf4":
        blocks = -(-n // NF4_BLOCK)
        # packed 4-bit pairs, one int8 scale a block, fp32 scales of those a nested block, and the layer's own
        # tables: the 16 NF4 values, the 256 values of the nested 8-bit code and the scales' offset (fp32)
        return -(-n // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * (16 + 256 + 1)
    raise ValueError(f"not a quantization: {kind!r}")


def quantize_denoiser(denoiser: torch.nn.Module, kind: Quantization, device: torch.device,
                      compute_dtype: torch.dtype) -> int:
    """Replace each nn.Linear of `denoiser` by its bitsandbytes layer of `kind`, quantized onto `device`.

    Returns the number of layers replaced. The rest of the module is left where it is (the caller moves it).

    Raises:
        TrainingError: bitsandbytes is missing or cannot run on this platform.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise TrainingError(f"--base-quantization {kind} needs a working bitsandbytes ({exc}). Install bitsandbytes "
                            "for your platform or pass --base-quantization none.") from exc
    linears = [(name, module) for name, module in denoiser.named_modules() if type(module) is torch.nn.Linear]
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        setattr(parent, attribute, _quantized_linear(bnb, linear, kind, device, compute_dtype))
    # peft picks its bitsandbytes LoRA layers from these flags (transformers' and diffusers' quantized models set them).
    denoiser.is_loaded_in_8bit = kind == "int8"
    denoiser.is_loaded_in_4bit = kind == "nf4"
    return len(linears)


def _quantized_linear(bnb, linear: torch.nn.Linear, kind: Quantization, device: torch.device,
                      compute_dtype: torch.dtype) -> torch.nn.Module:
    weight = linear.weight.data.to(compute_dtype)
    has_bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)
        # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a layer's weight for a faster kernel the first time
        # it runs in eval mode without grad. A run samples (class images, validation grids, --eval-every) and trains
        # in one process: after the repack the layer computes in bf16 (the same input gives other outputs than in
        # training), the next training step fails inside bitsandbytes, and a layer narrower than the repack's
        # blocks (in_features < 64) fails at once. One kernel for both keeps every machine's numbers the same.
        layer.support_avx512bf16_for_cpu = False
    elif kind == "int8":
        # threshold 0: no outlier columns kept in half precision, so memory is what the plan counts
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"not a quantization: {kind!r}")
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes a weight when it first moves to a device
