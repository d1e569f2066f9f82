"""Tiny random models for smoke tests and CI: real architectures, hidden size 32, two layers, no files.

They use `HashTokenizer`, a dependency-free word tokenizer, so they work without any downloaded asset.
Their accuracy means nothing; they exercise every code path in seconds.

Example:
    >>> tok = HashTokenizer(vocab_size=100)
    >>> tok(["a good film", "bad"], padding=True, return_tensors="pt")["input_ids"].shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import zlib

import torch


class HashTokenizer:
    """Lower-cased words hashed into `vocab_size` ids; [CLS]=1 first, [SEP]=2 last, [PAD]=0."""

    model_max_length = 64
    pad_token_id = 0
    padding_side = "right"

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        words = text.lower().replace(".", " .").split()
        return [1] + [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words] + [2]

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        limit = max_length or self.model_max_length
        rows = [self._ids(t)[:limit] for t in texts]
        if not padding:  # lists of ids, as a transformers tokenizer returns them unpadded
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_sentence(seed: int = 0):
    from transformers import BertConfig, BertModel

    from saftune.models.text import SentenceClassifier

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    # Truncate to the position table: a longer sentence (some Amazon snippets) would not fit it.
    return SentenceClassifier(BertModel(config, add_pooling_layer=False), HashTokenizer(128),
                              max_length=config.max_position_embeddings)


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    from saftune.models.clip import HFCLIPClassifier

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return HFCLIPClassifier(CLIPModel(config), HashTokenizer(128), seed=seed)


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    from saftune.models.text import SequenceClassifier

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SequenceClassifier(BertForSequenceClassification(config), HashTokenizer(128))


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    from saftune.models.text import T5VerbalizerClassifier

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0)
    return T5VerbalizerClassifier(T5ForConditionalGeneration(config), HashTokenizer(128))


def tiny_cnn(seed: int = 0):
    from saftune.models.efficientnet import efficientnet_lite0
    from saftune.models.vision import ImageClassifier

    torch.manual_seed(seed)
    return ImageClassifier(efficientnet_lite0(pretrained=False, num_classes=10), image_size=32, seed=seed)
