"""Learned context vectors inside the class prompts: the template checks and the hook CoOp, CoCoOp and MaPLe share.

A prompt becomes "<start> c_1 ... c_n <rest of the template> <class name>." where c_1..c_n are learned
vectors that replace the token embeddings of the first n words of the template. The template is
`ctx_init` followed by " {}." ("a photo of a {}."), and the vectors start as the embeddings of those
words, so before training the prompts are exactly the zero-shot ones; with an empty `ctx_init` the
template is n placeholder words and the vectors start random. A forward hook on the prompt encoder's
token embedding writes the vectors in, only while prompts are being encoded (a shared tower, as in
sentence encoders, still embeds its inputs normally). A method hands its learner, the template and that
hook to `DualEncoderClassifier.attach_prompt_learner`, and sets nothing else on the model.

Example:
    >>> context_template("a photo of a", 4), context_template("", 2, "X")
    ('a photo of a {}.', 'X X {}.')
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def context_template(ctx_init: str, n_ctx: int, placeholder: str = "X") -> str:
    """The prompt template whose first `n_ctx` words become learned context vectors."""
    words = ctx_init.strip() or " ".join([placeholder] * n_ctx)
    return words + " {}."


def template_ids(model, template: str) -> torch.Tensor:
    """Token ids [C, L] of the class prompts `template` gives, without switching `model` to it."""
    tokens = model.tokenize_prompts([template.format(c) for c in model.classnames])
    return tokens["input_ids"] if "input_ids" in tokens else next(iter(tokens.values()))


def context_embeddings(model, template: str, n_ctx: int, method: str) -> torch.Tensor:
    """The token embeddings [n_ctx, dim] of `template`'s context words, checked to sit at positions 1..n_ctx.

    Raises a ValueError naming the fix when the first `n_ctx` tokens after the start token are not the
    same in every prompt (the words before the class name tokenize to fewer than `n_ctx` tokens). The
    model is not changed: `attach_prompt_learner(..., templates=[template])` switches it.
    """
    ids = template_ids(model, template)
    words = template.replace(" {}.", "")
    alone = model.tokenize_prompts([words])
    alone = alone["input_ids"] if "input_ids" in alone else next(iter(alone.values()))
    fits = ids.shape[1] > n_ctx and alone.shape[1] > n_ctx and bool((ids[:, 1 : n_ctx + 1] == alone[0, 1 : n_ctx + 1]).all())
    if not fits:
        raise ValueError(f"{method}: the context words {words!r} do not give {n_ctx} tokens before the class name in every "
                         "prompt; use a longer `ctx_init` or a smaller `n_ctx`")
    with torch.no_grad():
        return model.prompt_token_embedding(ids[:1, 1 : n_ctx + 1].to(model.prompt_token_embedding.weight.device))[0].float()


def replace_context(model, n_ctx: int, context: Callable[[], torch.Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Hook the prompt token embedding: positions 1..n_ctx take `context()` while prompts are encoded.

    `context()` returns [n_ctx, dim] (the same vectors in every prompt), [P, n_ctx, dim] (one set per
    prompt), or None (leave the prompts alone).
    """
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        vectors = context() if model.encoding_prompts else None
        if vectors is None:
            return output
        if vectors.dim() == 3 and vectors.shape[0] != output.shape[0]:
            raise RuntimeError(f"{vectors.shape[0]} sets of context vectors for {output.shape[0]} prompts")
        output = output.clone()
        output[:, 1 : n_ctx + 1] = vectors.to(output.dtype)
        return output

    return model.prompt_token_embedding.register_forward_hook(hook)
