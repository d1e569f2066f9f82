"""The grid runner: hyperparameters chosen on validation data, the winning trial reused exactly."""

import json

import pytest

from saftune.grid import GridConfig, plan, run_dir, run_grid, select_hyperparameters
from saftune.run import RunConfig, run_experiment

GRID = {
    "name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
    "train": {"epochs": 2, "batch_size": 4, "progress": False},
    "methods": ["zeroshot", "ft", "saft"],
    "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 1e-2]}, "saft": {"lr": [1e-3, 1e-2], "sparsity": [0.01, 0.05]}}},
}


def test_the_winning_trial_is_the_selection_seeds_run_exactly(tmp_path):
    bench = GridConfig.from_dict(GRID)
    records = {r.run_id: r for r in run_grid(bench, tmp_path / "results.jsonl", tmp_path)}
    selection = json.loads((tmp_path / "selection.json").read_text())
    trials = selection["variants"]["saft"]["trials"]
    assert [t["options"] for t in trials[:4]] == [{"lr": lr, "sparsity": s} for lr in (1e-3, 1e-2) for s in (0.01, 0.05)]
    assert len(trials) == 4 + sum(e["tried"] for e in selection["variants"]["saft"]["extensions"])
    chosen = selection["variants"]["saft"]["chosen"]
    best = max(trials, key=lambda t: t["mean"])
    assert chosen == best["options"]
    reused = records["saft/seed=1"]
    assert reused.method_config["lr"] == chosen["lr"] and reused.method_config["sparsity"] == chosen["sparsity"]
    assert reused.metrics["val"] == best["val"]["1"]
    assert reused.selected_options == chosen and reused.selection["trials"] == len(trials)
    assert not (tmp_path / "selection").exists() or not any((tmp_path / "selection").iterdir())  # losers deleted
    assert len(reused.loss_curve) == reused.steps  # the history of the trial, read from its log

    fresh = run_experiment(RunConfig(model="tiny-sentence", dataset="toy-text", method="saft", method_options=chosen,
                                     train=bench.train, seed=1), tmp_path / "fresh")
    assert fresh.metrics == reused.metrics
    assert (run_dir(tmp_path, "saft/seed=1") / "checkpoint").is_dir()


def test_plan_expands_sparsity_levels_only_for_sparse_methods():
    bench = GridConfig.from_dict({**GRID, "sparsities": [1e-3, 1e-2], "selection": None})
    cells = [(v.name, s, seed) for v, s, seed in plan(bench)]
    assert ("zeroshot", None, 1) in cells and ("ft", None, 2) in cells
    assert ("saft", 1e-3, 1) in cells and ("saft", 1e-2, 2) in cells
    assert len(cells) == 2 + 2 + 2 * 2


def test_a_row_with_its_own_model_options_runs_on_that_model_and_bad_ones_are_refused_on_reading():
    from saftune.grid import _run_config

    rows = ["saft", {"name": "saft-int8", "method": "saft", "model_options": {"quantize": "int8"}}]
    bench = GridConfig.from_dict({**GRID, "model_options": {"seed": 3}, "methods": rows, "selection": None})
    configs = {v.name: _run_config(bench, v, 1, v.options) for v in bench.variants()}
    assert configs["saft"].model_options == {"seed": 3}
    assert configs["saft-int8"].model_options == {"seed": 3, "quantize": "int8"}
    with pytest.raises(ValueError, match="quantize"):
        GridConfig.from_dict({**GRID, "methods": [{"method": "saft", "model_options": {"quantize": "int4"}}], "selection": None})


@pytest.mark.parametrize("change, message", [
    ({"methods": ["ft", "nope"]}, "unknown method 'nope'"),
    ({"methods": ["ft", "ft"]}, "two grid rows are named 'ft'"),
    ({"selection": {"grid": {"lora": {"lr": [1]}}}}, "not rows of the grid"),
    ({"seeds": "x"}, "must be an integer"),
    ({"epochs": 3}, "unknown option 'epochs' for GridConfig"),
])
def test_bad_grids_are_refused_before_any_run(change, message):
    with pytest.raises(ValueError, match=message):
        GridConfig.from_dict({**GRID, **change}).variants()


def test_a_grid_over_several_datasets_selects_once_and_runs_each(tmp_path, require_asset):
    require_asset("vader")
    grid = {**GRID, "seeds": [1], "methods": ["zeroshot", "saft"],
            "datasets": ["toy-text", {"name": "sentiment-domains", "options": {"max_test": 10, "max_ood": 4}}]}
    grid["selection"] = {"seed": 1, "grid": {"saft": {"lr": [1e-3, 1e-2]}}}
    records = run_grid(GridConfig.from_dict(grid), tmp_path / "r.jsonl", tmp_path)
    assert [r.run_id for r in records] == ["toy-text/zeroshot/seed=1", "toy-text/saft/seed=1",
                                              "sentiment-domains/zeroshot/seed=1", "sentiment-domains/saft/seed=1"]
    assert records[2].benchmark["id"] == 10 and records[2].benchmark["tweets"] == 4
    assert records[1].method_config["lr"] == records[3].method_config["lr"]  # chosen once, on the first
    assert (run_dir(tmp_path, "toy-text/saft/seed=1") / "checkpoint").is_dir()  # the winning trial, reused


