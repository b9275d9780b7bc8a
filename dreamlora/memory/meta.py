"""Modules on PyTorch's meta device (shapes, no storage), and a dispatch mode that counts the bytes of live tensors.

Two things of the accelerator are modelled rather than run, because meta tensors cannot run them:
- attention is flash/memory-efficient SDPA (what PyTorch uses on CUDA and on the CPU): it keeps
  q, k, v, the output and a log-sum-exp per row for backward, never the (L x L) attention matrix;
- autocast (mixed precision fp16/bf16) casts matmul/conv inputs to half and, on CUDA, runs
  group_norm/layer_norm/softmax in fp32, so their saved inputs and outputs are fp32.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.overrides
import torch.utils._python_dispatch
import torch.utils._pytree


def meta_unet(config: dict):
    """The denoiser of `config` with its shapes and no storage (meta device): a UNet2DConditionModel, or the
    transformer its `_class_name` names (SD3Transformer2DModel, FluxTransformer2DModel)."""
    import diffusers

    name = config.get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, name) if name in ("SD3Transformer2DModel", "FluxTransformer2DModel") else \
        diffusers.UNet2DConditionModel
    with torch.device("meta"):
        return cls.from_config(_plain(config))


def meta_vae(config: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(_plain(config))


def meta_text_encoder(config: dict):
    """A CLIP text encoder (with projection when the config says so: SDXL's second one), or T5's encoder (SD3, Flux),
    on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "dtype",
                                                                                     "torch_dtype")}
    with torch.device("meta"):
        if architecture.startswith("T5") or config.get("model_type") == "t5":
            return T5EncoderModel(T5Config(**kwargs))
        cls = CLIPTextModelWithProjection if architecture == "CLIPTextModelWithProjection" else CLIPTextModel
        return cls(CLIPTextConfig(**kwargs))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(dtype) without diffusers' warning about modules it would keep in fp32 (there are none here)."""
    return torch.nn.Module.to(module, dtype)


def _plain(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def parameter_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None, trainable: bool | None = None) -> int:
    """Bytes of `module`'s parameters (in `dtype` if given); trainable=True/False counts only those."""
    total = 0
    for p in module.parameters():
        if trainable is None or p.requires_grad == trainable:
            total += p.numel() * (dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size())
    return total


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the storage bytes of every tensor created while active, minus those freed since: `peak`.

    An op's output that shares storage with one of its inputs (a view such as the `weight.t()` that F.linear
    decomposes into, an in-place result, a detach) allocates nothing: it is never counted, also when the
    input was made before the mode began (the model's weights, which are added from their shapes instead).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # The op's schema says which of its results alias an input (views, in-place and out= results, detach).
        returns = func._schema.returns
        results = out if isinstance(out, (tuple, list)) and len(returns) > 1 else [out]
        for i, result in enumerate(results):
            aliases = i < len(returns) and returns[i].alias_info is not None
            if not aliases:
                for t in torch.utils._pytree.tree_leaves(result):
                    if isinstance(t, torch.Tensor):
                        self._track(t)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


class _FlashAttention(torch.autograd.Function):
    """Shape-only stand-in for fused SDPA: saves q, k, v, out and a log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _AcceleratorOps(torch.overrides.TorchFunctionMode):
    """Runs SDPA as the fused kernel and, for mixed precision, casts as autocast on `device_type` would."""

    def __init__(self, device_type: str, half: torch.dtype | None):
        super().__init__()
        F = torch.nn.functional
        self.half = half
        self.to_half = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.bmm,
                        torch.baddbmm, torch.mm, torch.addmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
                        torch.Tensor.bmm}
        # CUDA autocast runs normalisations and softmax in fp32; CPU autocast keeps them in the half dtype.
        self.to_float = {F.mse_loss} | ({F.group_norm, F.layer_norm, F.softmax, torch.softmax,
                                         torch.Tensor.softmax} if device_type == "cuda" else set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            # diffusers' transformers (SD3, Flux) name them: query=, key=, value=
            qkv = list(args[:3]) + [kwargs.get(name) for name in ("query", "key", "value")[len(args[:3]):]]
            q, k, v = (self._cast(t, self.half) for t in qkv)
            return _FlashAttention.apply(q, k, v)
        if self.half is not None and func in self.to_half:
            args, kwargs = self._cast_all(args, kwargs, self.half)
        elif self.half is not None and func in self.to_float:
            args, kwargs = self._cast_all(args, kwargs, torch.float32)
        return func(*args, **kwargs)

    @staticmethod
    def _cast(t, dtype):
        if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    def _cast_all(self, args, kwargs, dtype):
        return (tuple(self._cast(a, dtype) for a in args), {k: self._cast(v, dtype) for k, v in kwargs.items()})


@contextlib.contextmanager
def _simulate(device_type: str, half: torch.dtype | None):
    """Count live bytes (yields the LiveBytes) while ops run as on the accelerator."""
    counter = LiveBytes()
    with _AcceleratorOps(device_type, half), counter:
        yield counter
