"""Is the subject bound to its token or to the training phrase? Subject present per phrasing, on the report set.

A DreamBooth file of the sample subject on builtin:toy is rendered with several phrasings of the same request,
each on the report set's backgrounds and seeds (dreamlora.evaluation.PROMPT_SETS["report"]), and the toy oracle
counts the renders that show the subject (a red ball with white dots, as `dreamlora eval` counts it). The
training phrase ("a photo of sks ball") against one-word changes of it says how far the subject travels with the
token into other contexts.

    python benchmarks/phrasing_probe.py [--seed 1]           # trains the main job without the token embedding (3 min)
    python benchmarks/phrasing_probe.py --lora polkaball.safetensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dreamlora, not another install
INSTANCES = ROOT / "sample_instances" / "polkaball"
PHRASINGS = (  # (name, template); {bg_article} {bg} as in the evaluation's prompt sets
    ("the training phrase + background", "a photo of sks ball on {bg_article} {bg} background"),
    ("report set, phrasing 1", "a sks ball on {bg_article} {bg} background"),
    ("report set, phrasing 2", "sks ball on {bg_article} {bg} background"),
    ("one more word: 'a photo of a sks ball'", "a photo of a sks ball on {bg_article} {bg} background"),
    ("one word less: 'photo of sks ball'", "photo of sks ball on {bg_article} {bg} background"),
)
CLASS_TEMPLATE = "a photo of a ball on {bg_article} {bg} background"  # bleed: should stay near 0


def probe(lora: Path) -> dict[str, float]:
    """Subject present (fraction of renders) per phrasing, report-set backgrounds x seeds, 20 DPM-Solver++ steps.

    A learnt token embedding bundled in the file (--train-token-embedding) is loaded with it.
    """
    from dreamlora.evaluation import PROMPT_SETS
    from dreamlora.lora import read_lora_file
    from dreamlora.models import load_base_model
    from dreamlora.sampling import attach_lora, render_images
    from dreamlora.toyworld.oracle import load_oracle

    report = PROMPT_SETS["report"]
    base = load_base_model("builtin:toy")
    pipe = base.pipeline("dpm++2m")
    attach_lora(pipe, base, lora, read_lora_file(lora).metadata, "probe")
    pipe.set_adapters(["probe"], adapter_weights=[1.0])
    oracle = load_oracle()
    figures = {}
    for name, template in PHRASINGS + (("the class prompt 'a photo of a ball on …'", CLASS_TEMPLATE),):
        images = []
        for bg in report.backgrounds:
            prompt = template.format(bg=bg, bg_article="an" if bg[0] in "aeiou" else "a")
            images += render_images(pipe, prompt, list(report.seeds), steps=20, guidance=7.5, resolution=64)
        figures[name] = sum(oracle.read(images).subject_present("ball", "red")) / len(images)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the training seed (without --lora)")
    parser.add_argument("--lora", type=Path, help="a DreamBooth file of the sample subject on builtin:toy "
                                                  "(default: train the README's main job into a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lora = args.lora
        if lora is None:
            from dreamlora import load_config, train

            config = load_config(INSTANCES / "dreamlora.toml", {"output.path": str(Path(tmp) / "sks.safetensors"),
                                                               "validation.final": False, "validation.eval_every": 0,
                                                               "train.seed": args.seed,
                                                               # the job before builtin:toy learnt the token's
                                                               # embedding (pivotal_probe.py: with it)
                                                               "lora.train_token_embedding": False})
            lora = train(config).output
        figures = probe(lora)
    print(f"subject present on the report set's backgrounds and seeds ({lora.name}):")
    for name, value in figures.items():
        print(f"  {value:5.2f}  {name}")


if __name__ == "__main__":
    main()
