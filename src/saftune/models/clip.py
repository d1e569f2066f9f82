"""CLIP as a zero-shot classifier: `transformers.CLIPModel` by default, open_clip optionally.

Both encoders are trainable; logits = exp(logit_scale) * cos(image, class prompt). Images are
preprocessed with PIL + numpy (`saftune.models.transforms`), never torchvision.

Example (a tiny random CLIP built from a config):
    >>> import numpy as np, torch
    >>> from transformers import CLIPConfig, CLIPModel
    >>> cfg = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                  intermediate_size=37, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
    ...                  vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                  intermediate_size=37, image_size=16, patch_size=8), projection_dim=8)
    >>> clf = HFCLIPClassifier(CLIPModel(cfg), tokenizer=lambda texts: {"input_ids": torch.ones(len(texts), 4, dtype=torch.long)})
    >>> clf.set_classes(["cat", "dog"], ["a photo of a {}."])
    >>> clf.forward(clf.collate([np.zeros((16, 16, 3), np.uint8)], [0])).shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from saftune.models.base import collate_images
from saftune.models.transforms import CLIP_MEAN, CLIP_STD, clip_preprocess, clip_train_transform
from saftune.models.zero_shot import DualEncoderClassifier

logger = logging.getLogger(__name__)


def _pooled(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


class HFCLIPClassifier(DualEncoderClassifier):
    """A `transformers.CLIPModel` used as a zero-shot classifier.

    Args:
        clip: the CLIPModel.
        tokenizer: callable texts -> {"input_ids", "attention_mask"} tensors (a HF tokenizer works).
        image_size: input resolution (default: the model's vision config).
        mean, std: normalisation (CLIP's by default).
        seed: seed of the training augmentation (random resized crop + flip).
    """

    modality = "image"
    scopes = {
        "image": ["clip.vision_model.*", "clip.visual_projection.*"],
        "text": ["clip.text_model.*", "clip.text_projection.*"],
        "head": ["clip.logit_scale"],
    }

    def __init__(self, clip, tokenizer: Callable, *, image_size: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, seed: int = 0):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        size = image_size or clip.config.vision_config.image_size
        self.eval_transform = clip_preprocess(size, mean, std)
        self.train_transform = clip_train_transform(size, mean=mean, std=std, seed=seed)

    def tokenize_prompts(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt") \
            if hasattr(self.tokenizer, "model_max_length") else self.tokenizer(list(texts))
        return {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def encode_prompts(self, tokens):
        return _pooled(self.clip.get_text_features(**tokens))

    def encode_inputs(self, batch):
        return _pooled(self.clip.get_image_features(pixel_values=batch["pixel_values"]))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def collate(self, examples, labels=None, *, train=False):
        return collate_images(examples, labels, self.train_transform if train else self.eval_transform)

    @property
    def prompt_token_embedding(self) -> torch.nn.Embedding:
        """The prompt encoder's token embedding (CoOp replaces context-token embeddings here)."""
        return self.clip.text_model.embeddings.token_embedding


def load_hf_clip(path_or_id: str, *, seed: int = 0) -> HFCLIPClassifier:
    """A CLIPModel from a local directory or a hub id (the hub needs network; local dirs work offline)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(path_or_id)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    image_processor_mean, image_processor_std = CLIP_MEAN, CLIP_STD
    try:  # honour the checkpoint's own normalisation when it ships a preprocessor config
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path_or_id)
        image_processor_mean, image_processor_std = processor.image_mean, processor.image_std
    except Exception as e:  # noqa: BLE001 - any failure means: keep CLIP's defaults
        logger.info("no image processor config for %s (%s); using CLIP's mean/std", path_or_id, e)
    return HFCLIPClassifier(clip, tokenizer, mean=image_processor_mean, std=image_processor_std, seed=seed)


class OpenCLIPClassifier(DualEncoderClassifier):
    """An open_clip model (`open_clip.create_model_and_transforms`) used as a zero-shot classifier.

    Its text and image towers use `nn.MultiheadAttention` with a fused `in_proj_weight`; the sparse
    engine trains selected entries of it through the gradient-hook path.
    """

    modality = "image"
    scopes = {
        "image": ["model.visual.*"],
        "text": ["model.transformer.*", "model.token_embedding.*", "model.positional_embedding",
                 "model.ln_final.*", "model.text_projection"],
        "head": ["model.logit_scale"],
    }

    def __init__(self, model, tokenizer, *, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, seed: int = 0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.eval_transform = clip_preprocess(image_size, mean, std)
        self.train_transform = clip_train_transform(image_size, mean=mean, std=std, seed=seed)

    def tokenize_prompts(self, texts):
        return {"text": self.tokenizer(list(texts))}

    def encode_prompts(self, tokens):
        return self.model.encode_text(tokens["text"])

    def encode_inputs(self, batch):
        return self.model.encode_image(batch["pixel_values"])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    collate = HFCLIPClassifier.collate

    @property
    def prompt_token_embedding(self) -> torch.nn.Embedding:
        return self.model.token_embedding


def load_open_clip(spec: str, *, seed: int = 0) -> OpenCLIPClassifier:
    """`spec` = "<arch>/<pretrained tag or checkpoint path>", e.g. "ViT-B-16/openai"."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "open_clip is not installed: pip install 'saftune[open-clip]' (it needs a torchvision build that "
            "matches your torch)"
        ) from e
    arch, _, pretrained = spec.partition("/")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    return OpenCLIPClassifier(model, open_clip.get_tokenizer(arch), image_size=size, mean=mean, std=std, seed=seed)
