"""CLIP image preprocessing with PIL + numpy (no torchvision), and image loading that names bad files.

Evaluation uses `clip_preprocess`: resize the shorter side to `size` with bicubic resampling, center
crop `size` x `size`, scale to [0, 1], normalise with CLIP's mean and std. For PIL input this matches
OpenAI CLIP's own `preprocess` (torchvision's `Resize` on a PIL image calls PIL's bicubic resize).
Training uses `clip_train_transform`: a random resized crop and a horizontal flip, reproducible from a
`numpy.random.Generator`.

Every transform accepts a PIL image, a path to an image file, or a uint8 array (H x W grayscale,
H x W x 1, H x W x 3, H x W x 4), and returns a float32 tensor of shape [3, size, size].

Example:
    >>> import numpy as np
    >>> pre = clip_preprocess(size=32)
    >>> x = pre(np.full((40, 60, 3), 128, dtype=np.uint8))
    >>> tuple(x.shape), x.dtype
    ((3, 32, 32), torch.float32)
    >>> round(float(x[0, 0, 0]), 4)  # (128/255 - 0.48145466) / 0.26862954
    0.0763
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: OpenAI CLIP's per-channel normalisation (RGB), used by every CLIP checkpoint and by open_clip.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Default scale range of `clip_train_transform`'s random resized crop: open_clip's training transform
#: (and the robust fine-tuning recipes built on it, WiSE-FT / FLYP) crops 90-100% of the image area.
#: CoOp-style few-shot code uses the torchvision default (0.08, 1.0); pass that for heavier cropping.
CLIP_TRAIN_SCALE = (0.9, 1.0)


class BadImageError(ValueError):
    """An image file is missing, unreadable, truncated or not an image. `path` names the file."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {str(self.path)!r}: {reason}")


# ---------------------------------------------------------------------------------------------------
# loading


def load_image(path: str | os.PathLike, skip_bad: bool = False) -> Image.Image | None:
    """Open and fully decode an image file as RGB.

    PIL opens files lazily, so a truncated JPEG would only fail later inside a data loader worker with
    a message that does not say which file; decoding here makes the error name the file.

    Args:
        path: image file.
        skip_bad: return None (and log a warning) instead of raising for an unreadable file.

    Returns:
        The RGB image, or None when `skip_bad` and the file is bad.

    Raises:
        BadImageError: the file is missing, unreadable, truncated or not an image (unless `skip_bad`).

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "bad.jpg"
        >>> _ = bad.write_bytes(b"not an image")
        >>> load_image(bad, skip_bad=True) is None
        True
    """
    try:
        # Open through our own file handle: the image, once decoded, outlives it (Image.close would
        # drop the decoded pixels too).
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        # OSError covers missing files, permission errors and "image file is truncated";
        # SyntaxError / ValueError are what some PIL decoders raise on malformed headers.
        err = BadImageError(path, f"{type(e).__name__}: {e}")
        if not skip_bad:
            raise err from e
        logger.warning("skipping %s", err)
        return None


@dataclass
class LoadedImages:
    """Result of `load_images`: the images that could be read and which inputs they came from.

    Attributes:
        images: loaded (and transformed, when a transform was given) images, in input order.
        kept: index into the input list of each entry of `images`.
        skipped: paths that could not be read.
    """

    images: list
    kept: list[int]
    skipped: list[Path] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def load_images(paths: Sequence, transform: Callable | None = None, skip_bad: bool = False) -> LoadedImages:
    """Load several images, either failing on the first bad file or skipping bad ones with a count.

    Args:
        paths: image files (or anything `transform` accepts: arrays and PIL images pass through).
        transform: applied to each loaded RGB image (e.g. `clip_preprocess()`); None keeps PIL images.
        skip_bad: skip unreadable files; their number is logged once and returned in `skipped`.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (4, 4)).save(d / "ok.png")
        >>> _ = (d / "bad.png").write_bytes(b"junk")
        >>> out = load_images([d / "ok.png", d / "bad.png"], skip_bad=True)
        >>> out.kept, out.num_skipped
        ([0], 1)
    """
    images, kept, skipped = [], [], []
    for i, p in enumerate(paths):
        if isinstance(p, (str, os.PathLike)):
            img = load_image(p, skip_bad=True) if skip_bad else load_image(p)
            if img is None:
                skipped.append(Path(p))
                continue
        else:
            img = p
        images.append(transform(img) if transform is not None else img)
        kept.append(i)
    if skipped:
        logger.warning(
            "skipped %d of %d images that could not be read (first: %s)", len(skipped), len(paths), skipped[0]
        )
    return LoadedImages(images, kept, skipped)


def drop_bad_images(split):
    """Check that every image of a `Split` decodes; return the split without bad ones and their count.

    Reads every file once, so use it to validate a dataset copy, not inside a training loop.

    Returns:
        (split with only readable images, number skipped).
    """
    result = load_images(split.inputs, transform=lambda img: None, skip_bad=True)
    return split.subset(result.kept), result.num_skipped


