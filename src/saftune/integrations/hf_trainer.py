"""SAFT (phase 1 + phase 2) inside an unchanged `transformers.Trainer` or `trl.SFTTrainer`.

`sparsify_for_trainer` selects the mask with the model's own loss over the batches the Trainer's dataset
and collator make, then prepares the model in place. The Trainer is then used as usual: its optimizer,
gradient clipping, mixed precision, checkpoints and `resume_from_checkpoint` all work on the selected
values, and every checkpoint (and `trainer.save_model(dir)`) holds only them, as a saftune delta
directory::

    saft = sparsify_for_trainer(model, train_dataset, collator, sparsity=1e-3, batch_size=8)  # phase 1 + 2
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    trainer.train()                     # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out/")          # SparseDelta.from_pretrained("out/") loads it
    merged = saft.merge_and_unload()    # a plain model with the trained values: save_pretrained saves it whole

With `trl.SFTTrainer`, which tokenizes the dataset and builds its collator itself, build the trainer
first and give phase 1 what it built: `sparsify_for_trainer(trainer.model, trainer.train_dataset,
trainer.data_collator, ...)` (the optimizer is only created in `train()`).

Why this way (transformers 5.x):

* The value vectors are registered as parameters of the model itself (a `saftune_values` submodule that
  repeats each parameter's dotted name), so the Trainer's optimizer, clipping, mixed precision and weight
  decay grouping (no decay for names with `bias` / `norm`) see them as they see any parameter. The
  model stays the user's `PreTrainedModel`: nothing in Trainer or TRL that inspects the model changes.
* `Trainer._save` (every checkpoint, and `save_model`) calls `model.save_pretrained(dir)`; for a
  `PeftModel` that writes only the adapter. The prepared model's `save_pretrained` does the same for
  SAFT: `model.safetensors` with only the values, plus the delta (`saftune_config.json`,
  `delta.safetensors`). No `config.json` is written: `from_pretrained` on a checkpoint must fail, not
  build a random model around the missing weights.
* On resume, `Trainer._load_from_checkpoint` loads `model.safetensors` with
  `model.load_state_dict(state, strict=False)`; a post-load hook writes the values into the weights
  (after checking the checkpoint was trained with this mask on this base model). The model's
  `_keys_to_ignore_on_save` lists the frozen weights, so the Trainer takes their absence from the
  checkpoint as intended instead of warning about every one of them.
* A `TrainerCallback` cannot do this alone: `on_save` runs after `_save` has written the full model, and
  `_load_from_checkpoint` runs before any callback and refuses a directory without a weights file.
* TRL's `SFTTrainer` computes the loss with a fused LM head that reads `lm_head.weight` directly instead
  of calling the `lm_head` module, where the engine's sparse kernel sits. The output embedding
  therefore also gets a gradient hook (as the engine's `hook` path): whatever reads the weight directly
  sends the selected entries' gradient to the values too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from saftune._io import atomic_path
from saftune.sparse.delta import DeltaError, SparseDelta
from saftune.sparse.engine import sparsify
from saftune.sparse.mask import SparseMask
from saftune.sparse.select import select_mask

logger = logging.getLogger(__name__)

# The model's attribute that holds the values, and the prefix of their keys in a checkpoint.
VALUES_ATTRIBUTE = "saftune_values"
_FINGERPRINT = "mask_fingerprint"
_MISSING = object()


class _Values(nn.Module):
    """The value vectors under their parameters' own dotted names, and the fingerprint of mask and base model."""

    def __init__(self, named_values: Iterable[tuple[str, nn.Parameter]], fingerprint: str):
        super().__init__()
        for name, values in named_values:
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, values)
        # A checkpoint carries it, so resuming with another mask or base model fails instead of mixing them up.
        self.register_buffer(_FINGERPRINT, _fingerprint_tensor(fingerprint))


def _fingerprint_tensor(fingerprint: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(fingerprint.removeprefix("sha256:"))), dtype=torch.uint8)


