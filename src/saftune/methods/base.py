"""The method interface and registry: every fine-tuning method is a config dataclass + a small class.

A method decides what trains and what the loss is; the trainer runs the loop without knowing which
method it drives. The life of a method in a run:

    method = create_method("saft", lr=5e-6)          # config from keyword options / YAML / CLI
    method.prepare(model, context)                   # select a mask, attach adapters, fit a probe, ...
    groups = method.parameter_groups(model)          # what the optimizer sees
    terms = method.training_step(model, batch)       # named loss terms, e.g. {"ce_loss": ..., "l2sp_loss": ...}
    method.after_step(model, step, total_steps)      # e.g. CLIPood's weight averaging
    method.finalize(model)                           # e.g. load the averaged weights
    method.save_result(model, directory, info)       # the artifact: sparse delta, adapter, weights, ...
    type(method).apply_result(model, directory, ...)  # load it onto a fresh base model (`saftune.results`)

Example:
    >>> "saft" in list_methods() and "ft" in list_methods()
    True
    >>> create_method("saft", sparsity="1e-4").config.sparsity
    0.0001
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from saftune._io import atomic_path, did_you_mean
from saftune.config import Config, option
from saftune.models.base import Classifier, classification_loss
from saftune.results import ResultError, ensure_head, write_result_config


@dataclass
class MethodConfig(Config):
    """Options every trained method has: the optimizer's learning rate and weight decay."""

    lr: float = option(1e-5, "peak learning rate of AdamW", low=0.0, low_open=True)
    weight_decay: float = option(0.1, "AdamW weight decay (the papers use 0.1)", low=0.0)


@dataclass
class PrepareContext:
    """What `Method.prepare` may use.

    Attributes:
        batches: callable returning a fresh iterator over the training set in fixed order without
            augmentation (phase-1 scoring, linear-probe features).
        seed: the run seed.
        device: where the model lives.
        out_dir: the run directory (None when not saving), e.g. for the SAFT mask.
        resuming: True when a checkpoint will be loaded after `prepare` (reuse saved work).
        progress: show progress bars.
        reuse_scores: `reuse_scores(settings, compute)` returns phase-1 scores an identical run of this
            grid computed with the same `settings` (same model, data, seed and batches), else
            `compute()`'s, kept for the next run; None: always compute.
        fsdp: the processes of a torchrun job shard the model (`TrainConfig.fsdp`): phase 1 scores on
            FSDP2 shards (`saftune.integrations.fsdp.select_mask_sharded`).
    """

    batches: Callable[[], Iterator[dict]]
    seed: int = 0
    device: torch.device | str = "cpu"
    out_dir: Path | None = None
    resuming: bool = False
    progress: bool = False
    reuse_scores: Callable[[dict, Callable[[], dict]], dict] | None = None
    fsdp: bool = False


