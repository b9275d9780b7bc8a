import dataclasses
import json

import numpy as np
from PIL import Image

import pytest

from dreamlora.errors import DataError
from dreamlora.config import PriorConfig, load_config
from dreamlora.identity import ModelIdentity
from dreamlora.priors import MANIFEST, generate_priors, image_seed, prior_spec, training_prior_spec


def spec_for(base, **changes):
    """The spec a CPU training run in fp32 builds, with `changes` to its fields."""
    prior = PriorConfig(steps=2)
    spec = prior_spec(prior, "a photo of ball", ModelIdentity(base.identity, base.fingerprint), 64, device="cpu",
                      dtype="fp32")
    return dataclasses.replace(spec, **changes)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def generated(self):
        return max([e.total for e in self.events if e.stage == "priors"], default=0)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_image_i_does_not_depend_on_the_batch_size(tiny_sd, tmp_path):
    spec = spec_for(tiny_sd)
    batched = generate_priors(tiny_sd, spec, tmp_path / "b3", 3, batch_size=3)
    single = generate_priors(tiny_sd, spec, tmp_path / "b1", 3, batch_size=1)
    for a, b in zip(batched, single):
        # Same seed, same starting noise; batched float kernels may round differently in the last bit,
        # which can move a pixel by one level after quantisation, never more.
        diff = np.abs(pixels(a) - pixels(b))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, a.name
    assert len({p.read_bytes() for p in batched}) == 3  # every image has its own seed
    assert image_seed(0, 1) != image_seed(0, 2) and image_seed(0, 1) != image_seed(1, 1)


def test_each_image_starts_from_its_own_seeded_noise(tiny_sd):
    import torch

    from dreamlora.sampling import initial_latents

    pipe = tiny_sd.pipeline()
    noise = initial_latents(pipe, [torch.Generator().manual_seed(image_seed(0, i)) for i in range(3)], 64)
    alone = initial_latents(pipe, [torch.Generator().manual_seed(image_seed(0, 2))], 64)
    assert torch.equal(noise[2:], alone)


def test_only_missing_images_are_generated(tiny_sd, tmp_path):
    spec, folder = spec_for(tiny_sd), tmp_path / "priors"
    paths = generate_priors(tiny_sd, spec, folder, 3, batch_size=2)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    paths[1].unlink()
    recorder = Recorder()
    generate_priors(tiny_sd, spec, folder, 4, batch_size=2, progress=recorder)
    assert recorder.generated() == 2  # image 1 again and the new image 3
    assert paths[0].stat().st_mtime_ns == before[paths[0].name][1]  # untouched
    assert paths[1].read_bytes() == before[paths[1].name][0]  # same batch size: regenerated bit-identically
    recorder = Recorder()
    generate_priors(tiny_sd, spec, folder, 4, progress=recorder)
    assert recorder.generated() == 0
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["key"] == spec.key() and manifest["prompt"] == "a photo of ball" and manifest["sampler"] == "dpm++2m"


@pytest.mark.parametrize("change", [{"prompt": "a photo of cube"}, {"seed": 1}, {"sampler": "ddim"},
                                    {"model_fingerprint": "other"}, {"steps": 3}, {"negative_prompt": "blurry"},
                                    {"dtype": "fp16"}, {"vae_dtype": "fp16"}, {"device": "cuda"}])
def test_a_changed_setting_never_reuses_old_images(tiny_sd, tmp_path, change):
    spec, folder = spec_for(tiny_sd), tmp_path / "priors"
    generate_priors(tiny_sd, spec, folder, 1)
    changed = spec_for(tiny_sd, **change)
    assert changed.key() != spec.key()
    with pytest.raises(DataError, match="made with other settings"):
        generate_priors(tiny_sd, changed, folder, 1)


def test_a_sampler_whose_settings_changed_under_the_same_name_gets_a_new_key(tiny_sd, tmp_path, monkeypatch):
    from dreamlora.models import loading

    spec = spec_for(tiny_sd)
    generate_priors(tiny_sd, spec, tmp_path / "priors", 1)
    class_name, settings = loading.SAMPLERS["dpm++2m"]
    monkeypatch.setitem(loading.SAMPLERS, "dpm++2m", (class_name, {**settings, "timestep_spacing": "leading"}))
    assert spec.key() != json.loads((tmp_path / "priors" / MANIFEST).read_text())["key"]
    with pytest.raises(DataError, match=r"other settings \(sampler_settings differ\)"):
        generate_priors(tiny_sd, spec, tmp_path / "priors", 1)


def test_overwrite_replaces_a_folder_of_other_settings(tiny_sd, tmp_path):
    folder = tmp_path / "priors"
    old = generate_priors(tiny_sd, spec_for(tiny_sd), folder, 1)[0].read_bytes()
    new = generate_priors(tiny_sd, spec_for(tiny_sd, seed=5), folder, 1, overwrite=True)[0].read_bytes()
    assert old != new


def test_training_and_the_priors_command_key_their_precision_and_device(tiny_sd):
    """`train` renders with the run's frozen dtype and an fp32 VAE; `dreamlora priors` on a GPU renders all in fp16:
    other pixels, so other cache keys (and the same key for the same run on the same device)."""
    model = ModelIdentity(tiny_sd.identity, tiny_sd.fingerprint)
    config = load_config(None, {"model.name": "builtin:tiny-sd", "data.instance_dir": "x", "data.class_word": "ball",
                                "output.path": "x.safetensors"})
    bf16 = load_config(None, {"model.name": "builtin:tiny-sd", "data.instance_dir": "x", "data.class_word": "ball",
                              "output.path": "x.safetensors", "train.mixed_precision": "bf16"})
    cpu, gpu = training_prior_spec(config, model, 64, "cpu"), training_prior_spec(config, model, 64, "cuda")
    assert (cpu.dtype, cpu.vae_dtype, cpu.device) == ("fp32", "fp32", "cpu") and cpu.prompt == "a photo of ball"
    assert len({cpu.key(), gpu.key(), training_prior_spec(bf16, model, 64, "cpu").key()}) == 3
    command = prior_spec(config.prior, "a photo of ball", model, 64, device="cuda", dtype="fp16", vae_dtype="fp16")
    assert command.key() != gpu.key()
    assert training_prior_spec(config, model, 64, "cpu").key() == cpu.key()
