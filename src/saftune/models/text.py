"""Text models: sentence encoders as dual encoders, encoders with a classification head, T5 with verbalizers.

* `SentenceClassifier`: one encoder (mean pooling, normalised) embeds both the input text and the
  class prompts ("a negative review." / "a positive review."); logits = scale * cosine. This is CLIP's
  zero-shot mechanism with a single shared tower; all-MiniLM-L6-v2 is the embedded real model.
* `SequenceClassifier`: `AutoModelForSequenceClassification` (BERT / RoBERTa / DeBERTa); features are
  the input of its classification head.
* `T5VerbalizerClassifier`: T5 scores each class's label word(s) as the decoder target; the class logit
  is the mean token log-likelihood of its verbalizer (averaged over templates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saftune.models.base import Classifier, PreparedExamples
from saftune.models.zero_shot import DualEncoderClassifier


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict:
    out = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "attention_mask")}


def pad_token_rows(rows: Sequence[Sequence[int]], pad_token_id: int, side: str = "right") -> dict:
    """Token id rows of unequal length -> {"input_ids", "attention_mask"} [B, longest], as a tokenizer pads.

    Example:
        >>> pad_token_rows([[5, 6, 7], [8]], pad_token_id=0)["input_ids"].tolist()
        [[5, 6, 7], [8, 0, 0]]
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


