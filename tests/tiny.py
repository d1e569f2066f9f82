"""Tiny models built in the tests, each with a per-example loss and a few fixed batches.

Every builder returns a `Case(model, loss_fn, batches)`; `loss_fn(model, batch)` returns losses of
shape [B]. Dropout is 0 everywhere so a model is a deterministic function (needed to compare the
engine with a reference trainer step for step). Batches have unequal sizes on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    model: nn.Module
    loss_fn: object
    batches: list


def _labels_from_teacher(x: torch.Tensor, classes: int, generator) -> torch.Tensor:
    teacher = torch.randn(x[0].numel(), classes, generator=generator)
    return (x.reshape(x.shape[0], -1) @ teacher).argmax(-1)


def mlp(seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(40, 6, generator=g)
    y = _labels_from_teacher(x, 3, g)
    batches = [(x[:16], y[:16]), (x[16:28], y[16:28]), (x[28:], y[28:])]
    return Case(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches)


def cnn(seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    x = torch.randn(24, 1, 8, 8, generator=g)
    y = _labels_from_teacher(x, 3, g)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    return Case(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches)


class AttentionNet(nn.Module):
    """Embedding -> nn.MultiheadAttention (fused in_proj_weight, like open_clip) -> mean pool -> head."""

    def __init__(self, vocab=30, dim=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


def mha(seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AttentionNet()
    ids = torch.randint(0, 30, (20, 7), generator=g)
    y = (ids[:, 0] % 3)
    batches = [(ids[:12], y[:12]), (ids[12:], y[12:])]
    return Case(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches)


def bert(seed: int = 0) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    ids = torch.randint(1, 50, (20, 8), generator=g)
    y = ids[:, 1] % 3

    def loss_fn(m, b):
        return F.cross_entropy(m(input_ids=b[0]).logits, b[1], reduction="none")

    return Case(model, loss_fn, [(ids[:12], y[:12]), (ids[12:], y[12:])])


def clip(seed: int = 0) -> Case:
    """Tiny CLIPModel used as a zero-shot classifier: logits = scale * cos(image, class prompt)."""
    from transformers import CLIPConfig, CLIPModel

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                         bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=16, patch_size=8, dropout=0.0, attention_dropout=0.0),
        projection_dim=16,
    )
    model = CLIPModel(config)
    prompts = torch.randint(1, 50, (3, 6), generator=g)  # one tokenised prompt per class
    images = torch.randn(18, 3, 16, 16, generator=g)
    y = _labels_from_teacher(images, 3, g)

    def loss_fn(m, b):
        out = m(input_ids=prompts, pixel_values=b[0])
        return F.cross_entropy(out.logits_per_image, b[1], reduction="none")

    return Case(model, loss_fn, [(images[:10], y[:10]), (images[10:], y[10:])])


def t5(seed: int = 0) -> Case:
    """Tiny T5 with tied input/output embeddings; the loss is the per-example mean token NLL."""
    from transformers import T5Config, T5ForConditionalGeneration

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    model = T5ForConditionalGeneration(config)
    src = torch.randint(1, 40, (12, 7), generator=g)
    tgt = torch.randint(1, 40, (12, 3), generator=g)

    def loss_fn(m, b):
        logits = m(input_ids=b[0], labels=b[1]).logits
        return F.cross_entropy(logits.transpose(1, 2), b[1], reduction="none").mean(1)

    return Case(model, loss_fn, [(src[:7], tgt[:7]), (src[7:], tgt[7:])])


BUILDERS = {"mlp": mlp, "cnn": cnn, "mha": mha, "bert": bert, "clip": clip, "t5": t5}


def all_columns_mask(model: nn.Module):
    """A mask with entries in just over half of every projection's columns, one per column, so that the
    kernels read all of an input's columns (the case in which projections sharing an input share its copy)."""
    from saftune.sparse import SparseMask

    indices, shapes = {}, {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, (out_features, in_features) in ((n, s) for n, s in shapes.items() if n.endswith("_proj.weight")):
        cols = torch.arange(in_features // 2 + 1)
        indices[name] = (cols % out_features) * in_features + cols
    return SparseMask(indices, shapes)