def _gather_into(values: nn.Parameter, indices: torch.Tensor, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: add the selected entries of a dense gradient to `values.grad`, free the rest."""
    if param.grad is None:  # autograd also calls it after a kernel, which returns no weight gradient
        return
    grad = param.grad.reshape(-1).index_select(0, indices).to(values.dtype)
    param.grad = None
    if values.grad is None:
        values.grad = grad
    else:
        values.grad.add_(grad)


class TrainerSparseModel:
    """A `PreTrainedModel` prepared in place for SAFT under `transformers.Trainer` (see the module docstring).

    Made by `prepare_for_trainer` or `sparsify_for_trainer`; the model itself goes to the Trainer.

    Attributes:
        model: the prepared model (its weights always hold the current values).
        sparse_model: the engine's `SparseModel` (`saftune.sparsify`).
        delta_config: recorded in every saved delta's `saftune_config.json`.
    """

    def __init__(self, model: nn.Module, mask: SparseMask, *, kernels: str = "auto", delta_config: Mapping | None = None):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"prepare_for_trainer needs a transformers PreTrainedModel, got {type(model).__name__}: Trainer saves "
                "other modules with their full state_dict. For a custom nn.Module use saftune.sparsify with your own loop"
            )
        if VALUES_ATTRIBUTE in model._modules:
            raise ValueError("this model is already prepared for SAFT; call merge_and_unload() on it first")
        self.model = model
        frozen_keys = set(model.state_dict())  # before the values join the model
        self.sparse_model = sparsify(model, mask, kernels=kernels)
        name_or_path = getattr(model, "name_or_path", "") or ""
        self.delta_config = {"method": "saft", **({"base_model": name_or_path} if name_or_path else {}), **(delta_config or {})}
        self._fingerprint = self.sparse_model.delta().fingerprint
        self._values = _Values(self.sparse_model.named_trainable_parameters(), self._fingerprint)
        model.add_module(VALUES_ATTRIBUTE, self._values)
        self._device = next(self._values.parameters()).device
        self._saved_ignore = model.__dict__.get("_keys_to_ignore_on_save", _MISSING)
        model._keys_to_ignore_on_save = frozen_keys
        model.save_pretrained = self.save_pretrained  # shadows PreTrainedModel.save_pretrained for this instance only
        self._handles = [
            self._values.register_load_state_dict_post_hook(self._after_load),
            model.register_forward_pre_hook(self._check_device),
            *self._guard_output_embedding(),
        ]
        logger.info("prepared for Trainer: %d trainable values in %d tensors", self.num_trainable, len(mask.indices))

    # ------------------------------------------------------------------ facts
    @property
    def mask(self) -> SparseMask:
        """The mask being trained."""
        return self.sparse_model.mask

    @property
    def num_trainable(self) -> int:
        """d, the number of trained entries (Trainer's "trainable parameters" log line also counts frozen tensors
        that only carry a gradient to the values)."""
        return self.sparse_model.num_trainable

    def __repr__(self) -> str:
        return f"TrainerSparseModel({type(self.model).__name__}, trainable={self.num_trainable})"

    # ------------------------------------------------------------------ saving
    def delta(self, **config) -> SparseDelta:
        """The current values as a `SparseDelta` (config: `delta_config`, the mask's settings and `config`)."""
        return self.sparse_model.delta(**{**self.delta_config, **config})

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                        **kwargs) -> Path | None:
        """Write the values only: a saftune delta directory, plus `model.safetensors` that Trainer resumes from.

        It stands in for the model's own `save_pretrained` (Trainer calls it for every checkpoint and for
        `save_model`). `state_dict` and the other arguments of `PreTrainedModel.save_pretrained` are ignored.

        Args:
            save_directory: directory to write into (created when missing).
            is_main_process: only the main process writes.
        """
        from transformers.utils import SAFE_WEIGHTS_NAME

        if push_to_hub:
            raise NotImplementedError("push_to_hub: upload the saved delta directory yourself (huggingface_hub.upload_folder)")
        if state_dict is not None:
            logger.warning("save_pretrained: the state_dict passed in is ignored; a SAFT model saves only its trained values")
        if not is_main_process:
            return None
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{VALUES_ATTRIBUTE}.{k}": t.detach().cpu().contiguous()
                   for k, t in self._values.state_dict().items()}
        with atomic_path(directory / SAFE_WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "saftune": "trained values only; the delta is beside it"})
        self.delta().save_pretrained(directory)
        return directory

    def _after_load(self, module: nn.Module, incompatible_keys) -> None:
        """After `load_state_dict` (Trainer's resume): check the checkpoint fits, then write the values into the weights."""
        suffix = f"{VALUES_ATTRIBUTE}.{_FINGERPRINT}"
        if any(k == _FINGERPRINT or k.endswith(suffix) for k in incompatible_keys.missing_keys):
            raise DeltaError(
                "the state dict loaded into this SAFT model has no saftune values (is it a full fine-tuning checkpoint?); "
                "resume from a checkpoint of this SAFT run, or call merge_and_unload() before loading other weights"
            )
        expected = _fingerprint_tensor(self._fingerprint).to(self._values.mask_fingerprint.device)
        if not torch.equal(self._values.mask_fingerprint, expected):
            raise DeltaError(
                "this checkpoint was trained with another mask or on another base model: its fingerprint differs from "
                "this model's (whose values it has now overwritten: build the model again). Resume with the same base "
                "model and mask: rerun phase 1 on the same data and settings, or prepare_for_trainer(model, "
                "SparseDelta.from_pretrained(checkpoint).to_mask())"
            )
        self.sparse_model.sync()

    # ------------------------------------------------------------------ guards
    def _check_device(self, module: nn.Module, args) -> None:
        if next(self._values.parameters()).device != self._device:
            raise RuntimeError(
                f"the model moved from {self._device} to {next(self._values.parameters()).device} after prepare_for_trainer; "
                "move it to its device first (model.to(device)), then call sparsify_for_trainer / prepare_for_trainer"
            )

    def _guard_output_embedding(self) -> list:
        """Give the output embedding a dense-gradient hook when the engine put it on a kernel (see module docstring)."""
        try:
            output = self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return []
        weight = getattr(output, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.requires_grad:  # absent, or already on the engine's hook path
            return []
        name = next((n for n, p in self.model.named_parameters() if p is weight), None)
        if name not in self.mask.indices:
            return []
        values = dict(self.sparse_model.named_trainable_parameters())[name]
        indices = self.mask.indices[name].to(weight.device)
        weight.requires_grad_(True)  # the kernels return no weight gradient, so only direct reads produce one
        return [weight.register_post_accumulate_grad_hook(partial(_gather_into, values, indices))]

    # ------------------------------------------------------------------ leaving
    def merge_and_unload(self) -> nn.Module:
        """Remove everything this preparation added; the model keeps the trained values as plain weights.

        After it, `model.save_pretrained(dir)` saves the whole merged model again.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self.model
        model.__dict__.pop("save_pretrained", None)
        if self._saved_ignore is _MISSING:
            model.__dict__.pop("_keys_to_ignore_on_save", None)
        else:
            model._keys_to_ignore_on_save = self._saved_ignore
        if VALUES_ATTRIBUTE in model._modules:
            delattr(model, VALUES_ATTRIBUTE)
        return self.sparse_model.unsparsify()


def prepare_for_trainer(model: nn.Module, mask: SparseMask, *, kernels: str = "auto",
                        delta_config: Mapping | None = None) -> TrainerSparseModel:
    """Phase 2 only: prepare `model` (in place) to train the entries of `mask` under `transformers.Trainer`.

    Move the model to its device first. Build the Trainer's optimizer after this call (the default
    optimizer is built in `train()`).

    Args:
        model: a `transformers.PreTrainedModel`.
        mask: a `SparseMask` (`select_mask`, `SparseMask.load`, or `SparseDelta.from_pretrained(dir).to_mask()`).
        kernels: the engine's kernel choice (see `saftune.sparsify`).
        delta_config: extra settings recorded in every saved delta (e.g. {"base_model": "my-model"}).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from saftune.models.tiny_lm import tiny_lm_config
        >>> model = AutoModelForCausalLM.from_config(tiny_lm_config("llama"))
        >>> mask = SparseMask({"model.norm.weight": torch.tensor([0, 5])}, {"model.norm.weight": (32,)})
        >>> saft = prepare_for_trainer(model, mask)
        >>> [n for n, p in model.named_parameters() if n.startswith("saftune_values")]
        ['saftune_values.model.norm.weight']
        >>> _ = saft.merge_and_unload()
    """
    return TrainerSparseModel(model, mask, kernels=kernels, delta_config=delta_config)


def model_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's own loss on a collated batch, repeated once per row: shape [B], as `select_mask` wants.

    Each batch's mean loss (what the Trainer minimises) weighs as many examples as the batch has rows.
    """
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"the model returned no loss for a collated batch (keys {sorted(batch)}): the collator must add `labels` "
            "(e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)), or pass loss_fn"
        )
    rows = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), 1)
    return loss.reshape(()).expand(rows)


