"""`wiseft`: weight-space ensembling (Wortsman et al., 2022) of any fine-tuned result, whole-model or per layer.

theta(a) = (1 - a) * theta0 + a * theta1, for the trained tensors of a base method: all weights for full
fine-tuning, the sparse values for SAFT (so a sparse result stays sparse). The run evaluates the whole
curve `alphas`; the reported result is `alpha` (0.5, the paper's default), or with `choose_alpha` the
alpha of the curve with the best validation accuracy (never chosen on OOD data).

Per-layer averaging (causal LMs; the heterogeneous model averaging of Lin et al., "Mitigating the
Alignment Tax of RLHF"): layers at different depths trade speciality for generality differently, so a
profile [a_1, ..., a_K] splits the transformer blocks into K contiguous groups, bottom to top, and mixes
group k with its own a_k; the token/position embeddings go with the bottom group, the final norm (and an
untied output head) with the top one. Profiles `layer_alphas` are evaluated as their own curve, and
`choose_layer_alphas` reports the one with the best validation accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from saftune.config import option
from saftune.methods.base import Method, MethodConfig, method_class, register_method


@torch.no_grad()
def lerp_weights(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                 alpha: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for every tensor of `start`: the whole of WiSE-FT.

    Computed in fp32 and returned in start's dtypes; tensors that are not floating point (integer
    buffers such as position ids) keep start's value. `saftune interpolate` uses it too.

    Args:
        start, end: tensors by name (end has every name of start).
        alpha: one mixing weight, or one per tensor name (per-layer averaging).

    Example:
        >>> lerp_weights({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
        tensor([0.2500, 0.2500])
        >>> lerp_weights({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.ones(1), "b": torch.ones(1)},
        ...              {"a": 0.0, "b": 1.0})
        {'a': tensor([0.]), 'b': tensor([1.])}
    """
    weight = alpha.__getitem__ if isinstance(alpha, Mapping) else (lambda _: alpha)

    def mix(name: str, t: torch.Tensor) -> torch.Tensor:
        a = weight(name)
        if not t.is_floating_point():
            return t
        if a in (0, 1):  # the endpoints bit for bit (lerp turns -0.0 into +0.0), so their cached scores apply
            return (t if a == 0 else end[name]).clone()
        return torch.lerp(t.float(), end[name].float(), a).to(t.dtype)

    return {n: mix(n, t) for n, t in start.items()}


def layer_groups(model, names: Sequence[str], groups: int) -> dict[str, int]:
    """Group of each parameter name (0 = bottom) when the transformer blocks split into `groups` contiguous groups.

    Block i of L goes to group floor(i * groups / L) (groups differ in size by at most one block);
    what sits below the blocks (embeddings) joins group 0, what sits above (final norm, untied head)
    the last group. Depths come from `model.layer_index` (`CausalLM`).

    Raises:
        ValueError: the model has no transformer blocks, or fewer blocks than groups.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> lm = tiny_causal_lm("llama", layers=3)
        >>> names = ["lm.model.embed_tokens.weight", "lm.model.layers.1.mlp.up_proj.weight", "lm.model.norm.weight"]
        >>> layer_groups(lm, names, 3)
        {'lm.model.embed_tokens.weight': 0, 'lm.model.layers.1.mlp.up_proj.weight': 1, 'lm.model.norm.weight': 2}
    """
    if not callable(getattr(model, "layer_index", None)):
        raise ValueError(f"per-layer averaging (wiseft layer_alphas) needs a model made of transformer blocks (a causal "
                         f"LM); {type(model).__name__} has no layer index: use alpha / alphas for whole-model averaging")
    depth = model.num_layers
    if not 1 <= groups <= depth:
        raise ValueError(f"a wiseft layer_alphas profile has {groups} alphas but {type(model).__name__} has {depth} "
                         f"transformer blocks: give between 1 and {depth} alphas per profile")
    out = {}
    for name in names:
        index = model.layer_index(name)
        out[name] = 0 if index < 0 else groups - 1 if index >= depth else index * groups // depth
    return out


def _check_profiles(profiles: list[list[float]]) -> None:
    for profile in profiles:
        if not profile or any(not 0.0 <= a <= 1.0 for a in profile):
            raise ValueError(f"WiseFTConfig.layer_alphas: profile {profile!r} must list one alpha in [0, 1] per group of "
                             "layers, bottom to top, e.g. [0.2, 0.5, 0.8]")


