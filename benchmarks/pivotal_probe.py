"""An experiment, not a feature: does learning the token's own embedding free the subject from the training phrase?

`phrasing_probe.py` shows the README main job's subject bound to "a photo of sks ball": one word more, less or
moved and it is gone. Pivotal tuning (textual inversion of the token alongside the LoRA, as diffusers' "advanced"
DreamBooth script and kohya's embedding bundles do) makes the token itself carry the subject. dreamlora has no such
setting yet; this script gets one for a single run by wrapping two functions of dreamlora.training:

- after the adapters are added, the text encoder's input-embedding matrix is made trainable with a gradient mask
  that keeps every row but the token's at exactly its value (checked after training);
- the optimizer gets that matrix as its own group (`--embedding-lr`, no weight decay).

Then it trains the README's main job (everything else the recipe's) and runs the phrasing probe with the learned
row put into the text encoder. The LoRA file it writes has no embedding in it: the row lives only in this process.

    python benchmarks/pivotal_probe.py --embedding-lr 1e-3 [--seed 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from phrasing_probe import INSTANCES, probe, token_id


def train_with_token_embedding(output: Path, embedding_lr: float, seed: int = 0) -> tuple[torch.Tensor, float, bool]:
    """The main job with the token's embedding learnt too; returns (the row, how far it moved, other rows intact)."""
    import dreamlora.training as training
    from diffusers.optimization import get_scheduler

    from dreamlora import load_config, train

    state = {}
    add_adapters, make_optimizer = training.add_adapters, training.make_optimizer

    def add_adapters_and_token(base, config, device):
        add_adapters(base, config, device)
        weight = base.text_encoders[0].get_input_embeddings().weight
        row = token_id(base.tokenizers[0])
        mask = torch.zeros(weight.shape[0], 1)
        mask[row] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
        state.update(weight=weight, row=row, before=weight.detach().clone())

    def optimizer_with_token(base, config):
        optimizer, _ = make_optimizer(base, config)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not state["weight"]]
            group.pop("initial_lr", None)
        optimizer.add_param_group({"params": [state["weight"]], "lr": embedding_lr, "weight_decay": 0.0})
        t = config.train
        return optimizer, get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                        num_training_steps=t.steps)

    training.add_adapters, training.make_optimizer = add_adapters_and_token, optimizer_with_token
    try:
        config = load_config(INSTANCES / "dreamlora.toml", {"output.path": str(output), "validation.final": False,
                                                           "validation.eval_every": 0, "train.seed": seed})
        train(config)
    finally:
        training.add_adapters, training.make_optimizer = add_adapters, make_optimizer
    after, before, row = state["weight"].detach(), state["before"], state["row"]
    others_intact = torch.equal(torch.cat([after[:row], after[row + 1:]]), torch.cat([before[:row], before[row + 1:]]))
    return after[row].clone(), float((after[row] - before[row]).norm() / before[row].norm()), others_intact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-lr", type=float, default=1e-3, help="learning rate of the token's embedding")
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "sks.safetensors"
        row, moved, others_intact = train_with_token_embedding(lora, args.embedding_lr, args.seed)
        figures = probe(lora, token_embedding=row)
    print(f"seed {args.seed}, token embedding learnt at lr {args.embedding_lr:g}: moved by {moved:.2f} of its norm; "
          f"every other row unchanged: {others_intact}")
    print("subject present on the report set's backgrounds and seeds:")
    for name, value in figures.items():
        print(f"  {value:5.2f}  {name}")


if __name__ == "__main__":
    main()
