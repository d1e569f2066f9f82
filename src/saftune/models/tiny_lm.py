"""Tiny random causal LMs for tests and smoke runs: real Llama and GPT-2 code, hidden size 32, two layers.

They use `byte_tokenizer`, a byte-level tokenizer built in memory (one token per UTF-8 byte, no merges),
so nothing is downloaded. Their outputs mean nothing; they exercise every code path in seconds.

Example:
    >>> lm = tiny_causal_lm("llama")
    >>> lm.tokenizer("hé", add_special_tokens=False)["input_ids"]  # "é" is two UTF-8 bytes
    [104, 195, 169]
    >>> lm.num_layers, lm.lm.config.tie_word_embeddings
    (2, True)
"""

from __future__ import annotations

import torch

# A chat template in the style of ChatML (what SmolLM2 uses), for tests of the chat-template path.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(*, chat_template: str | None = None, pad_token: bool = False):
    """A `PreTrainedTokenizerFast` with one token per byte (ids 0-255 are the bytes) and 3 special tokens.

    Args:
        chat_template: a Jinja chat template to attach (None: the tokenizer has none).
        pad_token: give it a pad token; by default it has none, as most causal LM tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps byte b to a printable character; ordering the vocabulary by byte makes id == byte.
    byte_chars = {_byte_char(b): b for b in range(256)}
    vocab = {**byte_chars, **{t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS[1:],
                                  pad_token="<|endoftext|>" if pad_token else None)
    tok.chat_template = chat_template
    return tok


def _byte_char(b: int) -> str:
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))


def tiny_lm_config(arch: str = "llama", *, tie: bool = True, vocab_size: int = 259, context: int = 64, bias: bool = False,
                   layers: int = 2):
    """A transformers config for a random causal LM with hidden size 32 and (by default) two layers.

    Args:
        arch: "llama" (RMSNorm, rotary, gated MLP, no biases unless `bias`) or "gpt2" (LayerNorm, biases).
        tie: tie the input and output embeddings (SmolLM2 and GPT-2 do).
        context: the model's maximum sequence length.
        layers: number of transformer blocks (more than two for per-layer tests).
    """
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                           tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=256, eos_token_id=256)
    if arch == "gpt2":
        # No dropout: a tiny model must be a deterministic function in train mode too (tests compare steps).
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=context,
                          tie_word_embeddings=tie, bos_token_id=256, eos_token_id=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(f"tiny causal LM architecture must be 'llama' or 'gpt2'; got {arch!r}")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, *, tie: bool = True, chat_template: bool = False,
                   context: int = 64, bias: bool = False, dtype: str = "float32", layers: int = 2):
    """A `CausalLM` with random weights (seeded) and the byte tokenizer.

    Args:
        arch: "llama" or "gpt2".
        seed: weight initialisation seed.
        tie: tied input/output embeddings.
        chat_template: attach a ChatML chat template to the tokenizer.
        context: maximum sequence length.
        bias: Llama with biases in attention and MLP (GPT-2 always has them).
        dtype: "float32" or "bfloat16".
        layers: number of transformer blocks.
    """
    from transformers import AutoModelForCausalLM

    from saftune.models.causal_lm import CausalLM, torch_dtype

    config = tiny_lm_config(arch, tie=tie, context=context, bias=bias, layers=layers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch_dtype(dtype))
    model.eval()
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE if chat_template else None)
    return CausalLM(model, tokenizer, name=f"tiny-{arch}")
