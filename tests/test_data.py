import pytest
import torch
from PIL import Image

from dreamlora.config import DataConfig
from dreamlora.data import (LatentCache, draw_latents, instance_set, list_image_files, load_rgb, pick_indices,
                            prompt_from_caption, resize_for_training)
from dreamlora.errors import DataError


def make_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 64), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "b.jpg")
    (folder / "b.txt").write_text("a dog on a sofa\n")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    return folder


def test_listing_skips_hidden_and_non_images_with_a_note(tmp_path):
    paths, skipped = list_image_files(make_folder(tmp_path), "instance")
    assert [p.name for p in paths] == ["a.png", "b.jpg"]
    assert any(".DS_Store" in s for s in skipped) and any("notes.pdf" in s for s in skipped)


def test_empty_and_missing_folders_are_errors_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty' has no images"):
        list_image_files(tmp_path / "empty", "instance")
    with pytest.raises(DataError, match="nope' does not exist"):
        list_image_files(tmp_path / "nope", "instance")


def test_captions_override_the_prompt_and_get_the_token(tmp_path):
    config = DataConfig(instance_dir=str(make_folder(tmp_path)), token="sks", class_word="dog")
    images = instance_set(config)
    assert images.prompts == ["a photo of sks dog", "a sks dog on a sofa"]


@pytest.mark.parametrize("caption, expected", [
    ("a dog on a sofa", "a sks dog on a sofa"),
    ("sks dog in the snow", "sks dog in the snow"),
    ("on a beach", "sks dog, on a beach"),
    ("a photo of {token} {class} at night", "a photo of sks dog at night"),
])
def test_prompt_from_caption(caption, expected):
    assert prompt_from_caption(caption, "sks", "dog") == expected


def test_transparent_images_are_composited_on_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_image_error_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg' cannot be read"):
        load_rgb(path)


def test_resize_center_crops_to_a_square_in_range():
    pixels = resize_for_training(Image.new("RGB", (100, 50), (255, 0, 0)), 32, "center", 8)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_resize_random_keeps_the_long_side_in_latent_multiples():
    pixels = resize_for_training(Image.new("RGB", (100, 50), (0, 0, 0)), 32, "random", 8)
    assert pixels.shape == (3, 32, 64)


def test_draw_latents_is_reproducible_and_samples_the_distribution():
    mean = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    cache = LatentCache([mean], [torch.zeros_like(mean)], [mean.flip(-1)], [torch.zeros_like(mean)], size=4)
    a = draw_latents(cache, [0], torch.Generator().manual_seed(3), random_crop=True, random_flip=True)
    b = draw_latents(cache, [0], torch.Generator().manual_seed(3), random_crop=True, random_flip=True)
    assert torch.equal(a, b) and a.shape == (1, 2, 4, 4)
    # with std 0 each crop is a window of the mean or of its mirror
    windows = [m[:, :, left:left + 4] for m in (mean, mean.flip(-1)) for left in range(3)]
    assert any(torch.equal(a[0], w) for w in windows)
    centre = draw_latents(cache, [0], torch.Generator().manual_seed(0), random_crop=False, random_flip=False)
    assert torch.equal(centre[0], mean[:, :, 1:5])


def test_pick_indices_walks_through_whole_epochs():
    first_epoch = pick_indices(5, seed=1, first=0, n=5)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    assert pick_indices(5, seed=1, first=3, n=4)[:2] == first_epoch[3:]
    assert pick_indices(5, seed=1, first=0, n=5) == first_epoch