class TokenizedTexts(PreparedExamples):
    """Texts tokenized once, without padding; `batch(indices)` pads the chosen rows like `collate` does.

    `lengths` are token counts, so evaluation batches sentences of similar token length together.

    Example:
        >>> from saftune.models.tiny import HashTokenizer
        >>> texts = TokenizedTexts(HashTokenizer(), ["a long sentence here", "short"], max_length=16)
        >>> texts.lengths, texts.batch([1, 0])["attention_mask"].tolist()
        ([6, 3], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    """

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token (e.g. to its "
                             "eos token) so that batches of unequal length can be padded")
        rows = tokenizer(list(texts), padding=False, truncation=True, max_length=max_length)["input_ids"]
        super().__init__(texts, None, [len(r) for r in rows])
        self.rows = rows
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = tokenizer.padding_side

    def batch(self, indices):
        return pad_token_rows([self.rows[i] for i in indices], self.pad_token_id, self.padding_side)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where attention_mask is 1 (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceClassifier(DualEncoderClassifier):
    """A sentence encoder used as a zero-shot classifier against class prompts.

    Args:
        encoder: a `transformers.AutoModel` (BERT-like) returning `last_hidden_state`.
        tokenizer: its tokenizer.
        scale: logit scale applied to the cosine similarities (30 by default; fixed, not trained).
        max_length: truncation length of inputs and prompts.
    """

    modality = "text"
    # One tower embeds both inputs and prompts, so the "image" (input) and "text" (prompt) scopes coincide.
    scopes = {"image": ["encoder.*"], "text": ["encoder.*"]}

    def __init__(self, encoder: nn.Module, tokenizer, *, scale: float = 30.0, max_length: int = 128):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def _embed(self, tokens: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return mean_pool(hidden, tokens["attention_mask"])

    def tokenize_prompts(self, texts):
        return _tokenize(self.tokenizer, texts, self.max_length)

    def encode_prompts(self, tokens):
        return self._embed(tokens)

    def encode_inputs(self, batch):
        return self._embed(batch)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale

    def collate(self, examples, labels=None, *, train=False):
        batch = _tokenize(self.tokenizer, examples, self.max_length)
        if labels is not None:
            batch["labels"] = _labels(labels)
        return batch

    def prepare(self, examples):
        return TokenizedTexts(self.tokenizer, examples, self.max_length)

    @property
    def prompt_token_embedding(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()


class SequenceClassifier(Classifier):
    """`AutoModelForSequenceClassification` with its tokenizer; `set_classes` sizes the head.

    A head whose size differs from the number of classes is replaced by a fresh linear layer (train it
    first with the `lp` method, as the paper's NLP recipe does, or fine-tune it with the rest).
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 128):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        # "image" is the input encoder (here: the whole model, head included); "head" the classifier
        self.scopes = {"image": ["model.*"], "head": [f"model.{self._head_name()}.*"]}

    def _head_name(self) -> str:
        for name in ("classifier", "score"):
            if isinstance(getattr(self.model, name, None), nn.Module):
                return name
        raise ValueError(f"{type(self.model).__name__} has no `classifier` or `score` head module")

    def _head(self) -> nn.Module:
        return getattr(self.model, self._head_name())

    def set_classes(self, classnames, templates=None) -> None:
        super().set_classes(classnames, templates)
        head = self._head()
        final = head if isinstance(head, nn.Linear) else getattr(head, "out_proj", None)
        if isinstance(final, nn.Linear) and final.out_features != len(classnames):
            new = nn.Linear(final.in_features, len(classnames)).to(final.weight.device, final.weight.dtype)
            if final is head:
                setattr(self.model, self._head_name(), new)
            else:
                head.out_proj = new
            self.model.config.num_labels = len(classnames)

    def collate(self, examples, labels=None, *, train=False):
        batch = _tokenize(self.tokenizer, examples, self.max_length)
        if labels is not None:
            batch["labels"] = _labels(labels)
        return batch

    def prepare(self, examples):
        return TokenizedTexts(self.tokenizer, examples, self.max_length)

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def linear_head(self) -> nn.Linear:
        head = self._head()
        if not isinstance(head, nn.Linear):  # e.g. RoBERTa's dense + out_proj head: not linear in the features
            return super().linear_head()
        return head

    def features(self, batch):
        captured = {}

        def grab(module, args):
            captured["x"] = args[0]

        handle = self._head().register_forward_pre_hook(grab)
        try:
            self.forward(batch)
        finally:
            handle.remove()
        x = captured["x"]
        return x[:, 0] if x.dim() == 3 else x  # heads that take the whole sequence use its first token


class T5VerbalizerClassifier(Classifier):
    """T5 as a classifier: the logit of class c is the mean log-likelihood of its label word(s).

    Args:
        model: a `T5ForConditionalGeneration`.
        tokenizer: its tokenizer.
        input_template: wraps each input text, e.g. "sst2 sentence: {}".
        max_length: truncation length of inputs.

    `set_classes(["negative", "positive"], ["{}"])`: class names are the verbalizers; templates wrap
    them ("{}" uses the word itself) and are averaged.
    """

    modality = "text"
    scopes = {"image": ["model.encoder.*"], "text": ["model.decoder.*", "model.lm_head.*"], "head": ["model.lm_head.*"]}

    def __init__(self, model: nn.Module, tokenizer, *, input_template: str = "{}", max_length: int = 128):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.input_template = input_template
        self.max_length = max_length
        self._targets: torch.Tensor | None = None

    def set_classes(self, classnames, templates=None) -> None:
        super().set_classes(classnames, templates)
        words = [t.format(c) for c in self.classnames for t in self.templates]
        tokens = self.tokenizer(words, padding=True, return_tensors="pt")
        ids = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)  # -100: ignored positions
        self._targets = ids

    def collate(self, examples, labels=None, *, train=False):
        batch = _tokenize(self.tokenizer, [self.input_template.format(x) for x in examples], self.max_length)
        if labels is not None:
            batch["labels"] = _labels(labels)
        return batch

    def prepare(self, examples):
        return TokenizedTexts(self.tokenizer, [self.input_template.format(x) for x in examples], self.max_length)

    def forward(self, batch):
        if self._targets is None:
            raise RuntimeError("call set_classes(classnames) before using the classifier")
        encoder_out = self.model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = self._targets.to(batch["input_ids"].device)  # [C*T, L]
        b, k = batch["input_ids"].shape[0], targets.shape[0]
        hidden = encoder_out.last_hidden_state.repeat_interleave(k, 0)
        mask = batch["attention_mask"].repeat_interleave(k, 0)
        labels = targets.repeat(b, 1)  # [B*K, L]
        logits = self.model(encoder_outputs=(hidden,), attention_mask=mask, labels=labels).logits
        token_ll = -F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none", ignore_index=-100)
        counts = (labels != -100).sum(1).clamp_min(1)
        scores = (token_ll.sum(1) / counts).view(b, len(self.classnames), len(self.templates))
        return scores.mean(-1)

    def features(self, batch):
        hidden = self.model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])