def trainer_batches(train_dataset, data_collator: Callable | None, batch_size: int, device) -> Iterator[dict]:
    """Collated batches of `train_dataset` in order, on `device`, as Trainer's dataloader makes them (unshuffled)."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    loader = DataLoader(train_dataset, batch_size=batch_size, collate_fn=data_collator or default_data_collator, shuffle=False)
    for batch in loader:
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sparsify_for_trainer(
    model: nn.Module,
    train_dataset,
    data_collator: Callable | None = None,
    *,
    sparsity: float,
    batch_size: int = 8,
    loss_fn: Callable | None = None,
    score: str = "grad",
    include=None,
    exclude=None,
    budget: str = "global",
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    kernels: str = "auto",
    delta_config: Mapping | None = None,
    lean: bool = False,
    chunk_batches: int | None = None,
) -> TrainerSparseModel:
    """Phase 1 and phase 2 for `transformers.Trainer` / `trl.SFTTrainer`: select the mask, then prepare the model.

    Phase 1 runs the model's own loss (`model_loss`) over `train_dataset` collated by `data_collator`
    (the same dataset and collator the Trainer gets; with SFTTrainer, `trainer.train_dataset` and
    `trainer.data_collator`). Move the model to its device first.

    Args:
        model: a `transformers.PreTrainedModel`.
        train_dataset: a map-style dataset (`datasets.Dataset`, a list of dicts, ...) whose items the collator takes.
            Trainer drops the columns its model does not take before collating; drop those the collator cannot
            handle yourself (`dataset.remove_columns(["text"])`).
        data_collator: the Trainer's collator (default: `transformers.default_data_collator`).
        sparsity: fraction of the entries to train, in (0, 1].
        batch_size: phase 1 batch size.
        loss_fn: `loss_fn(model, batch) -> [B]` instead of the model's own loss.
        score, include, exclude, budget, max_batches, seed, progress: as in `saftune.select_mask`.
        kernels: the engine's kernel choice (see `saftune.sparsify`).
        delta_config: extra settings recorded in every saved delta.
        lean, chunk_batches: phase 1 one block at a time (the same mask, one block's fp32 sums instead of
            every parameter's: for models near the memory limit); see `saftune.select_mask`.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from saftune.models.tiny_lm import tiny_lm_config
        >>> model = AutoModelForCausalLM.from_config(tiny_lm_config("llama"))
        >>> data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 4
        >>> saft = sparsify_for_trainer(model, data, sparsity=0.01, batch_size=2)
        >>> saft.num_trainable == saft.mask.num_selected
        True
        >>> _ = saft.merge_and_unload()
    """
    device = next(model.parameters()).device
    mask = select_mask(
        model, loss_fn or model_loss, trainer_batches(train_dataset, data_collator, batch_size, device),
        sparsity=sparsity, score=score, include=include, exclude=exclude, budget=budget, max_batches=max_batches,
        seed=seed, progress=progress, lean=lean, chunk_batches=chunk_batches,
    )
    return prepare_for_trainer(model, mask, kernels=kernels, delta_config=delta_config)
