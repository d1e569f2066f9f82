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


def test_a_grid_over_several_datasets_selects_once_and_runs_each(tmp_path, require_asset):
    require_asset("vader")
    grid = {**GRID, "seeds": [1], "methods": ["zeroshot", "saft"],
            "datasets": ["toy-text", {"name": "sentiment-domains", "options": {"max_test": 10, "max_ood": 4}}]}
    grid["selection"] = {"seed": 1, "grid": {"saft": {"lr": [1e-3, 1e-2]}}}
    records = run_bench(BenchConfig.from_dict(grid), tmp_path / "r.jsonl", tmp_path)
    assert [r["run_id"] for r in records] == ["toy-text/zeroshot/seed=1", "toy-text/saft/seed=1",
                                              "sentiment-domains/zeroshot/seed=1", "sentiment-domains/saft/seed=1"]
    assert records[2]["benchmark"]["id"] == 10 and records[2]["benchmark"]["tweets"] == 4
    assert records[1]["method_config"]["lr"] == records[3]["method_config"]["lr"]  # chosen once, on the first
    assert (run_dir(tmp_path, "toy-text/saft/seed=1") / "checkpoint").is_dir()  # the winning trial, reused


def test_every_paper_recipe_parses_and_names_registered_things():
    from pathlib import Path

    from saftune.data import list_datasets
    from saftune.data.registry import check_dataset
    from saftune.models.registry import _MODELS, check_model

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")) + [Path("demo")]
    assert len(recipes) >= 6
    for path in recipes:
        bench = BenchConfig.load(path)
        assert bench.variants(), path
        for name, options in bench.dataset_entries():
            assert name in list_datasets(), (path, name)
            check_dataset(name, options)  # every option exists and is in range
        assert bench.model.partition(":")[0] in _MODELS, path
        check_model(bench.model, bench.model_options)
