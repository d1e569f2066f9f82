"""One readable training loop for every method.

The loop knows nothing about any method: it asks the method for parameter groups and for named loss
terms per batch, sums the terms, and steps AdamW with a warmup + cosine schedule. Everything that a
resumed run needs to land on the same weights is a function of (seed, step): the shuffling of each
epoch, the augmentation of each micro-batch and the dropout of each step are seeded from them, so a
checkpoint holds only the trained tensors, the optimizer/scheduler state and the step.

`fit` reads top to bottom. One optimizer step is `_forward_backward` (micro-batches -> named loss terms
-> backward), the all-reduce of the gradients over processes, then `_clip_and_step`; `_RunLog` keeps,
writes and plots the records; a checkpoint is written every `checkpoint_every` steps and on Ctrl-C.

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
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saftune import distributed
from saftune._io import atomic_path
from saftune.config import Config, option
from saftune.data.base import Split
from saftune.methods.base import Method, PrepareContext
from saftune.models.base import Classifier
from saftune.train.checkpoint import config_fingerprint, discard_checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from saftune.train.schedule import lr_multiplier
from saftune.train.shared import SharedTraining, TrainedState

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
    final_moments: bool = option(True, "keep AdamW's moments in the last step's checkpoint (False: it holds only what "
                                 "evaluation needs, a third of the size for full fine-tuning; a grid's trials)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    progress: bool | None = option(None, "progress bar (default: when stderr is a terminal)")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    fsdp: bool = option(False, "under torchrun / accelerate launch: shard the weights with FSDP2 in phase 1 and the "
                        "frozen base after it (sparse methods; the selected values stay replicated)")

    # Settings that do not change the trained weights: a checkpoint may be resumed with other values
    # (sharding the frozen base trains the same values: tests/test_accelerate_fsdp.py).
    NON_SEMANTIC = ("eval_every", "checkpoint_every", "log_every", "final_moments", "progress", "tensorboard", "device",
                    "fsdp")

    def semantic(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_SEMANTIC}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped and the last good checkpoint was kept.

    Only the loss is fatal. fp16 gradients that overflow are not: GradScaler finds the Inf/NaN when it
    unscales them, skips that optimizer step and lowers the loss scale. bf16 has fp32's range and no scaler.
    """


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    shared: bool = False  # the trained state came from an identical training (`SharedTraining`)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun each process uses the GPU `distributed.init_from_env` chose for it.
        return torch.device("cuda", torch.cuda.current_device()) if distributed.is_distributed() else torch.device("cuda")
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


def _score_reuser(shared: SharedTraining | None, config: TrainConfig, identity: dict | None):
    """`PrepareContext.reuse_scores` over `shared`: phase-1 scores keyed by what they depend on.

    Scores depend on the model, the data, the seed (a randomly initialised head), the phase-1 batches
    (batch size) and the score's own settings, not on the learning rate or the sparsity: the SAFT rows
    of a sparsity sweep and their learning-rate trials score once per seed.
    """
    if shared is None:
        return None

    def reuse(settings: dict, compute: Callable[[], dict]) -> dict:
        key = config_fingerprint({"phase1": settings, "batch_size": config.batch_size, "precision": config.precision,
                                  "seed": config.seed, **(identity or {})})
        found = shared.get(key)
        if found is not None:
            logger.info("phase 1: scores of an identical earlier run reused (%.0f s saved)", found.seconds)
            return found.state
        started = time.perf_counter()
        scores = compute()
        shared.put(key, TrainedState(scores, steps=0, seconds=time.perf_counter() - started))
        return scores

    return reuse


class _Batches:
    """The micro-batch sequence of a run: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, model: Classifier, split: Split, config: TrainConfig, device: torch.device):
        if len(split) == 0:
            raise ValueError(f"the training split {split.name!r} is empty")
        self.model, self.split, self.config, self.device = model, split, config, device
        self.per_epoch = math.ceil(len(split) / config.batch_size)
        self._epoch, self._order = -1, None
        # Every forward is a collective (an FSDP-sharded base): a process with an empty share of a
        # micro-batch still runs one, on an example of the batch weighted 0.
        self.lockstep = False

    def __call__(self, micro: int) -> tuple[dict | None, int, int]:
        """Micro-batch `micro`: (this process's share or None when it has none, its size, the global size)."""
        epoch, position = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.split), generator=generator)
        bs = self.config.batch_size
        everyone = self._order[position * bs : (position + 1) * bs].tolist()
        indices = list(distributed.shard(everyone))  # all of them in a single process
        share = len(indices)
        if not indices and self.lockstep:
            indices = everyone[:1]
        if not indices:
            return None, 0, len(everyone)
        augment = self.config.augment and hasattr(self.model, "train_transform")
        if augment and hasattr(self.model.train_transform, "reseed"):
            self.model.train_transform.reseed(self.config.seed * 1_000_003 + micro)
        batch = self.model.collate([self.split.inputs[i] for i in indices], self.split.labels[indices], train=augment)
        return _to(batch, self.device), share, len(everyone)

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


