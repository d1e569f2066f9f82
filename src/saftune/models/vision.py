"""Image classifiers with a trained head (EfficientNet-Lite0 and any `nn.Module` with `features` + head).

Example:
    >>> import numpy as np
    >>> from saftune.models.efficientnet import efficientnet_lite0
    >>> clf = ImageClassifier(efficientnet_lite0(pretrained=False), image_size=64)
    >>> clf.set_classes([str(d) for d in range(10)])   # a new 10-way head
    >>> clf(clf.collate([np.zeros((28, 28), np.uint8)], [3])).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from torch import nn

from saftune.models.base import Classifier, collate_images
from saftune.models.transforms import clip_preprocess, clip_train_transform


class ImageClassifier(Classifier):
    """A CNN with `features(x) -> [B, E]`, a `classifier` linear head, and a preprocessing function.

    `set_classes` with a class count different from the head's replaces the head with a fresh linear
    layer (train it with `lp`, or `lpft` for the paper's linear-probe-then-fine-tune recipe).

    Args:
        network: e.g. `efficientnet_lite0()`; must expose `features`, `classifier` and `reset_classifier`.
        image_size: input side.
        pixel_mean, pixel_std: normalisation on 0..1 pixels (EfficientNet-Lite: (x*255-127)/128).
        seed: seed of the training augmentation.
    """

    modality = "image"
    scopes = {"image": ["network.*"], "head": ["network._fc.*"]}

    def __init__(self, network: nn.Module, *, image_size: int = 224, pixel_mean=(127 / 255,) * 3,
                 pixel_std=(128 / 255,) * 3, seed: int = 0):
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.eval_transform = clip_preprocess(image_size, pixel_mean, pixel_std)
        self.train_transform = clip_train_transform(image_size, scale=(0.8, 1.0), hflip=False, mean=pixel_mean,
                                                    std=pixel_std, seed=seed)

    def set_classes(self, classnames, templates=None) -> None:
        super().set_classes(classnames, templates)
        if self.network.classifier.out_features != len(classnames):
            self.network.reset_classifier(len(classnames))

    def collate(self, examples, labels=None, *, train=False):
        return collate_images(examples, labels, self.train_transform if train else self.eval_transform)

    def features(self, batch):
        return self.network.features(batch["pixel_values"])

    def linear_head(self) -> nn.Linear:
        return self.network.classifier

    def forward(self, batch):
        return self.network(batch["pixel_values"])