def test_every_paper_recipe_parses_and_names_registered_things():
    from pathlib import Path

    from saftune.data import list_datasets
    from saftune.data.registry import check_dataset
    from saftune.models.registry import _MODELS, check_model

    from saftune.grid import RECIPES

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")) + sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        bench = GridConfig.load(path)
        assert bench.variants(), path
        for name, options in bench.dataset_entries():
            assert name in list_datasets(), (path, name)
            check_dataset(name, options)  # every option exists and is in range
        assert bench.model.partition(":")[0] in _MODELS, path
        check_model(bench.model, bench.model_options)


def test_selection_on_every_seed_reuses_each_seeds_winning_trial(tmp_path):
    grid = {**GRID, "methods": ["saft"], "selection": {"all_seeds": True, "extend": 0,
                                                      "grid": {"saft": {"lr": [1e-3, 1e-2]}}}}
    records = {r.run_id: r for r in run_grid(GridConfig.from_dict(grid), tmp_path / "r.jsonl", tmp_path)}
    outcome = json.loads((tmp_path / "selection.json").read_text())["variants"]["saft"]
    assert outcome["seeds"] == [1, 2] and all(set(t["val"]) == {"1", "2"} for t in outcome["trials"])
    best = max(outcome["trials"], key=lambda t: t["mean"])
    assert outcome["chosen"] == best["options"]
    for seed in (1, 2):  # each seed's run is that seed's winning trial, evaluated
        record = records[f"saft/seed={seed}"]
        assert record.metrics["val"] == best["val"][str(seed)]
        assert (run_dir(tmp_path, f"saft/seed={seed}") / "checkpoint").is_dir()
    assert records["saft/seed=1"].selection["val_mean"] == pytest.approx(best["mean"])
    assert records["saft/seed=1"].selection["val_std"] == pytest.approx(best["std"])


def _fake_trials(monkeypatch, val_of_lr):
    """Trials without training: validation accuracy is a function of the learning rate."""
    from saftune import pool as pool_module
    from saftune.record import RunRecord

    def fake(config, out_dir=None, **kwargs):
        assert kwargs.get("evaluate_splits") == "val"  # selection never looks at test or OOD data
        return RunRecord(metrics={"val": val_of_lr(config.method_options["lr"])})

    monkeypatch.setattr(pool_module, "run_experiment", fake)


def test_an_edge_choice_is_extended_until_it_is_interior(tmp_path, monkeypatch):
    _fake_trials(monkeypatch, lambda lr: -abs(lr - 0.05))  # the optimum lies above the listed values
    grid = GridConfig.from_dict({**GRID, "seeds": [1], "methods": ["ft"],
                                 "selection": {"epochs": 1, "extend": 3, "grid": {"ft": {"lr": [1e-3, 3e-3, 1e-2]}}}})
    chosen = select_hyperparameters(grid, tmp_path)
    outcome = json.loads((tmp_path / "selection.json").read_text())["variants"]["ft"]
    assert [t["options"]["lr"] for t in outcome["trials"]] == [1e-3, 3e-3, 1e-2, 0.0333, 0.111]
    assert [(e["direction"], e["value"], e["tried"]) for e in outcome["extensions"]] == [("high", 0.0333, True),
                                                                                            ("high", 0.111, True)]
    assert chosen["ft"]["chosen"] == {"lr": 0.0333} and outcome["interior"] == {"lr": True}


def test_an_edge_choice_at_a_limit_is_reported_not_extended(tmp_path, monkeypatch):
    _fake_trials(monkeypatch, lambda lr: lr)  # the larger the better, without end
    grid = GridConfig.from_dict({**GRID, "seeds": [1], "methods": ["ft"],
                                 "selection": {"epochs": 1, "limits": {"lr": [1e-4, 1e-2]},
                                               "grid": {"ft": {"lr": [1e-3, 1e-2]}}}})
    select_hyperparameters(grid, tmp_path)
    outcome = json.loads((tmp_path / "selection.json").read_text())["variants"]["ft"]
    assert len(outcome["trials"]) == 2 and outcome["extensions"] == [
        {"round": 1, "option": "lr", "direction": "high", "value": 0.1, "tried": False}]
    assert outcome["chosen"] == {"lr": 1e-2} and outcome["interior"] == {"lr": False}


def test_an_extension_outside_an_options_range_is_not_tried(tmp_path, monkeypatch):
    from saftune import pool as pool_module
    from saftune.record import RunRecord

    monkeypatch.setattr(pool_module, "run_experiment",
                        lambda config, *a, **k: RunRecord(metrics={"val": config.method_options["sparsity"]}))
    grid = GridConfig.from_dict({**GRID, "seeds": [1], "methods": ["saft"],
                                 "selection": {"epochs": 1, "grid": {"saft": {"sparsity": [0.3, 0.9]}}}})
    select_hyperparameters(grid, tmp_path)
    outcome = json.loads((tmp_path / "selection.json").read_text())["variants"]["saft"]
    assert outcome["extensions"][0]["value"] > 1 and not outcome["extensions"][0]["tried"]  # sparsity <= 1
