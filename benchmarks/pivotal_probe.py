"""Does learning the token's own embedding free the subject from the training phrase? The phrasing probe with it.

`phrasing_probe.py` shows the README main job's subject bound to "a photo of sks ball": one word more, less or
moved and it is gone. Pivotal tuning (`--train-token-embedding`: the token's input vectors learnt beside the LoRA,
as diffusers' "advanced" DreamBooth script and OneTrainer do) makes the token itself carry the subject. This script
trains the README's main job with it (every other setting the recipe's) and runs the same probe on the file, whose
bundled embedding `attach_lora` loads.

    python benchmarks/pivotal_probe.py --embedding-lr 1e-3 [--seed 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from phrasing_probe import INSTANCES, probe


def main() -> None:
    from safetensors import safe_open

    from dreamlora import load_config, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-lr", type=float, default=1e-3, help="learning rate of the token's embedding")
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(INSTANCES / "dreamlora.toml", {
            "output.path": str(Path(tmp) / "sks.safetensors"), "validation.final": False,
            "validation.eval_every": 0, "train.seed": args.seed, "lora.train_token_embedding": True,
            "lora.token_embedding_lr": args.embedding_lr})
        lora = train(config).output
        with safe_open(str(lora), "pt") as f:
            bundled = [k for k in f.keys() if k.startswith("bundle_emb.")]
        figures = probe(lora)
    print(f"seed {args.seed}, token embedding learnt at lr {args.embedding_lr:g} (in the file: {', '.join(bundled)})")
    print("subject present on the report set's backgrounds and seeds:")
    for name, value in figures.items():
        print(f"  {value:5.2f}  {name}")


if __name__ == "__main__":
    main()
