"""One readable training loop for every method.

The loop knows nothing about any method: it asks the method for parameter groups and for named loss
terms per batch, sums the terms, and steps AdamW with a warmup + cosine schedule. Everything that a
resumed run needs to land on the same weights is a function of (seed, step): the shuffling of each
epoch, the augmentation of each micro-batch and the dropout of each step are seeded from them, so a
checkpoint holds only the trained tensors, the optimizer/scheduler state and the step.

Example:
    >>> from saftune.models import create
    >>> from saftune.methods import create_method
    >>> from saftune.data import Split
    >>> model = create("tiny-sentence"); model.set_classes(["negative", "positive"], ["a {} review."])
    >>> train = Split("toy", ["good", "bad", "great", "awful"], [1, 0, 1, 0])
    >>> result = fit(model, create_method("ft", lr=1e-3), train, TrainConfig(epochs=2, batch_size=2, progress=False))
    >>> result.steps
    4
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saftune._io import atomic_path
from saftune.config import Config, option
from saftune.data.base import Split
from saftune.methods.base import Method, PrepareContext
from saftune.models.base import Classifier
from saftune.train.checkpoint import config_fingerprint, find_checkpoint, load_checkpoint, save_checkpoint
from saftune.train.schedule import lr_multiplier

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig(Config):
    """Loop settings shared by all methods (learning rate and weight decay live in the method's config)."""

    epochs: int = option(10, "passes over the training set", low=1)
    max_steps: int | None = option(None, "number of optimizer steps; overrides epochs when set", low=1)
    batch_size: int = option(8, "examples per micro-batch", low=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)", low=1)
    warmup_steps: int = option(0, "linear warmup steps", low=0)
    schedule: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this value (None: no clipping)", low=0.0, low_open=True)
    precision: str = option("fp32", "fp32, or autocast in bf16 / fp16 (fp16: CUDA only, with loss scaling)",
                            choices=("fp32", "bf16", "fp16"))
    seed: int = option(0, "seed of initialisation, shuffling, augmentation and dropout", low=0)
    augment: bool = option(True, "augment images during training (random resized crop, flip)")
    eval_every: int | None = option(None, "evaluate on the validation split every N steps", low=1)
    checkpoint_every: int | None = option(None, "write a resumable checkpoint every N steps and at the end", low=1)
    log_every: int = option(1, "write a log line every N steps", low=1)
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    progress: bool | None = option(None, "progress bar (default: when stderr is a terminal)")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")

    # Settings that do not change the trained weights: a checkpoint may be resumed with other values.
    NON_SEMANTIC = ("eval_every", "checkpoint_every", "log_every", "progress", "tensorboard", "device")

    def semantic(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_SEMANTIC}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped and the last good checkpoint was kept."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device=cpu")
    return device


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Batches:
    """The micro-batch sequence of a run: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, model: Classifier, split: Split, config: TrainConfig, device: torch.device):
        if len(split) == 0:
            raise ValueError(f"the training split {split.name!r} is empty")
        self.model, self.split, self.config, self.device = model, split, config, device
        self.per_epoch = math.ceil(len(split) / config.batch_size)
        self._epoch, self._order = -1, None

    def __call__(self, micro: int) -> dict:
        epoch, position = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.split), generator=generator)
        bs = self.config.batch_size
        indices = self._order[position * bs : (position + 1) * bs].tolist()
        augment = self.config.augment and hasattr(self.model, "train_transform")
        if augment and hasattr(self.model.train_transform, "reseed"):
            self.model.train_transform.reseed(self.config.seed * 1_000_003 + micro)
        batch = self.model.collate([self.split.inputs[i] for i in indices], self.split.labels[indices], train=augment)
        return _to(batch, self.device)

    def fixed(self, batch_size: int | None = None):
        """The training set in stored order, without augmentation (phase-1 scores, probe features)."""
        bs = batch_size or self.config.batch_size
        for start in range(0, len(self.split), bs):
            stop = min(start + bs, len(self.split))
            inputs = [self.split.inputs[i] for i in range(start, stop)]
            yield _to(self.model.collate(inputs, self.split.labels[start:stop]), self.device)


class _DeferredInterrupt:
    """Turns Ctrl-C into a flag checked between steps, so the checkpoint is never mid-update."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint's step: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def fit(
    model: Classifier,
    method: Method,
    train: Split,
    config: TrainConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = True,
    identity: dict | None = None,
    evaluate_fn: Callable[[Classifier], dict] | None = None,
) -> TrainResult:
    """Prepare `method` on `model` and train it on `train`.

    Args:
        model: a classifier whose classes are set.
        method: a method from `saftune.methods.create_method`.
        train: the training split.
        config: loop settings.
        run_dir: where the log, checkpoints and method files go (None: nothing is written).
        resume: continue from `run_dir`'s checkpoint when there is one (it must match the configuration).
        identity: extra settings that make a run what it is (model, dataset, ...): part of the
            checkpoint fingerprint, so a checkpoint of another run is refused.
        evaluate_fn: called every `eval_every` steps; its metrics are logged.

    Returns:
        A `TrainResult` (steps, seconds, the logged records).
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    progress = config.progress if config.progress is not None else __import__("sys").stderr.isatty()
    torch.manual_seed(config.seed)
    model.to(device)
    batches = _Batches(model, train, config, device)
    fingerprint = config_fingerprint({"train": config.semantic(), "method": method.name,
                                      "method_config": method.config.to_dict(), **(identity or {})})
    checkpoint = find_checkpoint(run_dir) if (run_dir is not None and resume) else None
    context = PrepareContext(batches=batches.fixed, seed=config.seed, device=device, out_dir=run_dir,
                             resuming=checkpoint is not None, progress=progress)
    # Read (and refuse a foreign) checkpoint before the expensive prepare; restore it after.
    state = load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else None
    method.prepare(model, context)
    if not method.trains:
        method.finalize(model)
        return TrainResult(steps=0, seconds=0.0)

    total_steps = config.max_steps or math.ceil(config.epochs * batches.per_epoch / config.grad_accum)
    groups = method.parameter_groups(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"method {method.name!r} left nothing to train")
    optimizer = torch.optim.AdamW(groups, lr=method.config.lr, weight_decay=method.config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps=total_steps, warmup_steps=config.warmup_steps,
                                           schedule=config.schedule))
    start = 0
    if state is not None:
        method.load_state_dict(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        logger.info("resumed from %s at step %d of %d", checkpoint, start, total_steps)
    log_path = run_dir / LOG_FILE if run_dir is not None else None
    if log_path is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start:
            _trim_log(log_path, start)
        elif log_path.exists():
            log_path.unlink()  # a fresh run: the old log belongs to a discarded attempt
    writer = _tensorboard(run_dir) if (config.tensorboard and run_dir is not None) else None
    scaler = torch.amp.GradScaler("cuda") if (config.precision == "fp16" and device.type == "cuda") else None
    if config.precision == "fp16" and scaler is None:
        raise ValueError("precision fp16 needs CUDA (loss scaling); use bf16 or fp32 on this device")

    def checkpoint_now(step: int) -> None:
        if run_dir is not None:
            save_checkpoint(run_dir, step=step, trainable=method.state_dict(model), optimizer=optimizer,
                            scheduler=scheduler, fingerprint=fingerprint, extra={"method": method.name})

    history: list[dict] = []
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=f"train {method.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    step = start
    with _DeferredInterrupt() as interrupt, (open(log_path, "a") if log_path else contextlib.nullcontext()) as log:
        for step in bar:
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout of this step, independent of resuming
            optimizer.zero_grad(set_to_none=True)
            terms_total: dict[str, float] = {}
            for k in range(config.grad_accum):
                batch = batches(step * config.grad_accum + k)
                with _autocast(device, config.precision):
                    terms = method.training_step(model, batch)
                loss = sum(terms.values())
                if not bool(torch.isfinite(loss)):
                    values = {name: float(v.detach()) for name, v in terms.items()}
                    kept = f"; the last good checkpoint is {find_checkpoint(run_dir)}" if run_dir else ""
                    raise NonFiniteLossError(f"step {step + 1}: the loss is {float(loss.detach())} (terms {values}){kept}. "
                                             "Lower the learning rate, or use fp32 / bf16 instead of fp16.")
                scaled = loss / config.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                for name, value in terms.items():
                    terms_total[name] = terms_total.get(name, 0.0) + float(value.detach()) / config.grad_accum
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                         if config.max_grad_norm is not None else None)
            lr = optimizer.param_groups[0]["lr"]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            method.after_step(model, step + 1, total_steps)

            record = {"step": step + 1, "epoch": round((step + 1) * config.grad_accum / batches.per_epoch, 4),
                      "lr": lr, "loss": sum(terms_total.values()), **terms_total,
                      "grad_norm": grad_norm, "seconds": round(time.perf_counter() - started, 3)}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if log and ((step + 1) % config.log_every == 0 or step + 1 == total_steps):
                log.write(json.dumps(record) + "\n")
                log.flush()
            if writer:
                for name in ("loss", "lr", *terms_total):
                    writer.add_scalar(f"train/{name}", record[name], step + 1)
            if evaluate_fn and config.eval_every and (step + 1) % config.eval_every == 0:
                metrics = evaluate_fn(model)
                model.train()
                history.append({"step": step + 1, "eval": metrics})
                if log:
                    log.write(json.dumps({"step": step + 1, "eval": metrics}) + "\n")
                    log.flush()
            done = step + 1 == total_steps
            if config.checkpoint_every and ((step + 1) % config.checkpoint_every == 0 or done or interrupt.requested):
                checkpoint_now(step + 1)
            if interrupt.requested and not done:
                bar.close()
                if not config.checkpoint_every:
                    checkpoint_now(step + 1)
                logger.warning("stopped after step %d; run again with the same settings to resume", step + 1)
                raise KeyboardInterrupt
    bar.close()
    if writer:
        writer.close()
    method.finalize(model)
    return TrainResult(steps=total_steps, seconds=time.perf_counter() - started, history=history, resumed_from=start)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'saftune[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))
