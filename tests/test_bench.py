"""The grid runner: hyperparameters chosen on validation data, the winning trial reused exactly."""

import json

import pytest

from saftune.bench import BenchConfig, plan, run_bench, run_dir
from saftune.run import RunConfig, run_experiment

GRID = {
    "name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
    "train": {"epochs": 2, "batch_size": 4, "progress": False},
    "methods": ["zeroshot", "ft", "saft"],
    "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 1e-2]}, "saft": {"lr": [1e-3, 1e-2], "sparsity": [0.01, 0.05]}}},
}


def test_the_winning_trial_is_the_selection_seeds_run_exactly(tmp_path):
    bench = BenchConfig.from_dict(GRID)
    records = {r["run_id"]: r for r in run_bench(bench, tmp_path / "results.jsonl", tmp_path)}
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert len(selection["variants"]["saft"]["trials"]) == 4  # the full lr x sparsity product
    chosen = selection["variants"]["saft"]["chosen"]
    best = max(selection["variants"]["saft"]["trials"], key=lambda t: t["val"])
    assert chosen == best["options"]
    reused = records["saft/seed=1"]
    assert reused["method_config"]["lr"] == chosen["lr"] and reused["method_config"]["sparsity"] == chosen["sparsity"]
    assert reused["metrics"]["val"] == best["val"]
    assert not (tmp_path / "selection").exists() or not any((tmp_path / "selection").iterdir())  # losers deleted
    assert len(reused["loss_curve"]) == reused["steps"]  # the history of the trial, read from its log

    fresh = run_experiment(RunConfig(model="tiny-sentence", dataset="toy-text", method="saft", method_options=chosen,
                                     train=bench.train, seed=1), tmp_path / "fresh")
    assert fresh["metrics"] == reused["metrics"]
    assert (run_dir(tmp_path, "saft/seed=1") / "checkpoint").is_dir()


def test_plan_expands_sparsity_levels_only_for_sparse_methods():
    bench = BenchConfig.from_dict({**GRID, "sparsities": [1e-3, 1e-2], "selection": None})
    cells = [(v.name, s, seed) for v, s, seed in plan(bench)]
    assert ("zeroshot", None, 1) in cells and ("ft", None, 2) in cells
    assert ("saft", 1e-3, 1) in cells and ("saft", 1e-2, 2) in cells
    assert len(cells) == 2 + 2 + 2 * 2


@pytest.mark.parametrize("change, message", [
    ({"methods": ["ft", "nope"]}, "unknown method 'nope'"),
    ({"methods": ["ft", "ft"]}, "two grid rows are named 'ft'"),
    ({"selection": {"grid": {"lora": {"lr": [1]}}}}, "not rows of the grid"),
    ({"seeds": "x"}, "must be an integer"),
    ({"epochs": 3}, "unknown option 'epochs' for BenchConfig"),
])
def test_bad_grids_are_refused_before_any_run(change, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig.from_dict({**GRID, **change}).variants()
