"""The run record: one finished run as one JSON line, its schema written down once.

`run_experiment` fills a `RunRecord`, the grid runner adds where the run sits in its grid, and the
report reads records back (`RunRecord.from_dict`, tolerant of lines written by older versions: missing
fields take their defaults, unknown keys are kept in `extra` and written back unchanged).

Methods add their own fields through two hooks (`Method.record_fields`, `Method.evaluate_extra`); a
hook that returns a name this dataclass does not declare is refused, so every field a report can meet
is listed here.

Example:
    >>> r = RunRecord(method="saft", seed=1, metrics={"id": 0.7, "ood_avg": 0.75})
    >>> r.to_dict()["metrics"]
    {'id': 0.7, 'ood_avg': 0.75}
    >>> RunRecord.from_dict({"metrics": {"id": 0.7}, "future_field": 1}).extra
    {'future_field': 1}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields


@dataclass
class RunRecord:
    """One run: what was trained, how, and what it scored.

    Metrics are fractions: `val` (the model-selection split), `id`, `ood/<set>` and `ood_avg`, and for
    base-to-new suites `base`, `new`, `hm`.
    """

    metrics: dict = field(default_factory=dict)
    # what ran
    method: str | None = None
    model: str | None = None
    dataset: str | None = None
    seed: int | None = None
    config: dict = field(default_factory=dict)          # the RunConfig
    method_config: dict = field(default_factory=dict)   # the method's options as used
    benchmark: dict = field(default_factory=dict)       # split sizes and the suite's info
    # size and cost
    trainable: int | None = None
    total_params: int | None = None
    steps: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    loss_curve: list | None = None                      # [[step, loss], ...], thinned
    # contributed by methods (`Method.record_fields`, `Method.evaluate_extra`)
    sparsity: float | None = None                       # sparse methods; also the grid's sparsity level
    mask_summary: list | None = None                    # [{"block", "selected", "total"}]: the paper's Fig. 6
    wiseft_curve: list | None = None                    # [{"alpha", <metric>: value}] over the evaluated alphas
    wiseft_alpha: float | None = None                   # the reported mixing weight (None: a per-layer profile)
    wiseft_layer_curve: list | None = None              # [{"layer_alphas": [a_1, ..., a_K], <metric>: value}]
    wiseft_layer_alphas: list | None = None             # the reported per-layer profile, bottom to top
    # set by the grid runner
    run_id: str | None = None
    variant: str | None = None                          # the grid row
    grid: str | None = None
    selected_options: dict = field(default_factory=dict)  # hyperparameters chosen on validation
    selection: dict | None = None                       # how they were chosen (see `saftune.grid`)
    wall_seconds: float | None = None
    extra: dict = field(default_factory=dict)           # keys of newer versions, kept as they were

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """A record from a parsed JSON line; unknown keys go to `extra`."""
        known = cls.field_names()
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        """The JSON line's object: declared fields (None and empty values left out), then `extra`."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None and value != {} and value != []:
                out[f.name] = value
        return {**out, **self.extra}

    def add(self, contributed: dict, source: str) -> None:
        """Set fields contributed by a hook; a name this schema lacks is an error naming `source`."""
        unknown = set(contributed) - self.field_names()
        if unknown:
            raise ValueError(f"{source} returned record fields {sorted(unknown)} that RunRecord does not declare; "
                             "add them to saftune.record.RunRecord")
        for name, value in contributed.items():
            setattr(self, name, value)

    def replace(self, **changes) -> RunRecord:
        return dataclasses.replace(self, **changes)
