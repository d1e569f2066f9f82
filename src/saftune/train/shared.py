"""Trained states that identical trainings share inside one process (a grid).

A grid trains the same thing twice in places: WiSE-FT's row fine-tunes exactly what the `ft` row
fine-tunes (the same model, data, seed, loop settings and `ft` options), and SAFT + WiSE-FT trains what
the `saft` row trains; only what happens after training differs. `fit` asks a `SharedTraining` first and,
when an identical training already ran, loads its trained state instead of training again. Which
methods may share is theirs to say (`Method.training_key`): only those whose trained tensors are all of
their state, and the key holds everything the training depends on, so a shared state is the
bit-identical result of training again.

States live in memory (on the CPU), oldest dropped first beyond `max_bytes`.

Example:
    >>> import torch
    >>> shared = SharedTraining(max_bytes=1024)
    >>> shared.put("k", TrainedState({"w": torch.ones(2)}, steps=4, seconds=1.5))
    >>> shared.get("k").steps, shared.get("other")
    (4, None)
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saftune._io import atomic_path, write_json

logger = logging.getLogger(__name__)


@dataclass
class TrainedState:
    """What a finished training left: the method's state (`Method.state_dict`), steps, seconds, log records."""

    state: dict[str, torch.Tensor]
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


class SharedTraining:
    """Trained states by training key (`fit` builds the key), at most `max_bytes` of tensors kept in memory.

    With `directory`, every state is also written there (safetensors + a JSON file written last), so
    that other processes of the same grid find it.
    """

    def __init__(self, max_bytes: int = 4 * 2**30, directory: str | Path | None = None):
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        self._states: OrderedDict[str, TrainedState] = OrderedDict()
        self.hits = 0

    def get(self, key: str) -> TrainedState | None:
        found = self._states.get(key)
        if found is None and self.directory is not None and (self.directory / f"{key}.json").is_file():
            found = self._read(key)
            if found is not None:
                self._keep(key, found)
        self.hits += found is not None
        return found

    def put(self, key: str, trained: TrainedState) -> None:
        state = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in trained.state.items()}
        trained = TrainedState(state, trained.steps, trained.seconds, list(trained.history))
        if self.directory is not None:
            with atomic_path(self.directory / f"{key}.safetensors") as tmp:
                save_file(state, str(tmp))
            write_json(self.directory / f"{key}.json",  # last: its presence says the state is complete
                       {"steps": trained.steps, "seconds": trained.seconds, "history": trained.history})
        self._keep(key, trained)

    def _keep(self, key: str, trained: TrainedState) -> None:
        if trained.nbytes > self.max_bytes:
            return
        self._states.pop(key, None)
        self._states[key] = trained
        while sum(s.nbytes for s in self._states.values()) > self.max_bytes:
            self._states.popitem(last=False)

    def _read(self, key: str) -> TrainedState | None:
        """The state another process wrote, or None when its files are damaged (the training is redone)."""
        try:
            meta = json.loads((self.directory / f"{key}.json").read_text())
            state = load_file(str(self.directory / f"{key}.safetensors"))
            return TrainedState(state, meta["steps"], meta["seconds"], meta["history"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
            logger.warning("shared training %s is unreadable (%s); training again", key, error)
            return None

    def __len__(self) -> int:
        return len(self._states)
