"""Models by name: `create("minilm")`, `create("hf-clip:openai/clip-vit-base-patch16")`, ...

A spec is "<family>" or "<family>:<argument>". Every family declares its options as a `Config`
dataclass (type, default, help, validation) deriving from `ModelOptions`, whose `seed` every run
passes; `create` turns keyword options into it with `Config.from_dict`, so an unknown option is
refused with the closest valid name before any weights load. Every entry returns a `Classifier`,
which carries its own preprocessing / tokenizer (`collate`) and works with `classification_loss` as
`select_mask`'s `loss_fn`.

Example:
    >>> sorted(list_models())[:3]
    ['causal-lm:<path-or-id>', 'efficientnet-lite0', 'hf-classifier:<path>']
    >>> [row[0] for row in model_options_class("minilm").describe()]
    ['seed', 'quantize', 'scale']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saftune._io import did_you_mean
from saftune.config import Config, option
from saftune.models.base import Classifier


@dataclass
class ModelOptions(Config):
    """Options every model family has. Runs always pass their seed."""

    seed: int = option(0, "seed of the model's random parts (training augmentation, tiny random weights); runs "
                       "pass their seed, models without random parts ignore it", low=0)
    quantize: str | None = option(None, "freeze the nn.Linear weights as torchao weight-only int8 or 4-bit NF4 (QLoRA's "
                                  "format; needs saftune[quant]); SAFT then trains its entries beside them",
                                  choices=(None, "int8", "nf4"))


@dataclass
class SentenceOptions(ModelOptions):
    """A sentence encoder as a zero-shot dual encoder."""

    scale: float = option(30.0, "logit scale: cosine similarities to the class prompts are multiplied by it",
                          low=0.0, low_open=True)


@dataclass
class T5Options(ModelOptions):
    """T5 scoring class names as label words."""

    input_template: str = option("{}", "how an input text is wrapped before T5 reads it; {} is the text")


@dataclass
class ImageModelOptions(ModelOptions):
    """An image classifier with its own input resolution."""

    image_size: int = option(224, "input side in pixels", low=1)


@dataclass
class CausalLMOptions(ModelOptions):
    """A decoder-only language model (see `saftune.models.causal_lm`)."""

    dtype: str = option("float32", "weight dtype", choices=("float32", "bfloat16"))
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, more time)")
    max_length: int | None = option(None, "longest sequence fed to the model (default: its context length)", low=2)
    use_chat_template: bool = option(True, "wrap prompts in the tokenizer's chat template when it has one")


@dataclass
class CausalLMFileOptions(CausalLMOptions):
    """A causal LM from a directory, hub id or GGUF file."""

    gguf_file: str | None = option(None, "name of a .gguf file inside the directory given as the argument")


@dataclass
class TinyLMOptions(ModelOptions):
    """A tiny random causal LM."""

    chat_template: bool = option(False, "attach a ChatML chat template to the byte tokenizer")


@dataclass(frozen=True)
class ModelEntry:
    family: str
    build: Callable[..., Classifier]
    help: str
    options: type[ModelOptions]
    argument: str | None = None  # what follows "family:" in a spec ("path", "path-or-id"); None: no argument

    @property
    def spec(self) -> str:
        return f"{self.family}:<{self.argument}>" if self.argument else self.family


_MODELS: dict[str, ModelEntry] = {}


def register_model(family: str, help: str, options: type[ModelOptions] = ModelOptions, argument: str | None = None):
    """Decorator: register `build(argument, options)` (or `build(options)` without argument) under `family`.

    Args:
        family: the spec's name part.
        help: one line for `saftune list models`.
        options: the family's options dataclass (a `ModelOptions`, so that it takes the run seed).
        argument: the name of the spec's argument ("path", "path-or-id", "arch/tag"); None: the family
            takes none.
    """
    if not (isinstance(options, type) and issubclass(options, ModelOptions)):
        raise TypeError(f"model {family!r}: options must be a ModelOptions dataclass, got {options!r}")

    def wrap(build):
        if family in _MODELS:
            raise ValueError(f"a model family named {family!r} is already registered")
        _MODELS[family] = ModelEntry(family, build, help, options, argument)
        return build

    return wrap


def list_models() -> dict[str, str]:
    """Model specs -> help text."""
    return {e.spec: e.help for e in _MODELS.values()}


def _entry(spec: str) -> ModelEntry:
    family = spec.partition(":")[0]
    entry = _MODELS.get(family)
    if entry is None:
        hint = did_you_mean(family, _MODELS)
        raise ValueError(f"unknown model {spec!r}.{hint} Known models: {', '.join(list_models())}")
    return entry


def model_options_class(spec: str) -> type[ModelOptions]:
    """The options dataclass of a model spec or family ("minilm", "hf-clip:<path-or-id>")."""
    return _entry(spec).options


def model_config(spec: str, options: dict | None = None) -> ModelOptions:
    """The validated options of model `spec`; refuses a malformed spec or an unknown option.

    Example:
        >>> model_config("tiny-clip", {"sead": 1})
        Traceback (most recent call last):
        ...
        ValueError: model 'tiny-clip': unknown option 'sead' for ModelOptions; did you mean 'seed'? Options: seed, quantize
    """
    family, sep, argument = spec.partition(":")
    entry = _entry(spec)
    if entry.argument and not argument:
        raise ValueError(f"model {family!r} needs an argument: {entry.spec}")
    if not entry.argument and sep:
        raise ValueError(f"model {family!r} takes no argument; got {spec!r}")
    try:
        return entry.options.from_dict(options or {})
    except ValueError as e:
        raise ValueError(f"model {family!r}: {e}") from None


def check_model(spec: str, options: dict | None = None) -> None:
    """Refuse an unknown model spec, option or option value before any weights load."""
    model_config(spec, options)


def create(spec: str, **options) -> Classifier:
    """Build the model named by `spec` ("minilm", "hf-clip:<path-or-id>", "tiny-clip", ...)."""
    config = model_config(spec, options)
    entry = _entry(spec)
    argument = spec.partition(":")[2]
    model = entry.build(argument, config) if entry.argument else entry.build(config)
    if config.quantize:
        from saftune.sparse.quantized import quantize

        quantize(model, config.quantize)
    return model


# ---------------------------------------------------------------------------------------------- entries
@register_model("minilm", "all-MiniLM-L6-v2 sentence encoder as a zero-shot dual encoder (embedded asset)",
                options=SentenceOptions)
def _minilm(options: SentenceOptions):
    from saftune.assets import asset_path

    return _sentence(str(asset_path("minilm")), options)


@register_model("sentence", "any HF sentence encoder (mean pooling) as a zero-shot dual encoder",
                options=SentenceOptions, argument="path")
def _sentence(path: str, options: SentenceOptions):
    from transformers import AutoModel, AutoTokenizer

    from saftune.models.text import SentenceClassifier

    return SentenceClassifier(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), scale=options.scale)


@register_model("hf-clip", "transformers CLIPModel from a local directory or hub id", argument="path-or-id")
def _hf_clip(path: str, options: ModelOptions):
    from saftune.models.clip import load_hf_clip

    return load_hf_clip(path, seed=options.seed)


@register_model("open-clip", "open_clip model (optional extra: saftune[open-clip])", argument="arch/tag")
def _open_clip(spec: str, options: ModelOptions):
    from saftune.models.clip import load_open_clip

    return load_open_clip(spec, seed=options.seed)


@register_model("hf-classifier", "HF encoder with a classification head (BERT/RoBERTa/DeBERTa)", argument="path")
def _hf_classifier(path: str, options: ModelOptions):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from saftune.models.text import SequenceClassifier

    return SequenceClassifier(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path))


@register_model("t5", "T5 with verbalizer templates (class names are the label words)", options=T5Options,
                argument="path")
def _t5(path: str, options: T5Options):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from saftune.models.text import T5VerbalizerClassifier

    return T5VerbalizerClassifier(T5ForConditionalGeneration.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                  input_template=options.input_template)


@register_model("causal-lm", "any transformers causal LM (Llama, Qwen, Mistral, Gemma, GPT-2, OPT): a directory, "
                "hub id or .gguf file", options=CausalLMFileOptions, argument="path-or-id")
def _causal_lm(path: str, options: CausalLMFileOptions):
    from saftune.models.causal_lm import load_causal_lm

    return load_causal_lm(path, dtype=options.dtype, gradient_checkpointing=options.gradient_checkpointing,
                          gguf_file=options.gguf_file, max_length=options.max_length,
                          use_chat_template=options.use_chat_template)


@register_model("smollm2", "SmolLM2-135M-Instruct, dequantized from its 4-bit GGUF (embedded asset; needs saftune[llm])",
                options=CausalLMOptions)
def _smollm2(options: CausalLMOptions):
    from saftune.models.causal_lm import smollm2_gguf

    return _causal_lm(str(smollm2_gguf()), CausalLMFileOptions(**options.to_dict()))


@register_model("efficientnet-lite0", "EfficientNet-Lite0 with its ImageNet weights (embedded asset)",
                options=ImageModelOptions)
def _efficientnet(options: ImageModelOptions):
    from saftune.models.efficientnet import efficientnet_lite0
    from saftune.models.vision import ImageClassifier

    return ImageClassifier(efficientnet_lite0(pretrained=True), image_size=options.image_size, seed=options.seed)


@register_model("tiny-sentence", "tiny random BERT sentence encoder (tests, smoke runs)")
def _tiny_sentence(options: ModelOptions):
    from saftune.models.tiny import tiny_sentence

    return tiny_sentence(options.seed)


@register_model("tiny-clip", "tiny random CLIP (tests, smoke runs)")
def _tiny_clip(options: ModelOptions):
    from saftune.models.tiny import tiny_clip

    return tiny_clip(options.seed)


@register_model("tiny-bert-classifier", "tiny random BERT with a classification head (tests)")
def _tiny_bert(options: ModelOptions):
    from saftune.models.tiny import tiny_bert_classifier

    return tiny_bert_classifier(options.seed)


@register_model("tiny-t5", "tiny random T5 with verbalizers (tests)")
def _tiny_t5(options: ModelOptions):
    from saftune.models.tiny import tiny_t5

    return tiny_t5(options.seed)


@register_model("tiny-llama", "tiny random Llama causal LM with a byte tokenizer (tests, smoke runs)",
                options=TinyLMOptions)
def _tiny_llama(options: TinyLMOptions):
    from saftune.models.tiny_lm import tiny_causal_lm

    return tiny_causal_lm("llama", options.seed, chat_template=options.chat_template)


@register_model("tiny-gpt2", "tiny random GPT-2 causal LM with a byte tokenizer (tests, smoke runs)")
def _tiny_gpt2(options: ModelOptions):
    from saftune.models.tiny_lm import tiny_causal_lm

    return tiny_causal_lm("gpt2", options.seed)


@register_model("tiny-cnn", "EfficientNet-Lite0 architecture, random weights, 32px input (tests)")
def _tiny_cnn(options: ModelOptions):
    from saftune.models.tiny import tiny_cnn

    return tiny_cnn(options.seed)
