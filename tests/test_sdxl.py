"""SDXL end to end on the CPU: builtin:tiny-sdxl and an SDXL built from configs here, through the family interface.

Size conditions per row (crops and flips included), both text encoders' adapters trained and saved under
lora_te1/lora_te2, files that diffusers' StableDiffusionXLPipeline loads key for key, scale 0 = the base model,
single-file round trip, detection of SD 1.x / 2.x / SDXL from configs and checkpoint keys, and the refusals.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreamlora import SampleSettings, load_config, sample, train
from dreamlora.data import LatentCache, draw_latents_and_crops
from dreamlora.errors import ModelLoadError, NumericalError
from dreamlora.lora import read_lora_file
from dreamlora.models import (ImageGeometry, StableDiffusionFamily, StableDiffusionXLFamily, builtin_model_dir,
                              detect_family, export_single_file, load_base_model)
from dreamlora.models.configs import ModelConfigs, read_model_configs

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT / "sample_instances" / "polkaball"


def sdxl_config(tmp_path, name="ball", **overrides):
    values = {"model.name": "builtin:tiny-sdxl", "data.instance_dir": str(INSTANCES), "data.class_word": "ball",
              "output.path": str(tmp_path / f"{name}.safetensors"), "train.steps": 3, "train.learning_rate": 5e-3,
              "train.checkpoint_every": 0, "prior.num_class_images": 2, "prior.steps": 2, "validation.steps": 1,
              "validation.seeds": [0], "validation.prompts": ["a photo of {token} {class}"],
              "lora.train_text_encoder": True}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sdxl")
    return train(sdxl_config(tmp_path)), tmp_path


@pytest.fixture(scope="module")
def tiny_sdxl(session_cache):
    return load_base_model("builtin:tiny-sdxl")


# --- size conditions ---------------------------------------------------------------------------------


def test_time_ids_are_original_size_crop_and_target_per_row():
    family = StableDiffusionXLFamily()
    geometry = ImageGeometry(original_sizes=[(768, 1024), (64, 64)], crops=[(0, 128), (0, 0)], target=(512, 512))
    time_ids = family.image_conditions(geometry)["time_ids"]
    assert time_ids.tolist() == [[768, 1024, 0, 128, 512, 512], [64, 64, 0, 0, 512, 512]]
    assert StableDiffusionFamily("sd1", False, False).image_conditions(geometry) == {}


def test_random_crops_report_their_pixel_offsets_and_flips_keep_the_coordinates_they_were_cut_at():
    # Each latent cell holds its own position (100 * row + column): a window's top-left value tells where it was cut.
    h, w = 6, 9
    grid = (torch.arange(h)[:, None] * 100 + torch.arange(w)[None, :]).float()[None]  # (1, h, w)
    cache = LatentCache([grid], [torch.zeros_like(grid)], [grid.flip(-1)], [torch.zeros_like(grid)], size=4,
                        original_sizes=[(300, 450)], origins=[(0, 0)], factor=8)
    seen_flip = seen_plain = False
    for seed in range(40):
        latents, crops = draw_latents_and_crops(cache, [0], torch.Generator().manual_seed(seed), random_crop=True,
                                                random_flip=True)
        value = int(latents[0, 0, 0, 0])
        top, column = divmod(value, 100)
        flipped = latents[0, 0, 0, 1] < latents[0, 0, 0, 0]  # columns count down in a mirrored window
        left = (w - 1 - column) if flipped else column  # where the window starts in the image it was cut from
        assert crops == [(top * 8, left * 8)]
        seen_flip, seen_plain = seen_flip or bool(flipped), seen_plain or not bool(flipped)
    assert seen_flip and seen_plain
    centred = LatentCache([grid], [torch.zeros_like(grid)], None, None, size=4, original_sizes=[(300, 450)],
                          origins=[(16, 40)], factor=8)
    _, crops = draw_latents_and_crops(centred, [0], torch.Generator().manual_seed(0), random_crop=False,
                                      random_flip=False)
    assert crops == [(16 + 1 * 8, 40 + 2 * 8)]  # the cached center window's origin plus the centred latent window


def test_training_rows_carry_each_images_real_size_and_crop(tmp_path, monkeypatch):
    """Instance photos of 128 px, random crops and flips; class images of another size, center-cropped."""
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, size in enumerate([(96, 64), (64, 80)]):  # (width, height)
        Image.new("RGB", size, (40 * i, 90, 200)).save(classes / f"{i}.png")
    recorded = []
    real = StableDiffusionXLFamily.image_conditions

    def recording(self, geometry):
        recorded.append(geometry)
        return real(self, geometry)

    monkeypatch.setattr(StableDiffusionXLFamily, "image_conditions", recording)
    train(sdxl_config(tmp_path, **{"prior.class_dir": str(classes), "data.crop": "random", "data.random_flip": True,
                                   "train.steps": 4, "lora.train_text_encoder": False}))
    assert len(recorded) == 4
    for geometry in recorded:
        assert geometry.target == (64, 64)
        instance_size, class_size = geometry.original_sizes
        assert instance_size == (128, 128)
        top, left = geometry.crops[0]  # 128 px photos resized to 64: nothing to crop
        assert (top, left) == (0, 0)
        # class images: short side to 64 px, then the center window (96x64 -> 96x64: left 16; 64x80 -> top 8)
        assert (class_size, geometry.crops[1]) in {((64, 96), (0, 16)), ((80, 64), (8, 0))}


@pytest.mark.slow  # over 3 s on 2 cores: run by .ci/run with -m slow
def test_random_crops_of_larger_photos_move_the_crop_condition(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (160, 96), (200, 30 * i, 30)).save(photos / f"{i}.png")  # resized to 107x64: crops move
    recorded = []
    real = StableDiffusionXLFamily.image_conditions
    monkeypatch.setattr(StableDiffusionXLFamily, "image_conditions",
                        lambda self, g: recorded.append(g) or real(self, g))
    train(sdxl_config(tmp_path, **{"data.instance_dir": str(photos), "data.crop": "random", "data.random_flip": True,
                                   "prior.enabled": False, "train.steps": 6, "lora.train_text_encoder": False}))
    crops = {g.crops[0] for g in recorded}
    assert all(g.original_sizes == [(96, 160)] for g in recorded)
    assert all(top == 0 and 0 <= left <= 106 - 64 and left % 2 == 0 for top, left in crops)  # latent cells of 2 px
    assert len(crops) > 1


# --- training and the file -----------------------------------------------------------------------------


def test_both_text_encoders_are_trained_and_saved_under_te1_and_te2(trained):
    result, _ = trained
    lora = read_lora_file(result.output)
    assert lora.format == "kohya" and lora.unet_modules == 96 and lora.text_modules == 40
    keys = lora.tensors
    te1 = [k for k in keys if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    te2 = [k for k in keys if k.startswith("lora_te2_") and k.endswith("lora_up.weight")]
    assert len(te1) == len(te2) == 20  # 5 layers x q, k, v, out of each encoder
    # lora_up starts at 0: what moved learned. SDXL reads encoder 1's penultimate layer, so its last layer gets no
    # gradient (as in diffusers' and kohya's SDXL trainers); encoder 2's pooled output uses every layer.
    learned = {k for k in te1 + te2 if keys[k].abs().sum() > 0}
    assert learned == {k for k in te1 + te2 if not k.startswith("lora_te1_text_model_encoder_layers_4_")}
    assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_middle_block_")
               or k.startswith("lora_unet_output_blocks_") for k in keys if k.startswith("lora_unet_"))
    meta = lora.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def lora_layers(pipe) -> dict[str, int]:
    """peft LoRA layers diffusers installed in each component."""
    from peft.tuners.lora import LoraLayer

    return {name: sum(isinstance(m, LoraLayer) for m in getattr(pipe, name).modules())
            for name in ("unet", "text_encoder", "text_encoder_2")}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_sdxl_pipeline_loads_every_key_and_scale_zero_is_the_base(fmt, trained, tmp_path, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    if fmt == "kohya":
        path = trained[0].output
    else:
        path = train(sdxl_config(tmp_path, "d", **{"output.format": "diffusers", "train.steps": 2})).output
    pipe = StableDiffusionXLPipeline.from_pretrained(str(builtin_model_dir("tiny-sdxl")), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    pipe.load_lora_weights(str(path), adapter_name="subject")
    assert lora_layers(pipe) == {"unet": 96, "text_encoder": 20, "text_encoder_2": 20}  # nothing missing or extra
    with_lora = render()
    pipe.set_adapters(["subject"], adapter_weights=[0.0])
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(render(), base, atol=1e-6)


def test_sample_renders_sdxl_files_through_the_sdxl_pipeline(trained, tmp_path):
    result, _ = trained
    out = sample(result.output, SampleSettings(prompts=["a photo of {token} {class}"], seeds=[0], scales=[0.0, 1.0],
                                               steps=2), tmp_path / "grid.png")
    off, on = (np.asarray(Image.open(p)) for p in out.images)
    base = sample(None, SampleSettings(prompts=["a photo of sks ball"], seeds=[0], steps=2), tmp_path / "base.png",
                  model="builtin:tiny-sdxl")
    assert np.array_equal(off, np.asarray(Image.open(base.images[0])))  # scale 0 is the base model, exactly
    assert not np.array_equal(off, on)


def test_an_sdxl_built_from_configs_here_trains_and_its_file_loads(tmp_path):
    """Another SDXL layout than the built-in's (three levels, one layer a block), saved as a diffusers folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamlora.models.sdxl_layout import SDXL_SCHEDULER
    from dreamlora.models.tokenizer import load_tokenizer, write_tokenizer_files

    write_tokenizer_files(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "max_position_embeddings": 77}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 1, 2), projection_class_embeddings_input_dim=6 * 4 + 16,
        cross_attention_dim=16 + 24, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        sample_size=128, scaling_factor=0.13025, force_upcast=True)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                       num_hidden_layers=2, hidden_act="quick_gelu", **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, intermediate_size=32, num_attention_heads=2,
                                                     num_hidden_layers=2, hidden_act="gelu", projection_dim=16, **ids))
    folder = tmp_path / "my-sdxl"
    StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                              add_watermarker=False).save_pretrained(folder)
    base = load_base_model(str(folder))
    assert isinstance(base.family, StableDiffusionXLFamily) and base.default_resolution == 128
    result = train(sdxl_config(tmp_path, **{"model.name": str(folder), "train.steps": 2, "prior.enabled": False}))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False)
    pipe.load_lora_weights(str(result.output))
    lora = read_lora_file(result.output)
    assert sum(lora_layers(pipe).values()) == lora.unet_modules + lora.text_modules


