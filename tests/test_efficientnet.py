"""EfficientNet-Lite0: TF padding, preprocessing, and the real ImageNet weights on two real photos.

The photos are the two that scikit-learn ships (``load_sample_images``): china.jpg, a temple roof, and
flower.jpg, a dahlia (not an ImageNet class; daisy is the nearest). The stored reference
``tests/data/efficientnet_lite0_reference.json`` was computed once by running this file as a script
(``python tests/test_efficientnet.py --regenerate``); at the time it matched the forward pass of the
checkpoint's own model code (PyPI ``efficientnet_lite_pytorch==0.1.0``) exactly (max |diff| 0.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from saftune.models.efficientnet import (
    Conv2dSame,
    EfficientNetLite0,
    efficientnet_lite0,
    load_state_dict_file,
    preprocess,
    tf_same_padding,
)

REFERENCE = Path(__file__).parent / "data" / "efficientnet_lite0_reference.json"

# Trainable parameters, and numbers in the state dict (adds BN running mean/var: 42,016).
NUM_PARAMETERS = 4_652_008
NUM_STATE_DICT_VALUES = 4_694_024

# ImageNet-1k indices checked by hand against the class list.
PALACE, MONASTERY, BELL_COTE, CASTLE = 698, 663, 442, 483
DAISY, BEE = 985, 309


# -- helpers ------------------------------------------------------------------------------------


def _weights_path() -> Path:
    """The shipped ImageNet state dict, or a test failure that says how to get it."""
    try:
        from saftune.assets import asset_path

        return Path(asset_path("efficientnet-lite0"))
    except Exception as exc:  # missing module or missing asset: either way the message says why
        pytest.fail(f"EfficientNet-Lite0 weights unavailable: {type(exc).__name__}: {exc}")


def _sample_images() -> dict[str, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn ships the sample photos")
    bunch = datasets.load_sample_images()
    return {Path(f).name: image for f, image in zip(bunch.filenames, bunch.images)}


def _compute_reference(model: EfficientNetLite0, images: dict[str, np.ndarray]) -> dict:
    batch = torch.stack([preprocess(image) for image in images.values()])
    with torch.no_grad():
        logits = model.eval()(batch)
    probs = logits.softmax(-1)
    out = {}
    for name, row, prob in zip(images, logits, probs):
        top = prob.topk(5)
        out[name] = {
            "top5": top.indices.tolist(),
            "top5_prob": [round(p, 4) for p in top.values.tolist()],
            "logits_first10": [round(v, 4) for v in row[:10].tolist()],
            "logits_sum": round(row.sum().item(), 4),
        }
    return out


# -- no weights needed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),  # 112 outputs need (112-1)*2+3 = 225 pixels: the extra one goes after
        (225, 3, 2, (1, 1)),  # 113 outputs need 227
        (112, 3, 1, (1, 1)),  # stride 1, odd kernel: symmetric, like padding=k//2
        (112, 5, 1, (2, 2)),
        (6, 5, 2, (1, 2)),    # 3 outputs need 9 pixels: 3 of padding, odd total → 1 before, 2 after
        (7, 5, 2, (2, 2)),    # 4 outputs need 11
        (10, 1, 2, (0, 0)),   # the last stride overshoots: no padding
    ],
)
def test_tf_same_padding_hand_computed(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


def test_tf_same_padding_dilation():
    # dilation 2 makes a 3-kernel span 5 pixels
    assert tf_same_padding(10, 3, 1, dilation=2) == (2, 2)


def test_conv2d_same_pads_bottom_right():
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel_size=3, stride=2, bias=False)
    x = torch.randn(1, 3, 224, 224)
    expected = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    out = conv(x)
    assert out.shape == (1, 4, 112, 112)
    torch.testing.assert_close(out, expected)
    # stride 1 with an odd kernel is PyTorch's symmetric padding
    conv1 = Conv2dSame(3, 4, kernel_size=5, bias=False)
    torch.testing.assert_close(conv1(x), nn.functional.conv2d(x, conv1.weight, padding=2))


def test_preprocess_shape_range_and_scaling():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
    x = preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -127 / 128 and x.max() <= 1.0
    # constant images check the (pixel - 127) / 128 scaling exactly
    for value in (0, 127, 255):
        flat = preprocess(np.full((240, 320, 3), value, dtype=np.uint8), size=64)
        assert flat.shape == (3, 64, 64)
        torch.testing.assert_close(flat, torch.full((3, 64, 64), (value - 127) / 128))
    # a float image in [0, 1] and a PIL image give the same tensor as the uint8 array
    from PIL import Image

    torch.testing.assert_close(preprocess(image.astype(np.float64) / 255), x)
    torch.testing.assert_close(preprocess(Image.fromarray(image)), x)
    with pytest.raises(TypeError):
        preprocess([[0, 1]])


def test_random_init_shapes_and_classifier():
    model = efficientnet_lite0(pretrained=False, num_classes=7).eval()
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS - 1000 * 1281 + 7 * 1281
    x = torch.zeros(2, 3, 224, 224)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, 1280)
    assert model.feature_maps(x).shape == (2, 1280, 7, 7)
    assert model(torch.zeros(1, 3, 250, 231)).shape == (1, 7)  # padding adapts to any size
    # `classifier` is the checkpoint's `_fc`, readable and assignable under both names
    assert model.classifier is model._fc
    model.classifier = nn.Linear(1280, 3)
    assert model._fc.out_features == 3 and "_fc.weight" in model.state_dict()
    assert model(x).shape == (2, 3)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=4, drop_path_rate=0.2)
    rates = [block.drop_path_rate for block in model._blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2 * 15 / 16)  # TF: rate * index / blocks
    x = torch.randn(4, 3, 64, 64)
    model.train()(x).sum().backward()  # stochastic depth and dropout are differentiable
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


# -- real ImageNet weights ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_path() -> Path:
    return _weights_path()


@pytest.fixture(scope="module")
def lite0(weights_path) -> EfficientNetLite0:
    return efficientnet_lite0(state_dict_path=weights_path).eval()


@pytest.fixture(scope="module")
def predictions(lite0) -> dict:
    return _compute_reference(lite0, _sample_images())


@pytest.mark.assets
def test_strict_load_and_parameter_count(weights_path, lite0):
    state = load_state_dict_file(weights_path)
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in lite0.parameters()) == NUM_PARAMETERS
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == NUM_STATE_DICT_VALUES
    # the TF BatchNorm constants, not PyTorch's defaults
    assert lite0._bn0.eps == 1e-3 and lite0._bn0.momentum == pytest.approx(0.01)


@pytest.mark.assets
def test_output_shape(lite0):
    with torch.no_grad():
        assert lite0(torch.zeros(3, 3, 224, 224)).shape == (3, 1000)
        assert lite0.features(torch.zeros(3, 3, 224, 224)).shape == (3, 1280)


@pytest.mark.assets
def test_sample_photos_get_sensible_imagenet_classes(predictions):
    china = predictions["china.jpg"]["top5"]
    flower = predictions["flower.jpg"]["top5"]
    assert china[0] == PALACE
    assert {MONASTERY, BELL_COTE, CASTLE} <= set(china)
    assert flower[0] == DAISY
    assert BEE in flower


@pytest.mark.assets
def test_matches_stored_reference(predictions):
    reference = json.loads(REFERENCE.read_text())["images"]
    assert set(predictions) == set(reference)
    for name, ref in reference.items():
        got = predictions[name]
        assert got["top5"] == ref["top5"], name
        np.testing.assert_allclose(got["top5_prob"], ref["top5_prob"], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(got["logits_first10"], ref["logits_first10"], atol=1e-3, err_msg=name)
        np.testing.assert_allclose(got["logits_sum"], ref["logits_sum"], atol=1e-3, err_msg=name)


@pytest.mark.assets
def test_new_head_keeps_pretrained_backbone(weights_path, lite0):
    model = efficientnet_lite0(num_classes=10, state_dict_path=weights_path).eval()
    assert model.classifier.out_features == 10
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), lite0.features(x))


if __name__ == "__main__":  # regenerate the stored reference (run once, review the diff)
    import sys

    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_efficientnet.py --regenerate")
    model = efficientnet_lite0(state_dict_path=_weights_path())
    payload = {
        "description": "EfficientNet-Lite0 ImageNet-1k predictions on scikit-learn's sample photos, "
        "preprocessed by saftune.models.efficientnet.preprocess (224); logits rounded to 1e-4.",
        "torch": torch.__version__,
        "images": _compute_reference(model, _sample_images()),
    }
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
