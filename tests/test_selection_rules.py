"""The selection-rules grid (`saftune grid selection-rules`), smoke-sized: every rule runs end to end."""

import math

from saftune.grid import GridConfig, run_dir, run_grid
from saftune.sparse import SparseMask

RULES = {  # row -> (score, budget, max_batches) its mask must record
    "saft": ("grad", "global", None), "saft-random": ("random", "global", None), "gps": ("grad", "per_row", None),
    "fps": ("fps", "global", None), "lt-sft": ("lt-sft", "global", None), "sift": ("grad", "per_tensor", 1),
}


def test_the_selection_rules_recipe_runs_on_a_tiny_model(tmp_path):
    recipe = GridConfig.load("selection-rules")
    assert [v.name for v in recipe.variants()] == list(RULES)
    assert all(v.options["sparsity"] == 0.001 for v in recipe.variants())
    assert recipe.seeds == [1, 2, 3] and recipe.model == "minilm" and recipe.dataset == "sentiment-domains"
    lrs = {name: grid["lr"] for name, grid in recipe.selection.grid.items()}
    assert lrs.keys() == RULES.keys() and all(len(values) == 3 for values in lrs.values())

    # one candidate learning rate per row keeps the smoke run short (the selection itself is tested in test_grid.py)
    smoke = recipe.replace(model="tiny-sentence", dataset="toy-text", dataset_options={}, seeds=[1],
                           train={**recipe.train.to_dict(), "epochs": 1, "batch_size": 4, "progress": False},
                           selection={"seed": 1, "grid": {name: {"lr": values[1:2]} for name, values in lrs.items()}})
    records = {r.run_id: r for r in run_grid(smoke, tmp_path / "results.jsonl", tmp_path)}
    assert set(records) == {f"{name}/seed=1" for name in RULES}
    masks = {}
    for name, (score, budget, max_batches) in RULES.items():
        record = records[f"{name}/seed=1"]
        assert record.method_config["lr"] == lrs[name][1], name
        masks[name] = mask = SparseMask.load(run_dir(tmp_path, f"{name}/seed=1") / "mask.safetensors")
        assert (mask.meta["score"], mask.meta["budget"], mask.meta.get("max_batches")) == (score, budget, max_batches)
        assert mask.num_selected == record.trainable == math.floor(0.001 * mask.num_candidates), name
        assert 0.0 <= record.metrics["id"] <= 1.0
    assert masks["fps"].num_candidates < masks["saft"].num_candidates  # nn.Linear and nn.Embedding weights only
    assert masks["lt-sft"].meta["score_options"] == {"steps": 40, "lr": 1e-4}
    assert masks["gps"] != masks["saft"] and masks["sift"] != masks["saft"]
