"""Write a tiny Llama as a GGUF file (F32 tensors, byte-level vocabulary) for the GGUF loading tests.

llama.cpp stores Llama's q/k projections with the rows of each rotary head interleaved; transformers'
GGUF loader undoes that, so the writer applies it: the file then loads back to exactly the same weights.
"""

from pathlib import Path

import numpy as np
import torch

from saftune.models.tiny_lm import SPECIAL_TOKENS, _byte_char

# transformers parameter name (layer part as {i}) -> GGUF tensor name
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def _interleave_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(model, path: Path, *, architecture: str = "llama") -> Path:
    """Write a transformers LlamaForCausalLM (the tiny one) to `path` as GGUF; `architecture` is the header's."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None)
                              else float(config.rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = [_byte_char(b) for b in range(256)] + SPECIAL_TOKENS
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the loader would rebuild them from scores
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for i in range(config.num_hidden_layers):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        state[q] = _interleave_heads(state[q], config.num_attention_heads)
        state[k] = _interleave_heads(state[k], config.num_key_value_heads)
    tied = config.tie_word_embeddings
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # a GGUF without output.weight means tied embeddings
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        key = hf_name.replace(f".{layer}.", ".{i}.", 1) if layer is not None else hf_name
        writer.add_tensor(_NAMES[key].format(i=layer), np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama_for_gguf(seed: int = 0):
    """The tiny random Llama (tied embeddings) that `write_tiny_llama_gguf` writes."""
    from saftune.models.tiny_lm import tiny_causal_lm

    torch.manual_seed(seed)
    return tiny_causal_lm("llama", seed=seed)