@dataclass
class WiseFTConfig(MethodConfig):
    base: str = option("ft", "the fine-tuning method whose result is interpolated (ft, saft, ...)")
    alpha: float = option(0.5, "mixing weight of the reported result (0: pretrained, 1: fine-tuned)", low=0.0, high=1.0)
    alphas: list[float] = option(help="mixing weights of the evaluated curve",
                                 default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    base_options: dict = option(help="options of the base method besides lr and weight_decay", default_factory=dict)
    choose_alpha: bool = option(False, "report the alpha of `alphas` with the best validation accuracy instead of "
                                "`alpha` (ties: the smaller alpha, nearer the pretrained model)")
    layer_alphas: list[list[float]] = option(
        help="causal LMs: per-layer averaging profiles, each [a_1, ..., a_K] bottom to top: the transformer blocks split "
             "into K contiguous groups, group k mixed with a_k (embeddings with the bottom group, final norm with the "
             "top); evaluated as their own curve (wiseft_layer_curve)", default_factory=list)
    choose_layer_alphas: bool = option(False, "report the profile of `layer_alphas` with the best validation accuracy "
                                       "(ties: the smaller mean alpha); with choose_alpha, whole-model alphas compete too")

    def __post_init__(self):
        super().__post_init__()
        _check_profiles(self.layer_alphas)
        if self.choose_layer_alphas and not self.layer_alphas:
            raise ValueError("WiseFTConfig.choose_layer_alphas needs profiles to choose from: set layer_alphas, "
                             "e.g. [[0.2, 0.5, 0.8], [0.8, 0.5, 0.2]]")


@register_method
class WiseFT(Method):
    name = "wiseft"
    config_class = WiseFTConfig
    help = "weight-space interpolation between the pretrained and a fine-tuned model (WiSE-FT), whole-model or per layer"
    result_kind = None  # the result is the base method's, saved by it

    def __init__(self, config=None):
        super().__init__(config)
        base_cls = method_class(self.config.base)
        if base_cls is WiseFT or not base_cls.interpolates_linearly or not base_cls.trains:
            raise ValueError(f"wiseft cannot interpolate {self.config.base!r} results; use ft, lpft, l2sp, kd, flyp, saft, ...")
        options = {"lr": self.config.lr, "weight_decay": self.config.weight_decay, **self.config.base_options}
        self.base = base_cls(base_cls.config_class.from_dict(options))
        # The reported setting (`choose_after_training` may change it): one alpha, or a per-layer profile.
        self.alpha: float | None = self.config.alpha
        self.layer_alphas: list[float] | None = None

    def prepare(self, model, context):
        self.base.prepare(model, context)
        self.start = {n: t.detach().clone() for n, t in self.base.state_dict(model).items()}
        # Group every trained tensor once per profile length, before training: a bad profile fails now.
        self.groups = {k: layer_groups(model, list(self.start), k) for k in {len(p) for p in self.config.layer_alphas}}

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
        self._apply(model, self.alpha, self.layer_alphas)

    @torch.no_grad()
    def interpolate(self, model, alpha: float) -> None:
        """Set the trained tensors to (1 - alpha) * pretrained + alpha * fine-tuned."""
        self.base.load_state_dict(model, lerp_weights(self.start, self.end, alpha))

    @torch.no_grad()
    def interpolate_layers(self, model, layer_alphas: Sequence[float]) -> None:
        """Per-layer averaging: the tensors of layer group k (bottom to top) mixed with layer_alphas[k] (`layer_groups`)."""
        groups = self.groups.get(len(layer_alphas))
        if groups is None:  # a profile that was not configured: group now (the model is the prepared one)
            groups = self.groups[len(layer_alphas)] = layer_groups(model, list(self.start), len(layer_alphas))
        alphas = {n: float(layer_alphas[g]) for n, g in groups.items()}
        self.base.load_state_dict(model, lerp_weights(self.start, self.end, alphas))

    def _apply(self, model, alpha: float | None, layer_alphas: Sequence[float] | None) -> None:
        if layer_alphas is not None:
            self.interpolate_layers(model, layer_alphas)
        else:
            self.interpolate(model, alpha)

    def choose_after_training(self, model, evaluate_val):
        """Report the best setting on validation among whole-model `alphas` (choose_alpha) and profiles (choose_layer_alphas).

        Ties go to the smaller mean alpha (nearer the pretrained model), then to whole-model averaging.
        """
        candidates = []
        if self.config.choose_alpha:
            candidates += [(a, None) for a in sorted(set(self.config.alphas))]
        if self.config.choose_layer_alphas:
            candidates += [(None, list(p)) for p in self.config.layer_alphas]
        if not candidates:
            return
        scores = []
        for alpha, profile in candidates:
            self._apply(model, alpha, profile)
            mean = alpha if profile is None else sum(profile) / len(profile)
            scores.append((evaluate_val(model), -mean, profile is None))
        best = max(range(len(candidates)), key=scores.__getitem__)  # first of equal keys: the listed order
        self.alpha, self.layer_alphas = candidates[best]
        self._apply(model, self.alpha, self.layer_alphas)

    def evaluate_extra(self, model, evaluate_all, metrics):
        """The WiSE-FT curve over `alphas` (and over `layer_alphas`); the model is left at the reported setting."""
        curve = []
        for alpha in self.config.alphas:
            if self.layer_alphas is None and alpha == self.alpha:  # the reported point: already evaluated
                curve.append({"alpha": alpha, **metrics})
                continue
            self.interpolate(model, alpha)
            curve.append({"alpha": alpha, **evaluate_all(model)})
        fields = {"wiseft_curve": curve, "wiseft_alpha": self.alpha}
        if self.config.layer_alphas:
            layer_curve = []
            for profile in self.config.layer_alphas:
                if list(profile) == self.layer_alphas:
                    layer_curve.append({"layer_alphas": list(profile), **metrics})
                    continue
                self.interpolate_layers(model, profile)
                layer_curve.append({"layer_alphas": list(profile), **evaluate_all(model)})
            fields |= {"wiseft_layer_curve": layer_curve, "wiseft_layer_alphas": self.layer_alphas}
        self._apply(model, self.alpha, self.layer_alphas)
        return fields

    def record_fields(self, model):
        fields = {**self.base.record_fields(model), "wiseft_alpha": self.alpha}
        return fields | ({"wiseft_layer_alphas": self.layer_alphas} if self.layer_alphas is not None else {})

    def training_key(self):
        # The base method's training (the mixing happens after it): shared with its own row's runs.
        return self.base.training_key()

    def state_dict(self, model):
        return self.base.state_dict(model)

    def load_state_dict(self, model, state):
        self.base.load_state_dict(model, state)

    def num_trainable(self, model):
        return self.base.num_trainable(model)

    def save_result(self, model, directory, info):
        setting = {"wiseft_alpha": self.alpha} if self.layer_alphas is None else {"wiseft_layer_alphas": self.layer_alphas}
        return self.base.save_result(model, directory, {**info, **setting})
