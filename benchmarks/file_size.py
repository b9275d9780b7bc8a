"""LoRA file sizes for SD 1.5 and SDXL at ranks 4, 8 and 16, from the architectures alone.

The UNet (and text encoders) are built on the meta device from their published configs
(benchmarks/models.py), adapters are injected through dreamlora.lora exactly as training does, only
the adapter tensors are materialised (zeros), and the file is written by dreamlora.lora.save_lora_file
with the metadata a real run stores. So the sizes are the real files' sizes, header included.

    python benchmarks/file_size.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, print_table  # noqa: E402

import torch  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_file_size(arch: str, rank: int, *, text: bool, format: str, dtype: torch.dtype = torch.float16) -> dict:
    from models import model_configs

    from dreamlora.config import DreamLoraConfig, to_portable_json
    from dreamlora.lora import add_lora_adapters, lora_metadata, save_lora_file
    from dreamlora.memory import meta_text_encoder, meta_unet
    from dreamlora.models import detect_family

    models = model_configs(arch)
    unet = meta_unet(models.unet)
    texts = [meta_text_encoder(c) for c in models.text_encoders]
    add_lora_adapters(unet, texts, rank=rank, alpha=float(rank), dropout=0.0, unet_targets=ATTENTION,
                      train_text_encoder=text, text_targets=TEXT_ATTENTION)
    params = 0
    for model in (unet, *texts):
        for name, module in model.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                module.to_empty(device="cpu")
                torch.nn.init.zeros_(module.weight)
                params += module.weight.numel()
    family = detect_family(models)
    config = DreamLoraConfig()
    config.lora.rank, config.lora.train_text_encoder = rank, text
    metadata = lora_metadata(family=family, rank=rank, alpha=float(rank), resolution=models.default_resolution,
                             output_name="subject", trigger_phrase="sks dog", title="subject",
                             config_json=to_portable_json(config), train_text_encoder=text)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_lora_file(path, unet, texts if text else [], family, format=format, alpha=float(rank), dtype=dtype,
                       metadata=metadata)
        size = path.stat().st_size
    return {"arch": arch, "rank": rank, "targets": "attention" + (" + text encoders" if text else ""),
            "format": format, "dtype": str(dtype).removeprefix("torch."), "params": params,
            "mb": size / 1e6, "mib": size / 2**20, "tensor_mb": params * dtype.itemsize / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    args = parser.parse_args()
    rows = []
    for arch in ("sd15", "sdxl"):
        for rank in (4, 8, 16):
            rows.append(lora_file_size(arch, rank, text=False, format="kohya"))
        rows.append(lora_file_size(arch, 4, text=False, format="diffusers"))
        rows.append(lora_file_size(arch, 4, text=True, format="kohya"))
        rows.append(lora_file_size(arch, 4, text=False, format="kohya", dtype=torch.float32))
    append_json(args.json, [{"bench": "file_size", **r} for r in rows])
    print_table(rows, [("arch", "architecture"), ("rank", "rank"), ("targets", "adapted modules"),
                       ("format", "format"), ("dtype", "dtype"), ("params", "LoRA parameters"),
                       ("tensor_mb", "tensor MB"), ("mb", "file MB"), ("mib", "file MiB")],
                title="LoRA file size (MB = 10^6 bytes)")


if __name__ == "__main__":
    main()
