"""Rebuild builtin:toy and its oracle from nothing, and score the pair the way the shipped pair is scored.

    python -m dreamlora.toyworld.reproduce --out runs/toy-repro      # about an hour on a 2-core CPU
    python -m dreamlora.toyworld.reproduce --out runs/toy-dots --dotted-share 0.4   # the dotted world's pair

1. pretrain.py with its default settings into --out/pretrain (rerun: resumes where it stopped);
2. train_oracle.py with its default settings into --out/oracle;
3. base_model_accuracy on 128 random full captions: the new model read by the new oracle, next to
   the shipped model read by the shipped oracle, plus the held-out epsilon MSE and the oracle's own
   held-out accuracies, and whether each weights file is byte-identical to the shipped one.

Writes --out/REPRODUCE.md and --out/reproduce.json and prints the table. `--quick` shrinks every
stage to seconds: it checks the plumbing, not the quality. This is a script: it prints; the
library never imports it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
from pathlib import Path

from .openmp import restart_with_passive_openmp
from .world import DOTTED_WORLD_SHARE

SHIPPED_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors")

# --quick: every stage a few steps on a few hundred pictures (the VAE holds 256 out for its PSNR).
QUICK_PRETRAIN = ["--images", "320", "--generic-images", "32", "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2",
                  "--unet-batch", "4", "--unet-warmup", "1", "--checkpoint-every", "1", "--log-every", "1"]
DOTTED_OTHER_DOTS = 1000  # the dotted world's oracle: red balls with black, yellow or blue dots (negatives)
QUICK_ORACLE = {"world": 32, "red_balls": 8, "polka": 16, "textures": 4, "dotted": 4, "glossy": 4, "other_dots": 4, "steps": 2,
                "batch_size": 8, "held_out": 8, "held_out_subject": 4}


def reproduce(out: Path, *, quick: bool = False, threads: int = 2, dotted_share: float = 0.0, log=print) -> dict:
    """Run the three stages into `out`; returns the figures written to reproduce.json.

    `dotted_share` > 0 builds the dotted world's pair instead (world.py): that share of the pretraining
    pictures and of the oracle's world scenes carry dots, and the oracle also learns red balls with
    dots of other colours as negatives.
    """
    from ..evaluation import base_model_accuracy
    from . import pretrain, train_oracle
    from .oracle import ORACLE_DIR, OracleConfig, save_oracle

    out.mkdir(parents=True, exist_ok=True)
    pretrain_dir, oracle_dir = out / "pretrain", out / "oracle"
    pretrain.main(["--out", str(pretrain_dir), "--no-grid", "--threads", str(threads),
                   "--dotted-share", str(dotted_share), *(QUICK_PRETRAIN if quick else [])])
    model_dir = pretrain_dir / "model"
    if not (oracle_dir / "metrics.json").is_file():  # written last: a finished oracle is kept on a rerun
        dotted = {"dotted_share": dotted_share, "other_dots": DOTTED_OTHER_DOTS} if dotted_share else {}
        settings = train_oracle.TrainSettings(**{**dotted, **(QUICK_ORACLE if quick else {})})
        net, metrics = train_oracle.train_oracle(settings, OracleConfig(), log=log)
        save_oracle(net, OracleConfig(), oracle_dir)
        train_oracle.write_log(oracle_dir, settings, metrics, OracleConfig())
        (oracle_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    n = 8 if quick else 128
    log(f"scoring: {n} captions, the new model and oracle, then the shipped ones")
    new = base_model_accuracy(str(model_dir), n=n, oracle_dir=oracle_dir)
    shipped = base_model_accuracy("builtin:toy", n=n)
    toy_dir = pretrain.SHIPPED_DIR
    figures = {
        "quick": quick,
        "summary": json.loads((pretrain_dir / "summary.json").read_text()),
        "oracle_held_out": json.loads((oracle_dir / "metrics.json").read_text()),
        "rendered": {"reproduced": new["rendered"], "shipped": shipped["rendered"]},
        "drawn": {"reproduced": new["drawn"], "shipped": shipped["drawn"]},
        "identical_to_shipped": {
            **{name: filecmp.cmp(model_dir / name, toy_dir / name, shallow=False) for name in SHIPPED_WEIGHTS},
            "oracle/model.safetensors": filecmp.cmp(oracle_dir / "model.safetensors", ORACLE_DIR / "model.safetensors",
                                                    shallow=False)},
    }
    (out / "reproduce.json").write_text(json.dumps(figures, indent=2))
    (out / "REPRODUCE.md").write_text(report(figures, n), encoding="utf-8")
    return figures


def report(figures: dict, n: int) -> str:
    """The markdown table of REPRODUCE.md."""
    rendered = figures["rendered"]
    rows = [f"| renders read correctly: {name} | {rendered['reproduced'][key]:.1%} | {rendered['shipped'][key]:.1%} |"
            for name, key in (("class", "class"), ("colour", "color"), ("background", "background"))]
    rows.append(f"| polka dots reported on those renders | {rendered['reproduced']['subject_detected']:.1%} | "
                f"{rendered['shipped']['subject_detected']:.1%} |")
    s = figures["summary"]
    rows.append(f"| held-out epsilon MSE at t = 100 / 500 / 900 | {s['eps_mse_t100']:.4f} / {s['eps_mse_t500']:.4f} / "
                f"{s['eps_mse_t900']:.4f} | see PRETRAIN_LOG.md |")
    o = figures["oracle_held_out"]
    rows.append(f"| oracle on held-out drawings: class / colour / background / subject recall | "
                f"{o['clean/class']:.1%} / {o['clean/color']:.1%} / {o['clean/background']:.1%} / "
                f"{o['clean/subject_recall']:.1%} | see toy_oracle/TRAIN_LOG.md |")
    same = ", ".join(f"{name.split('/')[0]} {'yes' if equal else 'no'}"
                     for name, equal in figures["identical_to_shipped"].items())
    return (f"# builtin:toy reproduced{' (--quick: plumbing only)' if figures['quick'] else ''}\n\n"
            f"`python -m dreamlora.toyworld.reproduce`; pretraining took {s['total_seconds'] / 60:.0f} min in its "
            f"last invocation (a resumed stage counts only the rest); scored on {n} random full captions, "
            "DPM-Solver++ 20 steps, guidance 7.5.\n\n"
            "| figure | reproduced (new model, new oracle) | shipped |\n|---|---|---|\n" + "\n".join(rows) +
            f"\n\nWeights byte-identical to the shipped files: {same}.\n")


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        restart_with_passive_openmp("dreamlora.toyworld.reproduce")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (a rerun resumes what is there)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the shipped model was made with 2)")
    parser.add_argument("--quick", action="store_true", help="seconds-long stages: checks the plumbing, not quality")
    parser.add_argument("--dotted-share", type=float, default=0.0,
                        help=f"build the dotted world's pair (world.py; tried with {DOTTED_WORLD_SHARE}) instead of builtin:toy's")
    args = parser.parse_args(argv)
    figures = reproduce(args.out, quick=args.quick, threads=args.threads, dotted_share=args.dotted_share)
    print((args.out / "REPRODUCE.md").read_text(encoding="utf-8"))
    if not args.quick and min(figures["rendered"]["reproduced"][k] for k in ("class", "color", "background")) < 0.8:
        raise SystemExit("the reproduced model reads below 80 % on some attribute: see REPRODUCE.md")


if __name__ == "__main__":
    main()
