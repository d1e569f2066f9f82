"""CLIP preprocessing without torchvision, image loading errors, and prompt templates."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from saftune.data import templates as T
from saftune.models.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    BadImageError,
    clip_preprocess,
    clip_train_transform,
    drop_bad_images,
    load_image,
    load_images,
)

MEAN = np.array(CLIP_MEAN, dtype=np.float64)
STD = np.array(CLIP_STD, dtype=np.float64)


def expected(rgb) -> np.ndarray:
    """Hand formula for one pixel: (v / 255 - mean) / std per channel."""
    return (np.asarray(rgb, dtype=np.float64) / 255.0 - MEAN) / STD


# --------------------------------------------------------------------------------------------------
# evaluation preprocessing


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_solid_colour_pixel_matches_mean_std():
    img = Image.new("RGB", (300, 200), (10, 128, 250))
    x = clip_preprocess(224)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    want = expected((10, 128, 250))
    for c in range(3):
        # every pixel of a solid image is the same value, whatever the resampling does
        assert torch.allclose(x[c], torch.full((224, 224), float(want[c])), atol=1e-6)
    assert abs(float(x[0, 0, 0]) - (10 / 255 - 0.48145466) / 0.26862954) < 1e-6


def test_shorter_side_resize_then_center_crop():
    # 8 columns of distinct grey levels, 4 rows high: shorter side 4 == size, so no resize happens,
    # and the center crop keeps columns 2..5 (offset round((8 - 4) / 2) = 2).
    cols = np.arange(8, dtype=np.uint8) * 30
    arr = np.tile(cols, (4, 1))
    x = clip_preprocess(4)(arr)
    assert x.shape == (3, 4, 4)
    got = x[0, 0].numpy()
    assert np.allclose(got, expected(np.stack([cols[2:6]] * 3, axis=1))[:, 0], atol=1e-6)


def test_bicubic_resize_of_known_array():
    # A step from 50 to 200, upsampled x2 (8 -> 16 pixels): bicubic (Keys, a = -0.5) undershoots
    # before the step. Hand computation at output column 6 (source x = 2.75, taps at 1, 2, 3, 4 with
    # weights -0.0234375, 0.2265625, 0.8671875, -0.0703125): 50 * 1.0703125 - 200 * 0.0703125 = 39.45;
    # at column 7 (x = 3.25): 50 * 0.796875 + 200 * 0.203125 = 80.47. Bilinear would give 50 and 87.5.
    row = np.array([50] * 4 + [200] * 4, dtype=np.uint8)
    arr = np.tile(row, (8, 1))
    x = clip_preprocess(16)(arr)
    assert x.shape == (3, 16, 16)
    pixels = x[0, 8].numpy() * STD[0] + MEAN[0]  # undo normalisation -> [0, 1]
    assert abs(pixels[6] * 255 - 39.45) <= 1.0
    assert abs(pixels[7] * 255 - 80.47) <= 1.0
    assert pixels[6] * 255 < 49  # the overshoot that only a cubic kernel produces
    # A linear ramp is reproduced exactly by cubic convolution away from the borders: source x = 2.25.
    ramp = np.tile(np.arange(8, dtype=np.uint8) * 32, (8, 1))
    r = clip_preprocess(16)(ramp)[1, 8].numpy() * STD[1] + MEAN[1]
    assert abs(r[5] * 255 - 72.0) <= 1.0


def test_non_square_output_size_and_dtype():
    img = Image.new("RGB", (640, 480), (0, 0, 0))
    x = clip_preprocess(224)(img)
    assert tuple(x.shape) == (3, 224, 224)
    assert x.dtype == torch.float32
    assert torch.allclose(x[2], torch.full((224, 224), float(expected((0, 0, 0))[2])), atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1)])
def test_grayscale_array_becomes_rgb(shape):
    arr = np.full(shape, 77, dtype=np.uint8)
    x = clip_preprocess(16)(arr)
    assert x.shape == (3, 16, 16)
    want = expected((77, 77, 77))
    for c in range(3):
        assert torch.allclose(x[c], torch.full((16, 16), float(want[c])), atol=1e-6)


def test_rgba_and_palette_and_path_inputs(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    assert torch.allclose(
        clip_preprocess(10)(rgba)[0, 0, 0], torch.tensor(float(expected((200, 100, 50))[0])), atol=1e-6
    )
    pal = Image.new("RGB", (12, 12), (9, 99, 199)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert pal.mode == "P"
    path = tmp_path / "pal.png"
    pal.save(path)
    x = clip_preprocess(12)(path)
    assert torch.allclose(x[:, 3, 3], torch.tensor(expected((9, 99, 199)), dtype=torch.float32), atol=1e-6)
    assert torch.equal(clip_preprocess(12)(str(path)), x)


def test_rejects_float_arrays_and_bad_size():
    with pytest.raises(TypeError, match="uint8"):
        clip_preprocess(8)(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="size"):
        clip_preprocess(0)


# --------------------------------------------------------------------------------------------------
# training transform


def _textured(h=48, w=64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_train_transform_deterministic_per_generator():
    img = _textured()
    t = clip_train_transform(32, scale=(0.08, 1.0))
    a = t(img, rng=np.random.default_rng(5))
    b = t(img, rng=np.random.default_rng(5))
    c = t(img, rng=np.random.default_rng(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The transform's own stream: same seed -> same sequence of crops.
    s1 = clip_train_transform(32, seed=3)
    s2 = clip_train_transform(32, seed=3)
    assert all(torch.equal(s1(img), s2(img)) for _ in range(3))


def test_train_crop_box_within_scale_and_ratio():
    t = clip_train_transform(32)  # default scale (0.9, 1.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, w, h = t.crop_box(200, 150, rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        assert 0.85 * 200 * 150 <= w * h <= 200 * 150  # 0.9 minus rounding slack
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_train_flip_happens_and_full_crop_matches_eval():
    # scale=ratio=1 on a square image: the crop is the whole image, so the output is the evaluation
    # transform's output or its mirror image.
    img = _textured(32, 32)
    t = clip_train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    ref = clip_preprocess(32)(img)
    outs = [t(img) for _ in range(20)]
    flipped = [torch.equal(o, ref.flip(-1)) for o in outs]
    same = [torch.equal(o, ref) for o in outs]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)
    no_flip = clip_train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, seed=0)
    assert all(torch.equal(no_flip(img), ref) for _ in range(5))


def test_train_transform_validates():
    with pytest.raises(ValueError, match="scale"):
        clip_train_transform(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="ratio"):
        clip_train_transform(32, ratio=(2.0, 1.0))


# --------------------------------------------------------------------------------------------------
# bad images


def _good(path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken_cat.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match="broken_cat.jpg") as info:
        load_image(bad)
    assert isinstance(info.value, ValueError) and info.value.path == bad
    # The same error surfaces from the transform itself, which accepts paths.
    with pytest.raises(BadImageError, match="broken_cat.jpg"):
        clip_preprocess(8)(bad)


def test_truncated_and_missing_files(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(_textured(64, 64)).save(full, quality=95)
    data = full.read_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        load_image(cut)
    with pytest.raises(BadImageError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    assert load_image(full).size == (64, 64)


def test_skip_bad_with_count(tmp_path, caplog):
    good1, good2 = _good(tmp_path / "a.png"), _good(tmp_path / "c.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"junk")
    assert load_image(bad, skip_bad=True) is None
    with caplog.at_level(logging.WARNING, logger="saftune.models.transforms"):
        out = load_images([good1, bad, good2], transform=clip_preprocess(8), skip_bad=True)
    assert out.kept == [0, 2] and out.num_skipped == 1 and out.skipped == [bad]
    assert len(out.images) == 2 and out.images[0].shape == (3, 8, 8)
    assert any("skipped 1 of 3" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadImageError, match="b.png"):
        load_images([good1, bad])


def test_drop_bad_images_from_split(tmp_path):
    from saftune.data.base import Split

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    split = Split("s", [_good(tmp_path / "a.png"), bad, _good(tmp_path / "c.png")], [0, 1, 2])
    kept, n = drop_bad_images(split)
    assert n == 1 and kept.labels.tolist() == [0, 2] and kept.inputs == [tmp_path / "a.png", tmp_path / "c.png"]


# --------------------------------------------------------------------------------------------------
# templates


def test_coop_templates_per_dataset():
    assert T.templates_for("imagenet") == ["a photo of a {}."]
    assert T.templates_for("OxfordPets") == ["a photo of a {}, a type of pet."]
    assert T.templates_for("oxford-flowers") == ["a photo of a {}, a type of flower."]
    assert T.templates_for("Flowers102") == ["a photo of a {}, a type of flower."]
    assert T.templates_for("fgvc_aircraft") == ["a photo of a {}, a type of aircraft."]
    assert T.templates_for("DescribableTextures") == ["{} texture."]
    assert T.templates_for("eurosat") == ["a centered satellite photo of {}."]
    assert T.templates_for("stanford-cars") == ["a photo of a {}."]
    assert T.templates_for("food101") == ["a photo of {}, a type of food."]
    assert T.templates_for("SUN397") == ["a photo of a {}."]
    assert T.templates_for("caltech101") == ["a photo of a {}."]
    assert T.templates_for("ucf101") == ["a photo of a person doing {}."]


def test_openai_templates():
    t80 = T.imagenet_templates("openai")
    assert len(t80) == 80 and len(set(t80)) == 80
    assert all(t.count("{}") == 1 for t in t80)
    assert t80[0] == "a bad photo of a {}." and t80[-1] == "a tattoo of the {}."
    assert "itap of a {}." in t80 and "a photo of a {}." in t80
    assert set(T.imagenet_templates("openai-7")) <= set(t80)
    assert T.templates_for("dtd", "openai") == t80  # generic object prompts, on request
    with pytest.raises(ValueError, match="kind"):
        T.templates_for("dtd", "many")
    with pytest.raises(ValueError, match="text dataset"):
        T.templates_for("boss-sentiment", "openai")
    with pytest.raises(ValueError, match="known"):
        T.templates_for("mnist")


def test_template_expansion():
    prompts = T.expand(T.templates_for("dtd") + ["a photo of a {} pattern."], ["banded", "woven"])
    assert prompts == [
        ["banded texture.", "a photo of a banded pattern."],
        ["woven texture.", "a photo of a woven pattern."],
    ]
    assert len(T.expand(T.imagenet_templates("openai"), ["tench", "goldfish", "shark"])) == 3
    with pytest.raises(ValueError, match="placeholder"):
        T.expand(["no slot"], ["x"])
    with pytest.raises(ValueError, match="placeholder"):
        T.expand(["{} and {}"], ["x"])