# --- loading, single file, detection ---------------------------------------------------------------------


def test_single_file_round_trip(tiny_sdxl, tmp_path):
    path = export_single_file(tiny_sdxl, tmp_path / "xl.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)
    loaded = load_base_model(str(path), single_file_config=str(builtin_model_dir("tiny-sdxl")))
    assert isinstance(loaded.family, StableDiffusionXLFamily) and loaded.identity == "xl.safetensors"
    for a, b in ((loaded.unet, tiny_sdxl.unet), (loaded.vae, tiny_sdxl.vae),
                 (loaded.text_encoders[0], tiny_sdxl.text_encoders[0]),
                 (loaded.text_encoders[1], tiny_sdxl.text_encoders[1])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, family, version", [("builtin:tiny-sd", "sd1", "sd_v1"),
                                                   ("builtin:tiny-sd2", "sd2", "sd_v2_v"),
                                                   ("builtin:tiny-sdxl", "sdxl", "sdxl_base_v1-0"),
                                                   ("builtin:toy", "sd1", "sd_v1")])
def test_family_detection_from_configs(name, family, version, session_cache):
    detected = detect_family(read_model_configs(name))
    assert detected.name == family and detected.kohya_base_model_version == version


@pytest.mark.parametrize("name, pipeline", [("tiny-sd", "StableDiffusionPipeline"),
                                            ("tiny-sd2", "StableDiffusionPipeline"),
                                            ("tiny-sdxl", "StableDiffusionXLPipeline")])