def read_log_line(line: str, path: Path) -> dict | None:
    """One record of a log.jsonl, or None for a blank or damaged line (a crash mid-write), with a warning."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        logger.warning("%s: skipping a damaged line: %.80r", path, line)
        return None
    return record if isinstance(record, dict) else None


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint's step: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if (record := read_log_line(line, path)) is not None and record.get("step", 0) <= last_step]
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
    shared: SharedTraining | None = None,
    shared_scores: SharedTraining | None = None,
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
        shared: trained states of this process's earlier runs: an identical training (`Method.training_key`)
            is loaded from it instead of run again, and this one is added to it.
        shared_scores: phase-1 scores of this process's earlier runs (`PrepareContext.reuse_scores`).

    Returns:
        A `TrainResult` (steps, seconds, the logged records).
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    torch.manual_seed(config.seed)
    if config.fsdp:
        _check_fsdp(method)
    else:
        # Under fsdp the model may be bigger than one device: it stays where it was loaded (host memory), phase 1
        # moves each process's shards of a sharded view, and `Method.shard_frozen_base` its shards for training.
        model.to(device)
    model.check_training_split(train)  # bad data fails before phase 1 or a checkpoint read
    batches = _Batches(model, train, config, device)
    fingerprint = config_fingerprint({"train": config.semantic(), "method": method.name,
                                      "method_config": method.config.to_dict(), **(identity or {})})
    training_key = method.training_key() if shared is not None and config.eval_every is None else None
    shared_key = config_fingerprint({"train": config.semantic(), "training": training_key, **(identity or {})}) \
        if training_key is not None else None
    # Read (and refuse a foreign) checkpoint before the expensive prepare; restore it after.
    checkpoint, state = _checkpoint_to_resume(run_dir, resume, fingerprint)
    method.prepare(model, PrepareContext(batches=batches.fixed, seed=config.seed, device=device, out_dir=run_dir,
                                         resuming=checkpoint is not None, progress=progress,
                                         reuse_scores=_score_reuser(shared_scores, config, identity),
                                         fsdp=config.fsdp))
    if not method.trains:
        method.finalize(model)
        return TrainResult(steps=0, seconds=0.0)
    if config.fsdp:
        method.shard_frozen_base(model, device)
        batches.lockstep = True

    total_steps = config.max_steps or math.ceil(config.epochs * batches.per_epoch / config.grad_accum)
    params, optimizer, scheduler = _optimizer(model, method, config, total_steps)
    start = 0
    if state is not None:  # the trained tensors, AdamW's moments, the schedule's position
        method.load_state_dict(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        logger.info("resumed from %s at step %d of %d", checkpoint, start, total_steps)
    log = _RunLog(run_dir, start, config, total_steps, batches.per_epoch)
    scaler = _grad_scaler(config.precision, device)

    def save(step: int) -> None:
        if run_dir is not None and distributed.is_main():
            save_checkpoint(run_dir, step=step, trainable=method.state_dict(model), optimizer=optimizer,
                            scheduler=scheduler, fingerprint=fingerprint, extra={"method": method.name},
                            moments=step < total_steps or config.final_moments)

    reused = shared.get(shared_key) if shared_key is not None and start == 0 else None
    if reused is not None:  # an identical training already ran in this process: its state, log and end checkpoint
        method.load_state_dict(model, reused.state)
        with log:
            log.replay(reused.history)
        if _ends_interval(total_steps, config.checkpoint_every, total_steps):
            save(total_steps)  # what the finished training would have left
        method.finalize(model)
        return TrainResult(steps=total_steps, seconds=reused.seconds, history=list(reused.history), shared=True)

    model.train()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=f"train {method.name}",
               unit="step", disable=not progress, dynamic_ncols=True)
    with _DeferredInterrupt() as interrupt, log:
        for step in bar:
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout of this step, independent of resuming
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            terms = _forward_backward(model, method, batches, step, config, scaler, run_dir)
            # Sum the trainable tensors' gradients over processes (SAFT: the d selected values only).
            reduced_bytes = distributed.all_reduce_gradients(params)
            grad_norm, skipped = _clip_and_step(optimizer, scaler, params, config.max_grad_norm,
                                                step=step, terms=terms, run_dir=run_dir)
            scheduler.step()
            method.after_step(model, step + 1, total_steps)

            record = log.step(step + 1, lr, terms, grad_norm, skipped, reduced_bytes)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if evaluate_fn and config.eval_every and (step + 1) % config.eval_every == 0:
                log.eval(step + 1, evaluate_fn(model))
                model.train()
            # A Ctrl-C that reached one process stops all; after the last step there is nothing left to stop.
            stop = distributed.any_process(interrupt.requested) and step + 1 < total_steps
            if stop or _ends_interval(step + 1, config.checkpoint_every, total_steps):
                save(step + 1)
            if stop:
                bar.close()
                logger.warning("stopped after step %d; run again with the same settings to resume", step + 1)
                raise KeyboardInterrupt
    bar.close()
    seconds = time.perf_counter() - log.started
    if shared_key is not None and start == 0:
        shared.put(shared_key, TrainedState(method.state_dict(model), total_steps, seconds, log.history))
    method.finalize(model)
    return TrainResult(steps=total_steps, seconds=seconds, history=log.history, resumed_from=start)


def _check_fsdp(method: Method) -> None:
    """Refuse `fsdp` before phase 1 where it cannot apply."""
    if not method.shards_frozen_base:
        raise ValueError(f"method {method.name!r} trains dense tensors: fsdp shards the frozen base of a sparse method "
                         "(saft, bitfit); drop fsdp, or fine-tune with SAFT")
    if not distributed.is_distributed():
        raise ValueError("fsdp shards the frozen base across processes, and this is one process: launch with "
                         "torchrun --nproc-per-node N (or accelerate launch), or drop fsdp")


def _checkpoint_to_resume(run_dir: Path | None, resume: bool, fingerprint: str) -> tuple[Path | None, dict | None]:
    """The checkpoint this run continues from and its state, or (None, None) for a fresh start."""
    if run_dir is None:
        return None, None
    if not resume:
        if distributed.is_main():
            # Kept, an older attempt's checkpoint would be resumed after a crash before this run's first one.
            discard_checkpoint(run_dir)
        return None, None
    checkpoint = find_checkpoint(run_dir)
    return checkpoint, (load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else None)


def _optimizer(model: Classifier, method: Method, config: TrainConfig,
               total_steps: int) -> tuple[list[torch.Tensor], torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(the trainable tensors, AdamW over the method's parameter groups, the warmup + `schedule` scheduler).

    The learning rate and weight decay are the method's; the schedule is a pure function of the step.
    """
    groups = method.parameter_groups(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"method {method.name!r} left nothing to train")
    # One fused kernel per step instead of a dozen passes over every tensor (CPU and CUDA): the per-tensor
    # loop took a quarter of MiniLM full fine-tuning's step on 2 CPU cores (benchmarks/optimizer_step.py).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_ADAMW_DTYPES for p in params)
    optimizer = torch.optim.AdamW(groups, lr=method.config.lr, weight_decay=method.config.weight_decay,
                                  fused=fused or None)
    # A lambda, not a callable object: LambdaLR leaves it out of the checkpointed state.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps=total_steps, warmup_steps=config.warmup_steps,
                                           schedule=config.schedule))
    return params, optimizer, scheduler


