"""`wiseft`: weight-space ensembling (Wortsman et al., 2022) of any fine-tuned result.

theta(a) = (1 - a) * theta0 + a * theta1, for the trained tensors of a base method: all weights for full
fine-tuning, the sparse values for SAFT (so a sparse result stays sparse). The run evaluates the whole
curve `alphas`; the reported result is `alpha` (0.5, the paper's default), or with `choose_alpha` the
alpha of the curve with the best validation accuracy (never chosen on OOD data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, method_class, register_method


@torch.no_grad()
def lerp_weights(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for every tensor of `start`: the whole of WiSE-FT.

    Computed in fp32 and returned in start's dtypes; tensors that are not floating point (integer
    buffers such as position ids) keep start's value. `saftune interpolate` uses it too.

    Example:
        >>> lerp_weights({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
        tensor([0.2500, 0.2500])
    """
    return {n: torch.lerp(t.float(), end[n].float(), alpha).to(t.dtype) if t.is_floating_point() else t
            for n, t in start.items()}


@dataclass
class WiseFTConfig(MethodConfig):
    base: str = option("ft", "the fine-tuning method whose result is interpolated (ft, saft, ...)")
    alpha: float = option(0.5, "mixing weight of the reported result (0: pretrained, 1: fine-tuned)", low=0.0, high=1.0)
    alphas: list[float] = option(help="mixing weights of the evaluated curve",
                                 default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    base_options: dict = option(help="options of the base method besides lr and weight_decay", default_factory=dict)
    choose_alpha: bool = option(False, "report the alpha of `alphas` with the best validation accuracy instead of "
                                "`alpha` (ties: the smaller alpha, nearer the pretrained model)")


@register_method
class WiseFT(Method):
    name = "wiseft"
    config_class = WiseFTConfig
    help = "weight-space interpolation between the pretrained and a fine-tuned model (WiSE-FT)"
    result_kind = None  # the result is the base method's, saved by it

    def __init__(self, config=None):
        super().__init__(config)
        base_cls = method_class(self.config.base)
        if base_cls is WiseFT or not base_cls.interpolates_linearly or not base_cls.trains:
            raise ValueError(f"wiseft cannot interpolate {self.config.base!r} results; use ft, lpft, l2sp, kd, flyp, saft, ...")
        options = {"lr": self.config.lr, "weight_decay": self.config.weight_decay, **self.config.base_options}
        self.base = base_cls(base_cls.config_class.from_dict(options))
        self.alpha = self.config.alpha  # the reported mixing weight (`choose_after_training` may change it)

    def prepare(self, model, context):
        self.base.prepare(model, context)
        self.start = {n: t.detach().clone() for n, t in self.base.state_dict(model).items()}

    def trainable_parameters(self, model):
        return self.base.trainable_parameters(model)

    def parameter_groups(self, model):
        return self.base.parameter_groups(model)

    def training_step(self, model, batch):
        return self.base.training_step(model, batch)

    def after_step(self, model, step, total_steps):
        self.base.after_step(model, step, total_steps)

    def finalize(self, model):
        self.base.finalize(model)
        self.end = {n: t.detach().clone() for n, t in self.base.state_dict(model).items()}
        self.interpolate(model, self.alpha)

    @torch.no_grad()
    def interpolate(self, model, alpha: float) -> None:
        """Set the trained tensors to (1 - alpha) * pretrained + alpha * fine-tuned."""
        self.base.load_state_dict(model, lerp_weights(self.start, self.end, alpha))

    def choose_after_training(self, model, evaluate_val):
        if not self.config.choose_alpha:
            return
        scores = {}
        for alpha in sorted(set(self.config.alphas)):
            self.interpolate(model, alpha)
            scores[alpha] = evaluate_val(model)
        self.alpha = max(scores, key=lambda a: (scores[a], -a))  # best validation accuracy; ties: the smaller alpha
        self.interpolate(model, self.alpha)

    def evaluate_extra(self, model, evaluate_all, metrics):
        """The WiSE-FT curve over `alphas`; the model is left at the reported alpha."""
        curve = []
        for alpha in self.config.alphas:
            if alpha == self.alpha:  # the reported point: already evaluated
                curve.append({"alpha": alpha, **metrics})
                continue
            self.interpolate(model, alpha)
            curve.append({"alpha": alpha, **evaluate_all(model)})
        self.interpolate(model, self.alpha)
        return {"wiseft_curve": curve, "wiseft_alpha": self.alpha}

    def record_fields(self, model):
        return {**self.base.record_fields(model), "wiseft_alpha": self.alpha}

    def training_key(self):
        return self.base.training_key()  # the base method's training: shared with its own row's runs

    def state_dict(self, model):
        return self.base.state_dict(model)

    def load_state_dict(self, model, state):
        self.base.load_state_dict(model, state)

    def num_trainable(self, model):
        return self.base.num_trainable(model)

    def save_result(self, model, directory, info):
        return self.base.save_result(model, directory, {**info, "wiseft_alpha": self.alpha})
