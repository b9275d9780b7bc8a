"""Model and image identity: whole-content fingerprints, remembered by file, used by loading, priors, plan and resume."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamlora import identity
from dreamlora.identity import file_digest, folder_fingerprint, images_fingerprint, model_identity

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def write_weights(path: Path, middle: float = 0.0) -> None:
    """A 3 MiB safetensors file whose middle tensor is the only difference between two fine-tunes."""
    save_file({"a": torch.zeros(256, 1024), "b": torch.full((256, 1024), middle), "c": torch.ones(256, 1024)}, str(path))


def test_a_change_in_the_middle_of_a_weight_file_is_another_model(tmp_path):
    """The old fingerprint read the first and last MiB only: two fine-tunes differing in the middle shared a key."""
    first, second = tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors"
    for path, middle in ((first, 0.0), (second, 0.5)):
        path.parent.mkdir()
        write_weights(path, middle)
    with open(first, "rb") as a, open(second, "rb") as b:  # the same size, first and last MiB
        assert a.read(1 << 20) == b.read(1 << 20)
        a.seek(-(1 << 20), os.SEEK_END)
        b.seek(-(1 << 20), os.SEEK_END)
        assert a.read() == b.read()
    assert model_identity(str(first)).fingerprint != model_identity(str(second)).fingerprint
    assert folder_fingerprint(first.parent) != folder_fingerprint(second.parent)
    assert model_identity(str(first)).name == "model.safetensors"  # no local path in the name


def test_a_digest_is_remembered_by_file_and_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_weights(path)
    before = file_digest(path)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert file_digest(path) == before  # the second run pays a stat and the cache file
    assert Path(path) not in {Path(r) for r in reads if isinstance(r, (str, os.PathLike))}
    monkeypatch.undo()
    write_weights(path, middle=1.0)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert file_digest(path) != before


def test_a_moved_model_folder_is_the_same_model(tmp_path):
    first = tmp_path / "a" / "m"
    first.mkdir(parents=True)
    write_weights(first / "unet.safetensors")
    (first / "config.json").write_text('{"x": 1}')
    second = tmp_path / "b" / "m"
    shutil.copytree(first, second)
    assert model_identity(str(first)) == model_identity(str(second))
    (second / "config.json").write_text('{"x": 2}')  # a config decides the model too
    assert model_identity(str(first)).fingerprint != model_identity(str(second)).fingerprint


def test_images_fingerprint_follows_pixels_and_captions_not_names(tmp_path):
    paths = sorted(INSTANCES.glob("*.png"))
    prompts = ["a photo of sks ball"] * len(paths)
    copies = []
    for p in paths:
        shutil.copy(p, tmp_path / f"renamed-{p.name}")
        copies.append(tmp_path / f"renamed-{p.name}")
    assert images_fingerprint(paths, prompts) == images_fingerprint(copies, prompts)
    assert images_fingerprint(paths, prompts) != images_fingerprint(paths, ["a photo of sks ball, red"] + prompts[1:])
    assert images_fingerprint(paths, prompts) != images_fingerprint(paths[:-1], prompts[:-1])


def test_an_unknown_builtin_is_a_clear_error():
    from dreamlora.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="builtin:nope"):
        model_identity("builtin:nope")
    assert identity.HUB_ID.fullmatch("org/name")
