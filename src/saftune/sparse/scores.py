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
"""

from __future__ import annotations

import contextlib
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
            grad = param.grad.float()  # no copy when the gradient is already fp32
            if self.square:
                grad = grad.square()
            if name in self.sums:
                self.sums[name].add_(grad)
            else:  # a fresh tensor, or `.grad` itself, which we own once it is detached below
                self.sums[name] = grad
            param.grad = None

        return hook

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
    return {name: p.detach().float().abs().neg_() for name, p in params.items()}


SCORES: dict[str, Score] = {
    "grad": Score(grad_scores, needs_data=True, help="|dataset-averaged gradient| (SAFT)"),
    "fisher": Score(fisher_scores, needs_data=True, help="mean per-example squared gradient (SAFT-dagger / FISH)"),
    "random": Score(random_scores, needs_data=False, help="uniform random scores from the seed (ablation)"),
    "magnitude": Score(magnitude_scores, needs_data=False, help="smallest |pretrained weight| first (WM ablation)"),
    "bias": Score(grad_scores, needs_data=True, help="biases only, ranked by |mean gradient| (BitFit at sparsity 1)",
                  is_candidate=is_bias),
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
    """Eval mode (deterministic: no dropout) and gradients only for `params`; restores both after."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