_FUSED_ADAMW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaling (CUDA only); bf16 has fp32's range and fp32 needs none."""
    if precision != "fp16":
        return None
    if device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA (loss scaling); use bf16 or fp32 on this device")
    return torch.amp.GradScaler("cuda")


def _forward_backward(model: Classifier, method: Method, batches: _Batches, step: int, config: TrainConfig,
                      scaler: torch.amp.GradScaler | None, run_dir: Path | None) -> dict[str, float]:
    """Forward and backward of the `grad_accum` micro-batches of `step`, accumulating into the gradients.

    Returns the step's named loss terms: each the global batch's mean, averaged over the micro-batches.
    Raises `NonFiniteLossError` (in every process at once) when a micro-batch's loss is NaN or Inf.
    """
    terms_total: dict[str, float] = {}
    for k in range(config.grad_accum):
        batch, share, size = batches(step * config.grad_accum + k)
        # This process's part of the global micro-batch: 1 in a single process. Weighting each
        # process's mean loss by it makes the sum over processes the global batch's mean loss.
        # A loss coupling the batch's examples is the global batch's already, in every process.
        weight = 1.0 if method.couples_batch else share / size
        terms = {}
        if batch is not None or method.couples_batch:  # a coupled loss gathers from every process
            with _autocast(batches.device, config.precision):
                terms = method.training_step(model, batch)
        values = {name: float(v.detach()) * weight for name, v in terms.items()}
        # every process has the same coupled loss: the main process's value is logged
        micro_terms = distributed.gather_objects(values)[0] if method.couples_batch else _sum_over_processes(values)
        loss_value = sum(micro_terms.values())
        if not math.isfinite(loss_value):  # every process sees the same sum, so all stop together
            raise NonFiniteLossError(f"step {step + 1}: the loss is {loss_value} (terms {micro_terms})"
                                     f"{_last_good(run_dir)}. "
                                     "Lower the learning rate, or use fp32 / bf16 instead of fp16.")
        scaled = sum(terms.values()) * weight / config.grad_accum if terms else None
        # An empty share gives a coupled loss no gradient path here: nothing of this process's to backprop.
        if scaled is not None and (scaled.requires_grad or not method.couples_batch):
            (scaler.scale(scaled) if scaler else scaled).backward()
        for name, value in micro_terms.items():
            terms_total[name] = terms_total.get(name, 0.0) + value / config.grad_accum
    return terms_total