class Method:
    """Base class. Subclasses set `name`, `config_class`, `help` and override what they change."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    help: ClassVar[str] = ""
    trains: ClassVar[bool] = True  # False: nothing for the trainer's loop (zero-shot, linear probe)
    # True: the run seed changes nothing (zero-shot): a grid runs its seeds one after another, the later
    # ones finding the first one's evaluations cached (`saftune.pool.Job.same_work`).
    seed_free: ClassVar[bool] = False
    # False: mixing the trained tensors linearly does not mix the models (LoRA's A and B); WiSE-FT refuses it.
    interpolates_linearly: ClassVar[bool] = True
    # True: the loss couples the examples of a batch (a contrastive loss: each example's negatives are the
    # others). Under torchrun the trainer then calls `training_step` in every process, with batch None for
    # an empty share, so that each joins the collectives gathering the global micro-batch (the batch is its
    # share as `distributed.shard` splits it). The step returns the whole global micro-batch's loss, the
    # same in every process, with gradients only through this process's examples (`distributed.gather_rows`)
    # and, for what every example shares (a logit scale), in the main process only. The trainer weights it
    # 1, logs it once, and skips the backward where it has no gradient path.
    couples_batch: ClassVar[bool] = False
    # True: `shard_frozen_base` can shard what the method leaves frozen with FSDP2 (`TrainConfig.fsdp`).
    shards_frozen_base: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config or self.config_class()

    # -- set-up ---------------------------------------------------------------------------------------
    def prepare(self, model: Classifier, context: PrepareContext) -> None:
        """Make `model` ready: by default every parameter trains."""
        for p in model.parameters():
            p.requires_grad_(True)

    def trainable_parameters(self, model: Classifier) -> list[nn.Parameter]:
        """The tensors the optimizer updates."""
        return [p for p in model.parameters() if p.requires_grad]

    def parameter_groups(self, model: Classifier) -> list[dict]:
        """Optimizer parameter groups (one group with the config's weight decay by default)."""
        return [{"params": self.trainable_parameters(model), "weight_decay": self.config.weight_decay}]

    def shard_frozen_base(self, model: Classifier, device: torch.device) -> None:
        """After `prepare`, in every process of a torchrun job: shard the frozen weights with FSDP2 onto `device`
        (the model may still be in host memory: each process's shards move, never the whole model)."""
        raise NotImplementedError(f"method {self.name!r} has no frozen base to shard (`shards_frozen_base` is False)")

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, model: Classifier, batch: dict | None) -> dict[str, torch.Tensor]:
        """Named loss terms of one batch; the trainer sums them. batch is None only with `couples_batch`."""
        return {"ce_loss": classification_loss(model, batch).mean()}

    def after_step(self, model: Classifier, step: int, total_steps: int) -> None:
        """Called after every optimizer step (step counts from 1)."""

    def finalize(self, model: Classifier) -> None:
        """Called once after the last step, before evaluation and saving."""

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self, model: Classifier) -> dict[str, torch.Tensor]:
        """Everything training changed, for checkpoints (tensors only)."""
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_state_dict(self, model: Classifier, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned (after `prepare`)."""
        params = dict(model.named_parameters())
        missing = set(state) - set(params)
        if missing:
            raise ValueError(f"checkpoint has tensors this model lacks: {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def training_key(self) -> dict | None:
        """What this method's training depends on, so an identical training may stand in for it; None: never.

        A grid shares trained states between runs whose keys, loop settings, model, data and seed are all
        equal (`saftune.train.shared`): WiSE-FT's row reuses the `ft` row's training. Return a key only
        when `state_dict` after the loop is all the method keeps (nothing `finalize` needs lives on the
        method object), so that loading a shared state and finalizing equals training again.
        """
        return None

    # -- the run record -------------------------------------------------------------------------------
    def choose_after_training(self, model: Classifier, evaluate_val: Callable[[Classifier], float]) -> None:
        """Fix settings that need no training, on the validation split only (WiSE-FT's alpha); default none.

        Runs before the reported evaluation, in hyperparameter trials too, so a trial's validation accuracy
        is the one its chosen setting gives.
        """

    def evaluate_extra(self, model: Classifier, evaluate_all: Callable[[Classifier], dict], metrics: dict) -> dict:
        """Extra evaluations for the run record (WiSE-FT's curve), after the reported one gave `metrics`.

        Returns fields of `saftune.record.RunRecord`; the model must be left as it was reported.
        """
        return {}

    def record_fields(self, model: Classifier) -> dict:
        """Fields of `saftune.record.RunRecord` this method fills (a sparse method: sparsity, mask summary)."""
        return {}

    # -- results ----------------------------------------------------------------------------------------
    # The kind of artifact `save_result` writes; the registry maps each kind to the method class whose
    # `apply_result` loads it (None: the result is another method's, e.g. WiSE-FT saves its base method's).
    result_kind: ClassVar[str | None] = "weights"
    result_files: ClassVar[tuple[str, ...]] = ("model.safetensors",)  # checksummed in saftune_config.json

    def save_result(self, model: Classifier, directory: Path, info: dict) -> Path:
        """Write the run's artifact into `directory`; default: kind `weights`, the whole classifier."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            save_model(model, str(tmp))  # shared tensors stored once
        return write_result_config(directory, "weights", info).parent

    @staticmethod
    def apply_result(model: Classifier, directory: Path, config: dict, *, merge: bool = False) -> None:
        """Load a saved result of this class's `result_kind` into `model`; `saftune.results.load_result` calls it.

        The files' checksums are already checked. `merge`: fold what the result attaches (adapters) into
        the model's own weights. Default: kind `weights`, the whole classifier.
        """
        path = Path(directory) / "model.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                ensure_head(model, f.keys())
            missing, unexpected = load_model(model, str(path), strict=False)
        except (OSError, RuntimeError) as e:
            raise ResultError(f"cannot load {str(path)!r}: {e}") from e
        if unexpected or [m for m in missing if not m.startswith("head.")]:
            raise ResultError(f"weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def num_trainable(self, model: Classifier) -> int:
        """Number of trained values (for the reports' parameter column)."""
        return sum(p.numel() for p in self.trainable_parameters(model))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


_METHODS: dict[str, type[Method]] = {}
_RESULT_KINDS: dict[str, type[Method]] = {}  # result kind -> the first method registered with it


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under `cls.name`, and the kind of result it saves and loads."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    kind = cls.result_kind
    owner = _RESULT_KINDS.get(kind)
    # Methods may share a kind (ft, l2sp, kd, ... all save `weights`) only if they load it the same way.
    if owner is not None and (owner.apply_result, owner.result_files) != (cls.apply_result, cls.result_files):
        raise ValueError(f"method {cls.name!r} saves results of kind {kind!r}, which {owner.name!r} loads another "
                         "way; give its `result_kind` a name of its own")
    _METHODS[cls.name] = cls
    if kind is not None and owner is None:
        _RESULT_KINDS[kind] = cls
    return cls


def _load_builtin() -> None:
    import saftune.methods.catalog  # noqa: F401 - importing registers the built-in methods


def list_methods() -> dict[str, str]:
    """Registered method names -> help text: the built-in ones in the papers' order, then any added."""
    from saftune.methods.catalog import BUILTIN_ORDER

    _load_builtin()
    names = [n for n in BUILTIN_ORDER if n in _METHODS] + [n for n in _METHODS if n not in BUILTIN_ORDER]
    return {name: _METHODS[name].help for name in names}


def result_kinds() -> dict[str, type[Method]]:
    """Result kind -> the registered method class that loads it (`apply_result`) and lists its files.

    Example:
        >>> {"none", "weights", "partial_weights", "sparse_delta", "lora", "prompt"} <= set(result_kinds())
        True
        >>> result_kinds()["sparse_delta"].result_files  # a sparse delta checks its own files
        ()
    """
    _load_builtin()
    return dict(_RESULT_KINDS)


def method_class(name: str) -> type[Method]:
    """The class registered as `name`, or a clear error with the known names."""
    _load_builtin()
    if name not in _METHODS:
        hint = did_you_mean(name, _METHODS)
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def create_method(name: str, options: dict | None = None, **overrides) -> Method:
    """Build a method from its name and options (strings are coerced to the options' types)."""
    cls = method_class(name)
    return cls(cls.config_class.from_dict(options or {}, **overrides))