def test_family_detection_from_checkpoint_keys(name, pipeline, tmp_path, session_cache):
    from dreamlora.models.registry import single_file_kind

    path = export_single_file(load_base_model(f"builtin:{name}"), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert single_file_kind(list(f.keys()), str(path)).pipeline_class == pipeline


def configs(**changes) -> ModelConfigs:
    base = read_model_configs("builtin:tiny-sdxl")
    return ModelConfigs(**{**base.__dict__, **changes})


@pytest.mark.parametrize("changes, says", [
    ({"index": {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}},
     "an SDXL refiner"),
    ({"text_encoders": (read_model_configs("builtin:tiny-sdxl").text_encoders[1],)}, "an SDXL refiner"),
    ({"scheduler": {"_class_name": "EDMDPMSolverMultistepScheduler"}}, "Playground v2.5"),
    ({"index": {"_class_name": "FluxFillPipeline"}}, "a FluxFill pipeline; train on the text-to-image Flux.1"),
    ({"index": {"_class_name": "StableDiffusion3ControlNetPipeline"}}, "a StableDiffusion3ControlNet pipeline"),
    ({"index": {"_class_name": "KandinskyPipeline"}}, "KandinskyPipeline, which dreamlora cannot train"),
])
def test_models_that_cannot_be_trained_are_refused_naming_what_they_are(changes, says, session_cache):
    with pytest.raises(ModelLoadError, match=says):
        detect_family(configs(**changes))


def test_a_refiner_folder_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    folder = tmp_path / "refiner"
    shutil.copytree(builtin_model_dir("tiny-sdxl"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    import dreamlora.models.loading as loading

    monkeypatch.setattr(loading, "_from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ModelLoadError, match=r"refiner.*not supported: train on the SDXL base model"):
        load_base_model(str(folder))


def test_distilled_models_load_with_a_note_about_sampling_settings(tmp_path):
    folder = tmp_path / "sdxl-turbo"
    shutil.copytree(builtin_model_dir("tiny-sdxl"), folder)
    base = load_base_model(str(folder))
    assert any("few-step distilled model (turbo)" in n and "--prior-steps 4" in n for n in base.notes)


# --- the VAE ---------------------------------------------------------------------------------------------


def test_a_vae_that_overflows_in_fp16_decodes_in_fp32_and_a_nan_latent_is_an_error(tiny_sdxl):
    from dreamlora.sampling import decode_latents

    pipe = tiny_sdxl.pipeline()
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = decode_latents(tiny_sdxl.vae, pipe.image_processor, latents)[0]
    vae16 = type(tiny_sdxl.vae).from_config(tiny_sdxl.vae.config)
    vae16.load_state_dict(tiny_sdxl.vae.state_dict())
    vae16.to(torch.float16)
    decoded = decode_latents(vae16, pipe.image_processor, latents.half())[0]  # force_upcast: decoded in fp32
    assert vae16.dtype == torch.float16  # and given back as it was
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(reference, dtype=int)).max() <= 2
    with pytest.raises(NumericalError, match="non-finite latents"):
        decode_latents(tiny_sdxl.vae, pipe.image_processor, torch.full((1, 4, 32, 32), float("nan")))


def test_another_vae_from_a_folder_replaces_the_models_and_changes_its_identity(tmp_path, tiny_sdxl):
    from diffusers import AutoencoderKL

    folder = tmp_path / "fixed-vae"
    torch.manual_seed(5)
    AutoencoderKL.from_config({**tiny_sdxl.vae.config, "force_upcast": False}).save_pretrained(folder)
    base = load_base_model("builtin:tiny-sdxl", vae=str(folder))
    assert base.vae.config.force_upcast is False and "VAE fixed-vae" in base.identity
    assert base.fingerprint != tiny_sdxl.fingerprint
    with pytest.raises(ModelLoadError, match="--vae .*nope"):
        load_base_model("builtin:tiny-sdxl", vae=str(tmp_path / "nope"))


# --- the plan ------------------------------------------------------------------------------------------


@pytest.mark.slow  # over 5 s on 2 cores: run by .ci/run with -m slow
def test_dry_run_estimates_sdxl_from_its_architecture(tmp_path):
    from dreamlora.memory import plan

    p = plan(sdxl_config(tmp_path), device_type="cuda")
    text = "\n".join(p.lines())
    assert "builtin:tiny-sdxl at 64 px" in text and p.memory.peak > 0
    frozen = plan(sdxl_config(tmp_path, **{"lora.train_text_encoder": False}), device_type="cuda")
    assert frozen.memory.training["text encoders"] == 0 < p.memory.training["text encoders"]
