"""The hashes kohya's sd-scripts writes into a LoRA file (`sshs_model_hash`, `sshs_legacy_hash`).

sd-scripts (`library/train_util.py`, `precalculate_safetensors_hashes`) serialises the state dict with only its
`ss_*` header entries (entries a user may add later must not change the hash) and takes, of those bytes, the
sha256 of everything after the header (the "new" hash of sd-webui-additional-networks) and the first 8 hex
digits of the sha256 of the 64 KiB at offset 1 MiB (its "legacy" hash; a file under 1 MiB hashes no bytes). The
extension and AUTOMATIC1111 read them instead of hashing the file again.
"""

from __future__ import annotations

import hashlib

import torch

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a state dict and its header, as sd-scripts computes them."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash
