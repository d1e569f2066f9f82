"""`clipood`: margin metric softmax + Beta moving average (Shu et al., ICML 2023).

The margin metric softmax adds lambda * (1 - cos(t_j, t_y)) to the logit of every other class j, so
classes whose prompts are far from the true class's must be beaten by a wider margin. The Beta moving
average keeps sum_t w_t * theta_t with w_t = Beta(beta, beta) density at the step's position in
training, and loads it at the end. Defaults lambda = 0.3, beta = 0.5 as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, register_method
from saftune.methods.flyp import require_dual_encoder


@dataclass
class CLIPoodConfig(MethodConfig):
    lr: float = option(1e-5, "peak learning rate", low=0.0, low_open=True)
    margin: float = option(0.3, "lambda: scale of the semantic margin", low=0.0)
    beta: float = option(0.5, "beta of the Beta(beta, beta) weights of the moving average", low=0.0, low_open=True)


def beta_weight(step: int, total_steps: int, beta: float) -> float:
    """Unnormalised Beta(beta, beta) density at the middle of step `step` (1-based) of `total_steps`."""
    x = (step - 0.5) / total_steps
    return math.exp((beta - 1) * (math.log(x) + math.log1p(-x)))


@register_method
class CLIPood(Method):
    name = "clipood"
    config_class = CLIPoodConfig
    help = "margin metric softmax + Beta moving average of the weights (CLIPood)"

    def prepare(self, model, context) -> None:
        require_dual_encoder(model, "clipood")
        super().prepare(model, context)
        self.average = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
        self.weight_sum = torch.zeros((), dtype=torch.float64)

    def training_step(self, model, batch):
        features = model.features(batch)
        classes = model.class_embeddings()
        cosine = features @ classes.T
        with torch.no_grad():  # the margin is a fixed function of the class prompts
            margin = self.config.margin * (1 - classes @ classes.T)[batch["labels"]]
        logits = model.logit_scale * (cosine + margin)
        return {"mms_loss": F.cross_entropy(logits, batch["labels"])}

    @torch.no_grad()
    def after_step(self, model, step, total_steps):
        w = beta_weight(step, total_steps, self.config.beta)
        for n, p in model.named_parameters():
            self.average[n].add_(p.float(), alpha=w)
        self.weight_sum += w

    @torch.no_grad()
    def finalize(self, model):
        if float(self.weight_sum) == 0:
            return
        for n, p in model.named_parameters():
            p.copy_((self.average[n] / float(self.weight_sum)).to(p.dtype))

    def state_dict(self, model):
        state = super().state_dict(model)
        state.update({f"bma::{n}": t.clone() for n, t in self.average.items()})
        state["bma::weight_sum"] = self.weight_sum.clone()
        return state

    def load_state_dict(self, model, state):
        self.weight_sum = state["bma::weight_sum"].clone()
        for n in self.average:
            self.average[n] = state[f"bma::{n}"].clone()
        super().load_state_dict(model, {k: v for k, v in state.items() if not k.startswith("bma::")})