def _clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list,
                   max_grad_norm: float | None, *, step: int, terms: dict, run_dir: Path | None) -> tuple[float, bool]:
    """Clip the gradients and step the optimizer: (the norm before clipping, whether fp16 skipped the step)."""
    if scaler:
        scaler.unscale_(optimizer)
    # The norm is needed anyway to refuse non-finite gradients (an infinite max_norm clips nothing).
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
    if scaler:  # fp16: an overflowing step is skipped by the scaler, which then lowers the loss scale
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return grad_norm, scaler.get_scale() < scale
    if not math.isfinite(grad_norm):  # a finite loss whose gradients overflowed: never step on them
        raise NonFiniteLossError(f"step {step + 1}: the gradient norm is {grad_norm} although the loss is finite "
                                 f"(terms {terms}){_last_good(run_dir)}. Lower the learning rate, or train in fp32.")
    optimizer.step()
    return grad_norm, False


def _ends_interval(step: int, every: int | None, total_steps: int) -> bool:
    """Whether step `step` (counted from 1) ends a period of `every` steps, or the run (never when `every` is None)."""
    return bool(every) and (step % every == 0 or step == total_steps)


class _RunLog:
    """A run's records: kept in `history`, written one JSON line each to `run_dir/log.jsonl`, sent to TensorBoard.

    Only the main process writes. A fresh run starts a new log; a resumed one keeps the lines up to its
    checkpoint's step, since it writes the later ones again. Used as a context manager around the loop.
    """

    def __init__(self, run_dir: Path | None, start: int, config: TrainConfig, total_steps: int, per_epoch: int):
        self.config, self.total_steps, self.per_epoch = config, total_steps, per_epoch
        self.history: list[dict] = []
        self.path = run_dir / LOG_FILE if (run_dir is not None and distributed.is_main()) else None
        if self.path is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            if start:
                _trim_log(self.path, start)
            elif self.path.exists():
                self.path.unlink()  # a fresh run: the old log belongs to a discarded attempt
        self.writer = _tensorboard(run_dir) if (config.tensorboard and self.path is not None) else None
        self._file = None

    def __enter__(self) -> _RunLog:
        self.started = time.perf_counter()  # a record's "seconds" count from here
        if self.path is not None:
            self._file = open(self.path, "a")  # closed in __exit__
        return self

    def __exit__(self, *exc) -> bool:
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()
        return False

    def step(self, step: int, lr: float, terms: dict[str, float], grad_norm: float, skipped: bool,
             reduced_bytes: int) -> dict:
        """Record optimizer step `step` (counted from 1); log.jsonl gets every `log_every`-th and the last."""
        record = {"step": step, "epoch": round(step * self.config.grad_accum / self.per_epoch, 4),
                  "lr": lr, "loss": sum(terms.values()), **terms,
                  "grad_norm": grad_norm, "seconds": round(time.perf_counter() - self.started, 3)}
        if skipped:
            record["skipped"] = True  # fp16 overflow: no update this step
        if distributed.is_distributed():
            record["allreduce_bytes"] = reduced_bytes
        self.history.append(record)
        if _ends_interval(step, self.config.log_every, self.total_steps):
            self._write(record)
        if self.writer is not None:
            for name in ("loss", "lr", *terms):
                self.writer.add_scalar(f"train/{name}", record[name], step)
        return record

    def replay(self, records: list[dict]) -> None:
        """Write the records of an identical training (`SharedTraining`) as this run's log."""
        for record in records:
            self.history.append(record)
            if "eval" in record or _ends_interval(record["step"], self.config.log_every, self.total_steps):
                self._write(record)

    def eval(self, step: int, metrics: dict) -> None:
        """Record the validation metrics after step `step` (always written)."""
        self.history.append({"step": step, "eval": metrics})
        self._write(self.history[-1])

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


def _last_good(run_dir: Path | None) -> str:
    """The end of a NonFiniteLossError message: where the checkpoint that is kept lies."""
    return f"; the last good checkpoint is {find_checkpoint(run_dir)}" if run_dir else ""


def _sum_over_processes(terms: dict[str, float]) -> dict[str, float]:
    """Add up each loss term over the processes (in one process: `terms` itself)."""
    if not distributed.is_distributed():
        return terms
    total: dict[str, float] = {}
    for part in distributed.gather_objects(terms):
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value
    return total


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'saftune[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))