# ---------------------------------------------------------------------------------------------------
# conversion


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on black, as CLIP's convert("RGB") does (it drops alpha).
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def to_rgb_image(image) -> Image.Image:
    """A PIL RGB image from a PIL image, an image file path, or a uint8 array.

    Arrays: H x W (grayscale), H x W x 1, H x W x 3 (RGB) or H x W x 4 (RGBA, alpha dropped).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0-255), got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            return Image.fromarray(image).convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return _to_rgb(Image.fromarray(np.ascontiguousarray(image)))
        raise ValueError(f"image arrays must be H x W or H x W x {{1, 3, 4}}, got shape {image.shape}")
    raise TypeError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")


def _normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], (x / 255 - mean) / std per channel."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), keeping the aspect ratio.

    The longer side is truncated, `int(size * long / short)`, as torchvision's `Resize(int)` does, so
    crops line up pixel for pixel with CLIP's reference preprocessing.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central `size` x `size` window (offsets rounded as torchvision's `CenterCrop`)."""
    w, h = img.size
    if w < size or h < size:
        # Only reachable when resize was skipped; pad like torchvision (zeros) so the shape is right.
        padded = Image.new(img.mode, (max(w, size), max(h, size)))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------------
# transforms


@dataclass
class ClipPreprocess:
    """Evaluation preprocessing: resize shorter side (bicubic), center crop, RGB, /255, normalise."""

    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __call__(self, image) -> torch.Tensor:
        # Convert to RGB before resizing: PIL resizes palette ("P") and 1-bit images with nearest
        # neighbour whatever filter is asked for. For RGB input the order makes no difference.
        img = to_rgb_image(image)
        return _normalize(center_crop(resize_shorter(img, self.size), self.size), self.mean, self.std)


def clip_preprocess(
    size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> ClipPreprocess:
    """CLIP's evaluation transform: image -> float32 tensor [3, size, size].

    Args:
        size: output side (224 for ViT-B/16 and ViT-L/14, 336 for ViT-L/14@336px).
        mean, std: per-channel normalisation; CLIP's by default.

    Example:
        >>> from PIL import Image
        >>> clip_preprocess(224)(Image.new("RGB", (320, 240))).shape
        torch.Size([3, 224, 224])
    """
    if int(size) <= 0:
        raise ValueError(f"size must be a positive integer, got {size}")
    return ClipPreprocess(int(size), tuple(mean), tuple(std))


@dataclass
class ClipTrainTransform:
    """Training augmentation: random resized crop (bicubic) + optional horizontal flip, then normalise.

    Randomness comes from `rng` (a `numpy.random.Generator`), or from a generator passed per call, so
    a run is reproducible. A data loader with several workers copies the transform into each worker
    with the same state: reseed per worker (`reseed(base_seed + worker_id)` in `worker_init_fn`) or
    pass a per-example generator.
    """

    size: int = 224
    scale: tuple = CLIP_TRAIN_SCALE
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    def reseed(self, seed: int) -> None:
        """Restart the random stream from `seed`."""
        self.rng = np.random.default_rng(seed)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) of a random crop covering `scale` of the area at an
        aspect ratio drawn log-uniformly from `ratio`; after 10 failed draws, the largest central crop
        whose aspect ratio lies in `ratio` (the usual RandomResizedCrop rule)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = self.rng if rng is None else rng
        img = to_rgb_image(image)
        left, top, w, h = self.crop_box(*img.size, rng)
        # resize(box=...) crops and resamples in one pass, without materialising the crop.
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _normalize(img, self.mean, self.std)


def clip_train_transform(
    size: int = 224,
    scale: tuple[float, float] = CLIP_TRAIN_SCALE,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    seed: int | None = 0,
    generator: np.random.Generator | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ClipTrainTransform:
    """CLIP fine-tuning augmentation: random resized crop + horizontal flip -> tensor [3, size, size].

    Args:
        size: output side.
        scale: range of the crop's share of the image area. Default (0.9, 1.0), open_clip's training
            transform (used by WiSE-FT / FLYP style full fine-tuning); CoOp few-shot code uses (0.08, 1.0).
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        hflip: flip horizontally with probability 0.5.
        seed: seed of the transform's own generator (ignored when `generator` is given).
        generator: a `numpy.random.Generator` to draw from (shared with the caller, not copied).

    Example:
        >>> import numpy as np
        >>> t = clip_train_transform(32, seed=0)
        >>> img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        >>> a = t(img, rng=np.random.default_rng(7)); b = t(img, rng=np.random.default_rng(7))
        >>> bool((a == b).all()), tuple(a.shape)
        (True, (3, 32, 32))
    """
    if int(size) <= 0:
        raise ValueError(f"size must be a positive integer, got {size}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
    rng = generator if generator is not None else np.random.default_rng(seed)
    return ClipTrainTransform(int(size), tuple(scale), tuple(ratio), bool(hflip), tuple(mean), tuple(std), rng)
