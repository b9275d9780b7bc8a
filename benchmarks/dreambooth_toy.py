"""DreamBooth on builtin:toy with the default settings, scored by `dreamlora eval`: the README's table.

For each training seed, the sample subject (sample_instances/polkaball) is trained twice, with prior
preservation (the default) and with --no-prior, and each file is evaluated with the eval defaults
(8 seeds x 4 recontextualisation backgrounds, plus "a photo of a ball"). The base model's figures
come with every evaluation. Class images are generated once into a fresh cache folder, so the first
run's time includes them.

    python benchmarks/dreambooth_toy.py                 # seeds 0,1,2
    python benchmarks/dreambooth_toy.py --seeds 0 --out runs/toy-db
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"
METRICS = ("subject_detected", "subject_similarity", "background_match", "class_shows_subject", "class_shift")


def run(seed: int, prior: bool, out: Path) -> dict:
    from dreamlora import load_config, train
    from dreamlora.evaluation import evaluate

    tag = f"seed{seed}-{'prior' if prior else 'noprior'}"
    config = load_config(None, {"data.instance_dir": str(INSTANCES), "data.class_word": "ball",
                                "output.path": str(out / f"{tag}.safetensors"), "output.overwrite": True,
                                "train.seed": seed, "prior.enabled": prior})
    started = time.time()
    result = train(config)
    seconds = time.time() - started
    report = evaluate(result.output, instance_dir=INSTANCES, grid=out / f"{tag}-eval.png")
    return {"seed": seed, "prior": prior, "train_s": seconds, "lora": report.lora.__dict__,
            "base": report.base.__dict__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dreambooth-toy-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DREAMLORA_CACHE", str(out / "cache"))  # fresh: class images are part of the time
    rows = [run(int(s), prior, out) for s in args.seeds.split(",") for prior in (True, False)]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    header = f"{'run':<16}{'train s':>8}" + "".join(f"{m:>21}" for m in METRICS)
    print(header)
    for r in rows:
        print(f"{'seed %d %s' % (r['seed'], 'prior' if r['prior'] else 'no prior'):<16}{r['train_s']:>8.0f}"
              + "".join(f"{_cell(r['lora'][m]):>21}" for m in METRICS))
    for prior in (True, False):
        chosen = [r for r in rows if r["prior"] == prior]
        print(f"{'mean ' + ('prior' if prior else 'no prior'):<16}{statistics.mean(r['train_s'] for r in chosen):>8.0f}"
              + "".join(f"{_cell(statistics.mean(r['lora'][m] for r in chosen)):>21}" for m in METRICS))
    base = rows[0]["base"]
    print(f"{'base model':<16}{'':>8}" + "".join(f"{_cell(base[m]):>21}" for m in METRICS))
    print(f"files and eval grids: {out}")


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
