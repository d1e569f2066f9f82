"""Importance scores for phase 1: which entries matter for the task.

Every score is a plug-in with one signature::

    compute(model, params, loss_fn, data, *, seed, progress) -> dict[name, fp32 tensor shaped like the parameter]

Higher scores are kept. `params` are the candidate parameters (name -> Parameter); the returned tensors
are the only D-sized memory phase 1 allocates: one fp32 accumulator per candidate parameter.

Scores:
    grad      |(1/N) sum_i grad l(x_i)|: the dataset-averaged gradient (SAFT).
    fisher    (1/N) sum_i grad l(x_i)^2: per-example squared gradients (SAFT-dagger, the FISH mask).
    random    uniform noise from `seed` (the random-mask ablation).
    magnitude -|w|: the smallest pretrained weights first (the paper's WM ablation).
    bias      |mean gradient| restricted to bias parameters (BitFit when sparsity is 1).
    fps       |W| x mean |input activation| of the entry's input column: forward passes only, no
              backward (FPS); nn.Linear and nn.Embedding weights only.
    lt-sft    |theta_ft - theta_0| after a short full fine-tuning of a copy (LT-SFT, Ansell et al. 2022);
              the model itself is untouched, so sparse training starts from theta_0.

A score may take keyword options (lt-sft: `steps`, `lr`), passed as `select_mask(score_options=...)`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saftune import distributed

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _everything(name: str, param: torch.Tensor) -> bool:
    return True


def is_bias(name: str, param: torch.Tensor) -> bool:
    """Bias parameters: the last name component ends in "bias" (`bias`, `in_proj_bias`, ...)."""
    return name.rsplit(".", 1)[-1].endswith("bias")


@dataclass(frozen=True)
class Score:
    """A registered score: how to compute it, and which parameters it may select from."""

    compute: Callable[..., dict[str, torch.Tensor]]
    needs_data: bool
    help: str
    is_candidate: Callable[[str, torch.Tensor], bool] = field(default=_everything)
    # Narrows the candidates knowing the model (e.g. to the weights of nn.Linear modules); raises when
    # none is left or the model has layers the score cannot handle.
    restrict: Callable[[nn.Module, dict[str, nn.Parameter]], dict[str, nn.Parameter]] | None = None

    def options(self) -> dict[str, object]:
        """The score's own keyword options and their defaults (beyond `seed` and `progress`)."""
        return {name: p.default for name, p in inspect.signature(self.compute).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("seed", "progress")}

    def check_options(self, name: str, values: dict | None) -> dict:
        """`values` if the score takes every one of them, else a ValueError naming the ones it takes."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.options()))
        if unknown:
            known = ", ".join(self.options()) or "none"
            raise ValueError(f"score {name!r} has no option {unknown[0]!r}; its options: {known}")
        return values


class _GradientAccumulator:
    """Sums (optionally squared) parameter gradients into one fp32 buffer per parameter.

    A post-accumulate-grad hook moves each gradient into the fp32 sum as soon as autograd produces it
    and frees `.grad`, so bf16 models accumulate in fp32 and no second dense copy is ever kept.
    """

    def __init__(self, params: dict[str, nn.Parameter], square: bool):
        self.sums: dict[str, torch.Tensor] = {}
        self.square = square
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in params.items()]

    def _hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad.is_sparse:  # an embedding's rows (the lean phase 1's stem stage): add only those
                self._add_rows(name, param, grad)
                param.grad = None
                return
            if self.square:
                grad = grad.float().square()
            if name in self.sums:
                # add_ widens a bf16 gradient element by element: no fp32 copy of it (as large as the sum)
                self.sums[name].add_(grad)
            else:  # a fresh tensor, or `.grad` itself, which we own once it is detached below
                self.sums[name] = grad.float()  # no copy when the gradient is already fp32
            param.grad = None

        return hook

    def _add_rows(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a sparse embedding gradient (one row per position) as the dense one would be added.

        PyTorch's dense embedding backward adds each position's row into its token's row in position order,
        in the gradient's dtype (bf16 rounds after every addition). The same additions are made here for the
        tokens present only, one occurrence rank at a time, so the sums (and the mask) are the dense path's
        without its vocabulary x hidden gradient.
        """
        if self.square:
            raise RuntimeError("squared (Fisher) scores need each example's dense gradient, not an embedding's rows")
        tokens, rows = grad._indices()[0], grad._values()
        order = torch.argsort(tokens, stable=True)  # each token's positions, in position order
        present, counts = torch.unique_consecutive(tokens[order], return_counts=True)
        slot = torch.repeat_interleave(torch.arange(present.numel(), device=tokens.device), counts)
        rank = torch.arange(tokens.numel(), device=tokens.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        summed = torch.zeros(present.numel(), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        for r in range(int(counts.max()) if counts.numel() else 0):
            at = rank == r
            summed[slot[at]] = summed[slot[at]] + rows[order[at]]
        if name not in self.sums:
            self.sums[name] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        self.sums[name].index_add_(0, present, summed.float())

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def per_example_losses(loss_fn: LossFn, model: nn.Module, batch) -> torch.Tensor:
    """Call `loss_fn` and check it returned per-example losses of shape [B]."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return the per-example losses of a batch, a 1-D tensor of shape [B]; got {shape}. "
            "Use reduction='none' (e.g. F.cross_entropy(logits, y, reduction='none'))."
        )
    return losses


def _accumulate(model, params, loss_fn, data, *, square: bool, progress) -> tuple[dict[str, torch.Tensor], int]:
    """Run the data once; return summed (squared) gradients and the number of examples N."""
    if data is None:
        raise ValueError("this score needs training data: pass `data` (an iterable of batches) to select_mask")
    accumulator = _GradientAccumulator(params, square=square)
    n_examples = 0
    try:
        # Under torchrun each process scores every W-th batch; the sums are all-reduced below.
        for batch in tqdm(distributed.shard(data), desc="phase 1: scoring", unit="batch", disable=not progress):
            losses = per_example_losses(loss_fn, model, batch).float()
            if square:  # Fisher needs each example's own gradient: one backward per example
                for i in range(losses.numel()):
                    losses[i].backward(retain_graph=i < losses.numel() - 1)
            else:  # the sum's gradient is the sum of the per-example gradients, exactly
                losses.sum().backward()
            n_examples += losses.numel()
    finally:
        accumulator.close()
    # In parameter order (hooks fire in backward order); parameters the loss never reached score zero.
    sums = {
        name: accumulator.sums[name] if name in accumulator.sums else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for name, p in params.items()
    }
    if distributed.is_distributed():
        count = torch.tensor([float(n_examples)], device=next(iter(sums.values())).device if sums else "cpu")
        distributed.all_reduce_([*sums.values(), count])
        n_examples = int(count.item())
    if n_examples == 0:
        raise ValueError("select_mask got an empty dataset: `data` yielded no examples")
    return sums, n_examples


def grad_scores(model, params, loss_fn, data, *, seed=0, progress=True):
    """|w|, w = (1/N) sum_i grad l(x_i): SAFT's score."""
    sums, n = _accumulate(model, params, loss_fn, data, square=False, progress=progress)
    return {name: s.div_(n).abs_() for name, s in sums.items()}


def fisher_scores(model, params, loss_fn, data, *, seed=0, progress=True):
    """(1/N) sum_i grad l(x_i)^2, with true per-example gradients."""
    sums, n = _accumulate(model, params, loss_fn, data, square=True, progress=progress)
    return {name: s.div_(n) for name, s in sums.items()}


def random_scores(model, params, loss_fn=None, data=None, *, seed=0, progress=True):
    """Uniform noise from one generator seeded with `seed`, drawn in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=generator).to(p.device) for name, p in params.items()}


def magnitude_scores(model, params, loss_fn=None, data=None, *, seed=0, progress=True):
    """-|w|: the smallest-magnitude pretrained weights rank highest."""
    from saftune.sparse.quantized import dequantize

    return {name: dequantize(p.detach()).float().abs().neg_() for name, p in params.items()}


def owner_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Parameter name -> the module that holds it as a direct attribute.

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 1))
        >>> {n: type(m).__name__ for n, m in owner_modules(net, ["0.weight", "1.bias"]).items()}
        {'0.weight': 'Embedding', '1.bias': 'Linear'}
    """
    modules = dict(model.named_modules())
    return {name: modules[name.rpartition(".")[0]] for name in names}


def fps_candidates(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The `weight` of every nn.Linear / nn.Embedding among `params`: the entries FPS can score.

    Biases, norms and convolutions have no input column to weigh, and nn.MultiheadAttention applies its
    projections with F.linear, which no forward hook sees: a candidate inside one is refused rather than
    silently never chosen.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{module_name}." if module_name else ""
            inside = [n for n in params if n.startswith(prefix)]
            if inside:
                raise ValueError(
                    f"score 'fps' cannot score {inside[0]!r}: nn.MultiheadAttention {module_name!r} applies its projection "
                    f"weights with F.linear, whose inputs forward hooks do not see; exclude its parameters "
                    f"(exclude=['{prefix}*']) or use a gradient score"
                )
    owners = owner_modules(model, params)
    chosen = {n: p for n, p in params.items()
              if n.rpartition(".")[2] == "weight" and isinstance(owners[n], (nn.Linear, nn.Embedding))}
    if not chosen:
        raise ValueError("score 'fps' scores only the weights of nn.Linear and nn.Embedding modules, and none is among "
                         "the candidates; widen include/exclude or use another score")
    return chosen


def fps_scores(model, params, loss_fn, data, *, seed=0, progress=True):
    """|W_ij| x mean |x_j|: each weight times the mean magnitude of the input it multiplies, forward only.

    Forward hooks on the candidates' modules sum |input| per input column (nn.Linear: over every row of
    the input it is called with, padding positions included; nn.Embedding, a Linear layer on one-hot
    inputs: how often each token occurs) under `torch.no_grad()`. No backward pass and no activation
    is kept, so phase 1 costs forward passes and one vector per layer. A layer the data never reaches
    scores zero.
    """
    from saftune.sparse.quantized import dequantize

    if data is None:
        raise ValueError("score 'fps' needs training data: pass `data` (an iterable of batches) to select_mask")
    owners = owner_modules(model, params)
    sums = {n: torch.zeros(p.shape[1] if isinstance(owners[n], nn.Linear) else p.shape[0], dtype=torch.float32,
                           device=p.device) for n, p in params.items()}
    counts = {n: 0 for n in params}

    def hook_for(name: str, module: nn.Module):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(module, nn.Embedding):
                sums[name] += torch.bincount(x.reshape(-1), minlength=module.num_embeddings).to(sums[name])
                counts[name] += x.numel()
            else:
                sums[name] += x.detach().abs().float().reshape(-1, x.shape[-1]).sum(0)
                counts[name] += x.numel() // x.shape[-1]

        return hook

    handles = [owners[n].register_forward_pre_hook(hook_for(n, owners[n]), with_kwargs=True) for n in params]
    n_examples = 0
    try:
        with torch.no_grad():
            for batch in tqdm(distributed.shard(data), desc="phase 1: fps", unit="batch", disable=not progress):
                n_examples += per_example_losses(loss_fn, model, batch).numel()
    finally:
        for h in handles:
            h.remove()
    names = list(params)
    if distributed.is_distributed():
        total = torch.tensor([float(n_examples)] + [float(counts[n]) for n in names], device=sums[names[0]].device)
        distributed.all_reduce_([*sums.values(), total])
        n_examples = int(total[0].item())
        counts = {n: int(c) for n, c in zip(names, total[1:].tolist())}
    if n_examples == 0:
        raise ValueError("select_mask got an empty dataset: `data` yielded no examples")
    scores = {}
    for name, p in params.items():
        mean_input = sums[name] / max(counts[name], 1)
        column = mean_input[None, :] if isinstance(owners[name], nn.Linear) else mean_input[:, None]
        scores[name] = dequantize(p.detach()).float().abs() * column
    return scores


def lt_sft_scores(model, params, loss_fn, data, *, seed=0, progress=True, steps=100, lr=1e-4):
    """|theta_ft - theta_0| after `steps` AdamW steps (lr `lr`, no weight decay) on an fp32 copy.

    The copy trains the candidate parameters (all of them by default: LT-SFT's full fine-tuning) on
    the batches of `data` in order, cycling when there are fewer than `steps` (the batches seen are
    kept in memory), in eval mode like every phase-1 score, so the mask is deterministic. Under
    torchrun every process runs the same fine-tuning on all the batches, so all select the same mask.
    The model passed in is not changed: sparse training then starts from theta_0. Memory: a full
    fine-tuning of the copy (weights, gradients and AdamW state in fp32).
    """
    if data is None:
        raise ValueError("score 'lt-sft' needs training data: pass `data` (an iterable of batches) to select_mask")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lt-sft: steps must be a positive integer (AdamW steps of the short fine-tuning); got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lt-sft: lr must be a positive learning rate; got {lr!r}")
    from saftune.sparse.quantized import QuantizationError, is_quantized

    if any(is_quantized(p) for p in params.values()):
        raise QuantizationError("score 'lt-sft' fine-tunes the candidate weights themselves, which quantized weights cannot "
                                "take; use score 'grad' (SAFT), which scores them through their dequantized values")
    tuned = copy.deepcopy(model).float()
    tuned_params = dict(tuned.named_parameters())
    for p in tuned.parameters():
        p.requires_grad_(False)
    trained = [tuned_params[n].requires_grad_(True) for n in params]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    seen, source = [], iter(data)
    for step in tqdm(range(steps), desc="phase 1: lt-sft fine-tuning", unit="step", disable=not progress):
        batch = next(source, None) if source is not None else None
        if batch is None:
            source = None
            if not seen:
                raise ValueError("select_mask got an empty dataset: `data` yielded no examples")
            batch = seen[step % len(seen)]
        else:
            seen.append(batch)
        per_example_losses(loss_fn, tuned, batch).float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scores = {n: (tuned_params[n].detach() - p.detach().float()).abs_() for n, p in params.items()}
    del tuned, optimizer
    return scores


SCORES: dict[str, Score] = {
    "grad": Score(grad_scores, needs_data=True, help="|dataset-averaged gradient| (SAFT)"),
    "fisher": Score(fisher_scores, needs_data=True, help="mean per-example squared gradient (SAFT-dagger / FISH)"),
    "random": Score(random_scores, needs_data=False, help="uniform random scores from the seed (ablation)"),
    "magnitude": Score(magnitude_scores, needs_data=False, help="smallest |pretrained weight| first (WM ablation)"),
    "bias": Score(grad_scores, needs_data=True, help="biases only, ranked by |mean gradient| (BitFit at sparsity 1)",
                  is_candidate=is_bias),
    "fps": Score(fps_scores, needs_data=True, help="|weight| x mean |input activation|, forward passes only (FPS); "
                 "nn.Linear and nn.Embedding weights", restrict=fps_candidates),
    "lt-sft": Score(lt_sft_scores, needs_data=True, help="|theta_ft - theta_0| after a short full fine-tuning of a copy "
                    "(LT-SFT); training starts from theta_0"),
}


def register_score(name: str, score: Score) -> None:
    """Add a score under `name` (it then works in `select_mask(score=name)` and the CLI)."""
    if name in SCORES:
        raise ValueError(f"a score named {name!r} is already registered")
    SCORES[name] = score


def get_score(name: str) -> Score:
    """The registered score called `name`, or a clear error listing the known ones."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; known scores: {', '.join(SCORES)}") from None


@contextlib.contextmanager
def scoring_mode(model: nn.Module, params: Iterable[nn.Parameter]):
    """Eval mode (deterministic: no dropout) and gradients only for `params`; restores both after.

    Quantized weights among `params` are scored through their dequantized values (`quantized.scoring_routes`).
    """
    from saftune.sparse.quantized import scoring_routes

    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    params = list(params)
    chosen = {id(p) for p in params}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(id(p) in chosen)
        with scoring_routes(model, params):
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
