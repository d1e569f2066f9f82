"""Dual encoders as classifiers: logits = logit_scale * cos(input embedding, class embedding).

A class embedding is the average of the normalised prompt embeddings over the templates, normalised
again (CLIP's zero-shot recipe). Whenever gradients are enabled (training steps, phase-1 scoring) the
class embeddings are recomputed, so gradients reach the prompt encoder, unless `freeze_prompt_side` says
the prompt side cannot change (linear probe, SAFT on the image encoder only). Without gradients
(`torch.no_grad()`, `torch.inference_mode()`) they are computed once and cached; the cache is dropped by every step with gradients and by every mode
change (`train()` / `eval()`), so an evaluation always sees the current weights.

Learned prompts (CoOp, CoCoOp, MaPLe) go through one API: `attach_prompt_learner` registers the learner
as the submodule `prompt_learner`, switches to the learner's own templates and keeps the hooks that
write its vectors into the encoders; `detach_prompt_learner` undoes all three. A method leaves no other
state on the model.

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
    >>> learner = toy.attach_prompt_learner(torch.nn.Linear(4, 4), templates=["a {}"])
    >>> toy.templates, [n for n, _ in toy.named_parameters() if n.startswith("prompt_learner")]
    (['a {}'], ['prompt_learner.weight', 'prompt_learner.bias'])
    >>> toy.detach_prompt_learner() is learner, toy.prompt_learner, toy.templates
    (True, None, ['{}', 'the {}'])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from saftune.models.base import Classifier

PROMPT_LEARNER = "prompt_learner"  # the one submodule name a learned-prompt method attaches under


class DualEncoderClassifier(Classifier):
    """Base of CLIP-style classifiers. Subclasses implement the three encoder hooks below."""

    prompt_learner: torch.nn.Module | None  # see `attach_prompt_learner`; a registered submodule slot

    def __init__(self):
        super().__init__()
        self._prompts_frozen = False  # see `freeze_prompt_side`
        self.encoding_prompts = False  # True while prompts go through the (possibly shared) encoder: CoOp's cue
        self.head: torch.nn.Linear | None = None  # a linear probe replaces the zero-shot head when attached
        # An empty slot from the start, so attaching fills it and adds no attribute (nn.Module skips None
        # children in parameters(), state_dict() and named_modules()).
        self.register_module(PROMPT_LEARNER, None)
        self._learner_hooks: list[RemovableHandle] = []
        self._learner_templates: list[str] | None = None  # the attached learner's templates, used by set_classes
        self._task_templates: list[str] | None = None  # the templates last asked for, restored on detach
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
        self._task_templates = None if templates is None else list(templates)
        super().set_classes(classnames, self._learner_templates or templates)
        texts = [t.format(c) for c in self.classnames for t in self.templates]
        self._prompt_tokens = self.tokenize_prompts(texts)
        self._class_cache = None

    # -- learned prompts ------------------------------------------------------------------------------
    def attach_prompt_learner(self, learner: torch.nn.Module, *, templates: Sequence[str],
                              hooks: Sequence[RemovableHandle] = ()) -> torch.nn.Module:
        """Attach a learned-prompt module: the one way a method adds prompt state to this model.

        `learner` becomes the submodule `prompt_learner` (its parameters are named `prompt_learner.*` and
        move, save and load with the model); the class prompts switch to `templates` and keep them across
        `set_classes` until `detach_prompt_learner`; `hooks` are the handles of the hooks that write the
        learner's vectors into the encoders, removed on detach. A learner with a method
        `class_embeddings(model, features) -> [B, C, E]` gives each input its own class embeddings
        (CoCoOp); otherwise every input shares the usual (cached) class embeddings.

        Raises a RuntimeError when a learner is already attached (a ValueError for a bad template); the
        `hooks` passed in are then removed, so a refused attach leaves the model as it was.

        Example: see the module docstring (a learner without hooks, only its template).
        """
        if self.prompt_learner is not None:
            for handle in hooks:
                handle.remove()
            raise RuntimeError(f"a prompt learner ({type(self.prompt_learner).__name__}) is already attached to this "
                               "model; call detach_prompt_learner() first")
        self._learner_templates = list(templates)
        try:
            self.set_classes(self.classnames, self._task_templates)
        except BaseException:
            self._learner_templates = None
            for handle in hooks:
                handle.remove()
            raise
        self.register_module(PROMPT_LEARNER, learner)
        self._learner_hooks = list(hooks)
        return learner

    def detach_prompt_learner(self) -> torch.nn.Module | None:
        """Remove the attached prompt learner, its hooks and its templates; return it (None if none was attached).

        The model is then the zero-shot model of the templates last given to `set_classes`.
        """
        learner = self.prompt_learner
        for handle in self._learner_hooks:
            handle.remove()
        self._learner_hooks = []
        self.register_module(PROMPT_LEARNER, None)
        if self._learner_templates is not None:
            self._learner_templates = None
            self.set_classes(self.classnames, self._task_templates)
        return learner

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
        per_input = getattr(self.prompt_learner, "class_embeddings", None)  # CoCoOp: see `attach_prompt_learner`
        if class_embeddings is None and per_input is not None:
            classes = per_input(self, features)  # [B, C, E]
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
