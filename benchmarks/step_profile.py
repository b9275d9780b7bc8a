"""Where a CPU training step's time goes: torch.profiler over the UNet step, grouped by kind of kernel.

The step is the loop body of dreamlora.training on the UNet alone (LoRA rank 4 on to_q/k/v/out through
dreamlora.lora, frozen weights fp32, AdamW on the adapters, batch 1 + 1 class row, cached latents
and embeddings as random tensors of their shapes). The diffusers reference script runs the same UNet
with the same attention processor (PyTorch's scaled_dot_product_attention), so a kernel's share here
bounds what any training loop around it can save.

    python benchmarks/step_profile.py                 # tiny and small, 3 timed steps each
    python benchmarks/step_profile.py --rows small --steps 2 --top 15
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

import torch  # noqa: E402

GROUPS = (  # first match wins: (group, substrings of aten op names)
    ("attention (SDPA, forward + backward)", ("scaled_dot_product",)),
    ("convolution", ("convolution",)),
    ("matmul (linear layers, LoRA)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("norms and activations", ("norm", "gelu", "silu", "softmax")),
)


def group_of(op: str) -> str:
    return next((g for g, keys in GROUPS if any(k in op for k in keys)), "everything else")


def build_step(model: str):
    from diffusers import UNet2DConditionModel
    from models import BENCH, model_configs

    from dreamlora.lora import add_lora_adapters, trainable_parameters

    torch.manual_seed(0)
    configs = model_configs(model)
    unet = UNet2DConditionModel(**configs.unet).requires_grad_(False)
    add_lora_adapters(unet, [], rank=4, alpha=4.0, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                      train_text_encoder=False, text_targets=[])
    params = trainable_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    latent = BENCH[model]["resolution"] // configs.vae_scale_factor
    latents = torch.randn(2, configs.unet.get("in_channels", 4), latent, latent)
    embeddings = torch.randn(2, 77, configs.unet["cross_attention_dim"])
    timesteps = torch.tensor([100, 700])

    def step() -> None:
        prediction = unet(latents, timesteps, embeddings).sample
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, latent


def profile_row(model: str, steps: int, top: int) -> tuple[dict, list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity, profile

    step, latent = build_step(model)
    step()  # warm-up: first-call allocations and oneDNN primitive creation
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_op = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(by_op.values())
    shares: dict[str, float] = defaultdict(float)
    for op, t in by_op.items():
        shares[group_of(op)] += t / total
    attention = shares[GROUPS[0][0]]
    row = {"model": model, "latent": f"{latent}x{latent}", "s_step": seconds, **{g: shares[g] for g, _ in GROUPS},
           "everything else": shares["everything else"], "without_attention": seconds * (1 - attention)}
    ops = sorted(((op, t / total) for op, t in by_op.items()), key=lambda x: -x[1])[:top]
    return row, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="tiny,small", help="benchmark models (tiny, small)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps before the profiled one")
    parser.add_argument("--top", type=int, default=8, help="ops listed a model")
    args = parser.parse_args()
    rows = []
    for model in args.rows.split(","):
        row, ops = profile_row(model, args.steps, args.top)
        rows.append(row)
        print(f"\n{model}: top ops by self CPU time")
        for op, share in ops:
            print(f"  {share:6.1%}  {op}")
    columns = [("model", "model"), ("latent", "latents"), ("s_step", "s/step")] + \
        [(g, g) for g, _ in GROUPS] + [("everything else", "everything else"),
                                       ("without_attention", "s/step if attention were free")]
    print()
    print_table([{k: (f"{v:.1%}" if isinstance(v, float) and k not in ("s_step", "without_attention") else v)
                  for k, v in r.items()} for r in rows], columns,
                title=f"Training step by kernel (CPU, fp32, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
