"""One table from the JSON lines that train_step.py and priors.py append (what gpu.sh prints at the end).

    python benchmarks/report.py results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

COLUMNS = [("bench", "bench"), ("kind", "kind"), ("model", "model"), ("resolution", "px"), ("device", "device"),
           ("setting", "setting"), ("time", "time"), ("unit", "unit"), ("vs", "x baseline"),
           ("peak_gb", "peak GB"), ("estimate_gb", "plan GB"), ("estimate_error", "plan err"),
           ("flops", "GFLOP/step"), ("mfu", "MFU"), ("psnr", "PSNR dB"), ("note", "note")]


def unify(row: dict) -> dict:
    out = dict(row)
    if row.get("bench") == "train_step":
        flags = [row.get("mixed_precision", "no")]
        flags += ["ckpt"] if row.get("gradient_checkpointing") else []
        flags += ["8-bit Adam"] if row.get("optimizer") == "adamw8bit" else []
        flags += ["compile"] if row.get("compile") else []
        flags += [f"rank {row['rank']}"] if row.get("rank", 4) != 4 else []
        flags += ["+ text encoders"] if row.get("train_text_encoder") else []
        flags += [f"{row['base_quantization']} base"] if row.get("base_quantization", "none") != "none" else []
        flags += ["T5 on CPU"] if row.get("t5_on_cpu") else []
        out.update(setting=" ".join(flags), time=row.get("step_s"), unit="s/step", vs=row.get("step_vs_ref"))
    elif row.get("bench") == "priors":
        out.update(setting=f"{row.get('sampler')} {row.get('steps')} steps, batch {row.get('batch')}",
                   time=row.get("s_per_image"), unit="s/image", vs=row.get("vs_baseline"))
        if row.get("reference"):
            out["note"] = "converged reference"
    out["note"] = "; ".join(x for x in (out.get("note"), row.get("error") and f"ERROR {row['error']}") if x) or None
    return out


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/report.py results.jsonl")
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    rows = [unify(r) for r in rows if r.get("bench") in ("train_step", "priors")]
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    print_table(rows, COLUMNS, title=f"dreamlora benchmarks{' on ' + ', '.join(gpus) if gpus else ''}")


if __name__ == "__main__":
    main()
