"""Dual encoders as classifiers: logits = logit_scale * cos(input embedding, class embedding).

A class embedding is the average of the normalised prompt embeddings over the templates, normalised
again (CLIP's zero-shot recipe). Whenever gradients are enabled (training steps, phase-1 scoring) the
class embeddings are recomputed, so gradients reach the prompt encoder, unless `freeze_prompt_side` says
the prompt side cannot change (linear probe, SAFT on the image encoder only). Without gradients
(`torch.no_grad()`, `torch.inference_mode()`) they are computed once and cached; the cache is dropped by every step with gradients and by every mode
change (`train()` / `eval()`), so an evaluation always sees the current weights.

Example (a toy dual encoder with bag-of-words "encoders"):
    >>> import torch
    >>> class Toy(DualEncoderClassifier):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.EmbeddingBag(10, 4)
    ...     def tokenize_prompts(self, texts):
    ...         return {"ids": torch.tensor([[len(t) % 10] for t in texts])}
    ...     def encode_prompts(self, tokens):
    ...         return self.emb(tokens["ids"])
    ...     def encode_inputs(self, batch):
    ...         return self.emb(batch["ids"])
    >>> toy = Toy(); toy.set_classes(["a", "bb"], ["{}", "the {}"])
    >>> toy({"ids": torch.tensor([[1], [2]])}).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from saftune.models.base import Classifier


class DualEncoderClassifier(Classifier):
    """Base of CLIP-style classifiers. Subclasses implement the three encoder hooks below."""

    def __init__(self):
        super().__init__()
        self._prompts_frozen = False  # see `freeze_prompt_side`
        self.encoding_prompts = False  # True while prompts go through the (possibly shared) encoder: CoOp's cue
        self.head: torch.nn.Linear | None = None  # a linear probe replaces the zero-shot head when attached
        self.fixed_templates: list[str] | None = None  # learned prompts (CoOp) keep their own template
        # CoCoOp: a module whose `class_embeddings(model, features)` gives each input its own class
        # embeddings [B, C, E]; None: one set of class embeddings for every input
        self.conditional_prompts: torch.nn.Module | None = None
        self._prompt_tokens: dict | None = None
        self._class_cache: torch.Tensor | None = None

    # -- hooks for subclasses ---------------------------------------------------------------------
    def tokenize_prompts(self, texts: Sequence[str]) -> dict:
        """Prompt texts -> token tensors for `encode_prompts`."""
        raise NotImplementedError

    def encode_prompts(self, tokens: dict) -> torch.Tensor:
        """Token tensors -> prompt embeddings [P, E] (unnormalised)."""
        raise NotImplementedError

    def encode_inputs(self, batch: dict) -> torch.Tensor:
        """A batch -> input embeddings [B, E] (unnormalised)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        """Multiplier of the cosine similarities (CLIP: exp of its learned temperature)."""
        return torch.tensor(100.0)

    # -- the zero-shot head -------------------------------------------------------------------------
    def freeze_prompt_side(self, frozen: bool = True) -> None:
        """Declare that training cannot change the class prompts' embeddings (a linear probe, SAFT without
        selected entries on the prompt side): they are then computed once and cached, also in training."""
        self._prompts_frozen = frozen
        self._class_cache = None

    def set_classes(self, classnames, templates=None) -> None:
        if self.head is not None and self.head.out_features != len(classnames):
            raise ValueError(
                f"this classifier has a trained linear head for {self.head.out_features} classes; it cannot switch "
                f"to {len(classnames)} classes (set `head = None` to go back to the zero-shot head)"
            )
        super().set_classes(classnames, self.fixed_templates or templates)
        texts = [t.format(c) for c in self.classnames for t in self.templates]
        self._prompt_tokens = self.tokenize_prompts(texts)
        self._class_cache = None

    def prompt_tokens(self) -> dict:
        if self._prompt_tokens is None:
            raise RuntimeError("call set_classes(classnames, templates) before using the classifier")
        device = next(self.parameters()).device
        return {k: v.to(device) for k, v in self._prompt_tokens.items()}

    def embed_prompts(self, tokens: dict) -> torch.Tensor:
        """Normalised prompt embeddings [P, E], with `encoding_prompts` set while the encoder runs."""
        self.encoding_prompts = True
        try:
            return F.normalize(self.encode_prompts(tokens).float(), dim=-1)
        finally:
            self.encoding_prompts = False

    def compute_class_embeddings(self) -> torch.Tensor:
        """[C, E] normalised class embeddings: mean over templates of normalised prompt embeddings."""
        prompts = self.embed_prompts(self.prompt_tokens())
        per_class = prompts.view(len(self.classnames), len(self.templates), -1).mean(1)
        return F.normalize(per_class, dim=-1)

    def class_embeddings(self) -> torch.Tensor:
        """Class embeddings: recomputed whenever gradients are on (training, phase-1 scoring), cached otherwise."""
        if torch.is_grad_enabled() and not self._prompts_frozen:
            self._class_cache = None  # a step with gradients may change the prompt encoder
            return self.compute_class_embeddings()
        if self._class_cache is None:
            # Never an inference tensor, even when evaluation runs under `torch.inference_mode`: with frozen
            # prompts the cache is used again by training steps, and autograd cannot save inference tensors.
            with torch.inference_mode(False), torch.no_grad():
                self._class_cache = self.compute_class_embeddings()
        return self._class_cache

    def train(self, mode: bool = True):
        self._class_cache = None  # weights may have changed since the cache was filled
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._class_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    # -- classifier interface ---------------------------------------------------------------------
    def features(self, batch: dict) -> torch.Tensor:
        return F.normalize(self.encode_inputs(batch).float(), dim=-1)

    def logits_from_features(self, features: torch.Tensor, class_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if self.head is not None:
            return self.head(features)
        if class_embeddings is None and self.conditional_prompts is not None:
            classes = self.conditional_prompts.class_embeddings(self, features)  # [B, C, E]
            return self.logit_scale * torch.einsum("be,bce->bc", features, classes)
        classes = self.class_embeddings() if class_embeddings is None else class_embeddings
        return self.logit_scale * features @ classes.T

    def forward(self, batch: dict) -> torch.Tensor:
        return self.logits_from_features(self.features(batch))

    def linear_head(self) -> torch.nn.Linear:
        """Attach (once) and return a linear head on the features, initialised to the zero-shot head.

        Its weight is logit_scale * class embeddings and its bias zero, so before training it gives the
        zero-shot logits exactly (the linear probe's initialisation in the paper's LP/LP-FT baselines).
        """
        if self.head is None:
            with torch.no_grad():
                weight = (self.logit_scale.detach().float() * self.compute_class_embeddings()).clone()
            device = next(self.parameters()).device
            self.head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(device)
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.zero_()
        return self.head
