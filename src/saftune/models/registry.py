"""Models by name: `create("minilm")`, `create("hf-clip:openai/clip-vit-base-patch16")`, ...

A spec is "<family>" or "<family>:<argument>". Every entry returns a `Classifier`, which carries its
own preprocessing / tokenizer (`collate`) and works with `classification_loss` as `select_mask`'s
`loss_fn`.

Example:
    >>> sorted(list_models())[:3]
    ['efficientnet-lite0', 'hf-classifier:<path>', 'hf-clip:<path-or-id>']
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from saftune.models.base import Classifier


@dataclass(frozen=True)
class ModelEntry:
    family: str
    build: Callable[..., Classifier]
    help: str
    takes_argument: bool = False


_MODELS: dict[str, ModelEntry] = {}


def register_model(family: str, help: str, takes_argument: bool = False):
    """Decorator: register `build(argument?, **options) -> Classifier` under `family`."""

    def wrap(build):
        if family in _MODELS:
            raise ValueError(f"a model family named {family!r} is already registered")
        _MODELS[family] = ModelEntry(family, build, help, takes_argument)
        return build

    return wrap


def list_models() -> dict[str, str]:
    """Model specs -> help text."""
    return {(f"{e.family}:<{_ARGS.get(e.family, 'path')}>" if e.takes_argument else e.family): e.help
            for e in _MODELS.values()}


_ARGS = {"hf-clip": "path-or-id", "open-clip": "arch/tag"}


def _options(entry: ModelEntry) -> list[str]:
    """The options a model family's builder names (its `**_` only swallows the run seed)."""
    params = list(inspect.signature(entry.build).parameters.values())[1 if entry.takes_argument else 0:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_model(spec: str, options: dict | None = None) -> None:
    """Refuse an unknown model spec or option before any weights load, naming the closest valid one.

    `seed` is always accepted: runs pass it to every model, and models without random parts ignore it.

    Example:
        >>> check_model("tiny-clip", {"sead": 1})
        Traceback (most recent call last):
        ...
        ValueError: model 'tiny-clip' has no option 'sead'; did you mean 'seed'? Its options: seed
    """
    family, sep, argument = spec.partition(":")
    entry = _MODELS.get(family)
    if entry is None:
        close = difflib.get_close_matches(family, _MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {spec!r}.{hint} Known models: {', '.join(list_models())}")
    if entry.takes_argument and not argument:
        raise ValueError(f"model {family!r} needs an argument: {family}:<{_ARGS.get(family, 'path')}>")
    if not entry.takes_argument and sep:
        raise ValueError(f"model {family!r} takes no argument; got {spec!r}")
    known = _options(entry)
    known += [] if "seed" in known else ["seed"]
    for key in options or {}:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ValueError(f"model {family!r} has no option {key!r}{hint} Its options: {', '.join(known)}")


def create(spec: str, **options) -> Classifier:
    """Build the model named by `spec` ("minilm", "hf-clip:<path-or-id>", "tiny-clip", ...)."""
    check_model(spec, options)
    family, _, argument = spec.partition(":")
    entry = _MODELS[family]
    return entry.build(argument, **options) if entry.takes_argument else entry.build(**options)


# ---------------------------------------------------------------------------------------------- entries
@register_model("minilm", "all-MiniLM-L6-v2 sentence encoder as a zero-shot dual encoder (embedded asset)")
def _minilm(scale: float = 30.0, **_):
    from saftune.assets import asset_path

    return _sentence(str(asset_path("minilm")), scale=scale)


@register_model("sentence", "any HF sentence encoder (mean pooling) as a zero-shot dual encoder", takes_argument=True)
def _sentence(path: str, scale: float = 30.0, **_):
    from transformers import AutoModel, AutoTokenizer

    from saftune.models.text import SentenceClassifier

    return SentenceClassifier(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), scale=scale)


@register_model("hf-clip", "transformers CLIPModel from a local directory or hub id", takes_argument=True)
def _hf_clip(path: str, seed: int = 0, **_):
    from saftune.models.clip import load_hf_clip

    return load_hf_clip(path, seed=seed)


@register_model("open-clip", "open_clip model (optional extra: saftune[open-clip])", takes_argument=True)
def _open_clip(spec: str, seed: int = 0, **_):
    from saftune.models.clip import load_open_clip

    return load_open_clip(spec, seed=seed)


@register_model("hf-classifier", "HF encoder with a classification head (BERT/RoBERTa/DeBERTa)", takes_argument=True)
def _hf_classifier(path: str, **_):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from saftune.models.text import SequenceClassifier

    return SequenceClassifier(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path))


@register_model("t5", "T5 with verbalizer templates (class names are the label words)", takes_argument=True)
def _t5(path: str, input_template: str = "{}", **_):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from saftune.models.text import T5VerbalizerClassifier

    return T5VerbalizerClassifier(T5ForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                  input_template=input_template)


@register_model("efficientnet-lite0", "EfficientNet-Lite0 with its ImageNet weights (embedded asset)")
def _efficientnet(seed: int = 0, image_size: int = 224, **_):
    from saftune.models.efficientnet import efficientnet_lite0
    from saftune.models.vision import ImageClassifier

    return ImageClassifier(efficientnet_lite0(pretrained=True), image_size=image_size, seed=seed)


@register_model("tiny-sentence", "tiny random BERT sentence encoder (tests, smoke runs)")
def _tiny_sentence(seed: int = 0, **_):
    from saftune.models.tiny import tiny_sentence

    return tiny_sentence(seed)


@register_model("tiny-clip", "tiny random CLIP (tests, smoke runs)")
def _tiny_clip(seed: int = 0, **_):
    from saftune.models.tiny import tiny_clip

    return tiny_clip(seed)


@register_model("tiny-bert-classifier", "tiny random BERT with a classification head (tests)")
def _tiny_bert(seed: int = 0, **_):
    from saftune.models.tiny import tiny_bert_classifier

    return tiny_bert_classifier(seed)


@register_model("tiny-t5", "tiny random T5 with verbalizers (tests)")
def _tiny_t5(seed: int = 0, **_):
    from saftune.models.tiny import tiny_t5

    return tiny_t5(seed)


@register_model("tiny-cnn", "EfficientNet-Lite0 architecture, random weights, 32px input (tests)")
def _tiny_cnn(seed: int = 0, **_):
    from saftune.models.tiny import tiny_cnn

    return tiny_cnn(seed)
