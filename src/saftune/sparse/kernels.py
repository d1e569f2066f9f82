"""Gradients of selected weight entries without the dense weight gradient.

For y = x W^T + b, dL/dW[r, c] = sum_n dy[n, r] * x[n, c]: a dot product over the N rows of the batch
for each selected (r, c). At density 1e-3 this is ~1000x fewer multiply-adds than the dense x^T dy, and
it needs O(N * chunk) temporary memory instead of a dense out x in gradient. For an embedding,
dL/dE[r, c] = sum of dy[n, c] over positions n whose token is r: an index_add into the selected rows only.

These autograd functions take the (frozen) weight for the forward and the trainable `values` vector
as an extra input, so autograd delivers the selected entries' gradient straight into `values.grad`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on the temporary [chunk, N] products of the gathered dot products (elements).
_CHUNK_ELEMENTS = 1 << 22


def gathered_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Selected entries of grad_out^T @ inputs, in fp32.

    Args:
        grad_out: [N, out] output gradient.
        inputs: [N, in] layer input (as the forward used it).
        rows, cols: int64 [d] coordinates of the selected entries.

    Example:
        >>> g, x = torch.randn(5, 3), torch.randn(5, 4)
        >>> r, c = torch.tensor([0, 2]), torch.tensor([3, 1])
        >>> torch.allclose(gathered_weight_grad(g, x, r, c), (g.T @ x)[r, c], atol=1e-6)
        True
    """
    # Transposed copies make each gathered row contiguous: [out, N] and [in, N].
    grad_t = grad_out.t().contiguous()
    inputs_t = inputs.t().contiguous()
    n = max(grad_out.shape[0], 1)
    step = max(1, _CHUNK_ELEMENTS // n)
    result = torch.empty(rows.numel(), dtype=torch.float32, device=grad_out.device)
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], cols[start : start + step]
        result[start : start + step] = (grad_t.index_select(0, r).float() * inputs_t.index_select(0, c).float()).sum(1)
    return result


class SparseLinearFunction(torch.autograd.Function):
    """y = F.linear(x, weight, bias), with d(loss)/d(values) = selected entries of dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cols):
        out = F.linear(x, weight, bias)  # under autocast this runs in the autocast dtype
        x_used = x if x.dtype == out.dtype else x.to(out.dtype)
        ctx.save_for_backward(x_used, weight, rows, cols)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_used, weight, rows, cols = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3]:
            grad_values = gathered_weight_grad(grad_2d, x_used.reshape(-1, x_used.shape[-1]), rows, cols)
        return grad_x, None, grad_bias, grad_values, None, None


class SparseEmbeddingFunction(torch.autograd.Function):
    """y = F.embedding(ids, weight, padding_idx), with d(loss)/d(values) = selected entries of dE."""

    @staticmethod
    def forward(ctx, ids, weight, values, unique_rows, row_slot, cols, padding_idx):
        ctx.save_for_backward(ids, unique_rows, row_slot, cols)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ids, unique_rows, row_slot, cols = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None, None, None
        ids = ids.reshape(-1)
        grad_2d = grad_out.reshape(ids.numel(), -1)
        slot = torch.searchsorted(unique_rows, ids).clamp_max_(unique_rows.numel() - 1)
        hit = unique_rows[slot] == ids
        if ctx.padding_idx is not None:  # F.embedding gives the padding row no gradient
            hit &= ids != ctx.padding_idx
        rows_grad = torch.zeros(unique_rows.numel(), grad_2d.shape[1], dtype=torch.float32, device=grad_out.device)
        rows_grad.index_add_(0, slot[hit], grad_2d[hit].float())
        return None, None, rows_grad[row_slot, cols], None, None, None, None
