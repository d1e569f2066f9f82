"""What a grid's runs share (`RunCache`): each shared result equals the one redoing the work gives."""

import json

import pytest
import torch

from saftune.data import Benchmark, Split
from saftune.eval import evaluate
from saftune.eval.cache import EvaluationCache, weights_digest
from saftune.grid import GridConfig, run_dir, run_grid
from saftune.models import create
from saftune.run import RunCache, RunConfig, run_experiment
from saftune.train.shared import SharedTraining, TrainedState
from saftune.train.trainer import TrainConfig

TRAIN = TrainConfig(epochs=2, batch_size=4, progress=False)


def _run(method, options, cache=None, out=None, seed=1):
    config = RunConfig(model="tiny-sentence", dataset="toy-text", method=method, method_options=options,
                       train=TRAIN, seed=seed)
    return run_experiment(config, out, cache=cache)


def _toy_benchmark():
    s = Split("toy", ["good film", "bad film", "a fine and good film", "awful"], [1, 0, 1, 0])
    return Benchmark("toy", "text", ["negative", "positive"], ["a {} review."], s, s, s,
                     {"other": Split("other", ["great", "dull"], [1, 0])})


def test_a_cached_evaluation_equals_evaluating_and_changed_weights_miss():
    model, bench = create("tiny-sentence"), _toy_benchmark()
    cache = EvaluationCache()
    first = evaluate(model, bench, batch_size=2, include_val=True, cache=cache)
    assert cache.hits == 1 and len(cache) == 2  # val and test are the same split: one entry, hit once
    again = evaluate(model, bench, batch_size=2, include_val=True, cache=cache)
    assert again == first == evaluate(model, bench, batch_size=2, include_val=True)
    assert cache.hits == 1 + 3
    with torch.no_grad():
        next(model.parameters()).mul_(-1.0)
    changed = evaluate(model, bench, batch_size=2, include_val=True, cache=cache)
    assert changed == evaluate(model, bench, batch_size=2, include_val=True)
    assert cache.hits == 4 + 1 and len(cache) == 4  # the new weights were evaluated (then test hit val's)
    # The batch size is part of the key (padding changes float rounding).
    evaluate(model, bench, batch_size=3, cache=cache)
    assert len(cache) == 6


def test_the_weights_digest_sees_every_parameter_and_buffer():
    net = torch.nn.BatchNorm1d(3)
    before = weights_digest(net)
    net.running_mean += 1.0
    assert weights_digest(net) != before
    copy = torch.nn.BatchNorm1d(3)
    copy.load_state_dict(net.state_dict())
    assert weights_digest(copy) == weights_digest(net)


def test_wiseft_shares_the_ft_rows_training_and_gives_the_same_result(tmp_path):
    cache = RunCache()
    ft = _run("ft", {"lr": 1e-3}, cache)
    shared = _run("wiseft", {"lr": 1e-3, "alphas": [0.0, 0.5, 1.0]}, cache, tmp_path / "shared")
    alone = _run("wiseft", {"lr": 1e-3, "alphas": [0.0, 0.5, 1.0]}, None, tmp_path / "alone")
    assert cache.trainings.hits == 1
    assert shared.metrics == alone.metrics and shared.wiseft_curve == alone.wiseft_curve
    assert shared.wiseft_curve[-1] | {"alpha": 0} == ft.metrics | {"alpha": 0}  # alpha 1 is the ft model
    assert 0 < shared.train_seconds <= ft.train_seconds and shared.loss_curve == alone.loss_curve
    # alpha 1 and every split of the ft run were looked up, not evaluated again
    assert cache.evaluations.hits >= len(ft.metrics) - 1


def test_a_shared_training_leaves_a_checkpoint_a_grid_run_resumes_from(tmp_path):
    cache = RunCache()
    _run("saft", {"lr": 1e-2, "sparsity": 0.05}, cache)
    config = RunConfig(model="tiny-sentence", dataset="toy-text", method="wiseft",
                       method_options={"base": "saft", "lr": 1e-2, "base_options": {"sparsity": 0.05},
                                       "alphas": [0.0, 1.0]}, train=TRAIN.replace(checkpoint_every=10**9))
    trial = run_experiment(config, tmp_path / "trial", cache=cache, evaluate_splits="val")
    assert cache.trainings.hits == 1 and (tmp_path / "trial" / "checkpoint").is_dir()
    resumed = run_experiment(config, tmp_path / "trial")  # the grid's run of the winning trial: evaluation only
    fresh = run_experiment(config, tmp_path / "fresh")
    assert resumed.metrics == fresh.metrics and resumed.metrics["val"] == trial.metrics["val"]


def test_methods_without_a_training_key_never_share(tmp_path):
    cache = RunCache()
    _run("l2sp", {"lr": 1e-3}, cache)
    _run("l2sp", {"lr": 1e-3}, cache)
    assert cache.trainings.hits == 0 and len(cache.trainings) == 0


def test_different_seeds_or_options_do_not_share():
    cache = RunCache()
    _run("ft", {"lr": 1e-3}, cache, seed=1)
    _run("wiseft", {"lr": 1e-3}, cache, seed=2)
    _run("wiseft", {"lr": 3e-3}, cache, seed=1)
    assert cache.trainings.hits == 0 and len(cache.trainings) == 3


def test_shared_states_beyond_the_byte_budget_drop_the_oldest():
    shared = SharedTraining(max_bytes=3 * 4 * 10)
    for key in "abcd":
        shared.put(key, TrainedState({"w": torch.zeros(10)}, steps=1, seconds=0.0))
    assert shared.get("a") is None and all(shared.get(k) is not None for k in "bcd")
    shared.put("huge", TrainedState({"w": torch.zeros(100)}, steps=1, seconds=0.0))
    assert shared.get("huge") is None and len(shared) == 3


def test_a_grid_with_ft_and_wiseft_rows_trains_each_shared_training_once(tmp_path):
    grid = GridConfig.from_dict({
        "name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
        "train": {"epochs": 2, "batch_size": 4, "progress": False},
        "methods": ["ft", {"name": "wiseft", "method": "wiseft", "options": {"alphas": [0.0, 1.0]}}],
        "selection": {"seed": 1, "extend": 0, "grid": {"ft": {"lr": [1e-4, 1e-2]}, "wiseft": {"lr": [1e-4, 1e-2]}}}})
    records = {r.run_id: r for r in run_grid(grid, tmp_path / "r.jsonl", tmp_path)}
    selection = json.loads((tmp_path / "selection.json").read_text())["variants"]
    # WiSE-FT's trials at alpha 1 are the ft trials: same validation accuracy for the same learning rate.
    ft_val = {t["options"]["lr"]: t["val"]["1"] for t in selection["ft"]["trials"]}
    for seed in (1, 2):
        wise = records[f"wiseft/seed={seed}"]
        if wise.selected_options == records[f"ft/seed={seed}"].selected_options:
            assert wise.wiseft_curve[-1]["id"] == records[f"ft/seed={seed}"].metrics["id"]
        fresh = run_experiment(RunConfig(model="tiny-sentence", dataset="toy-text", method="wiseft",
                                         method_options={"alphas": [0.0, 1.0], **wise.selected_options},
                                         train=grid.train, seed=seed), tmp_path / f"fresh{seed}")
        assert fresh.metrics == wise.metrics
    assert set(ft_val) == {1e-4, 1e-2}
    assert (run_dir(tmp_path, "wiseft/seed=1") / "checkpoint").is_dir()


@pytest.mark.parametrize("method, options", [("coop", {"lr": 1e-2, "n_ctx": 2}), ("lora", {"lr": 1e-2}),
                                             ("saft", {"lr": 1e-2, "sparsity": 0.05})])
def test_an_evaluation_cache_gives_every_method_its_own_accuracies(method, options):
    # Methods that attach modules (prompts, adapters) or write into weights: their evaluations never collide.
    cache = RunCache()
    zero = _run("zeroshot", {}, cache)
    trained = _run(method, options, cache)
    assert trained.metrics == _run(method, options).metrics
    assert zero.metrics == _run("zeroshot", {}).metrics


def test_two_worker_processes_give_the_grid_the_same_records_and_share_through_files(tmp_path):
    grid = {"name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
            "train": {"epochs": 2, "batch_size": 4, "progress": False},
            "methods": ["zeroshot", "ft", {"name": "wiseft", "method": "wiseft", "options": {"alphas": [0.0, 1.0]}}],
            "selection": {"seed": 1, "extend": 0, "grid": {"ft": {"lr": [1e-4, 1e-2]}, "wiseft": {"lr": [1e-4, 1e-2]}}}}
    alone = run_grid(GridConfig.from_dict(grid), tmp_path / "a" / "r.jsonl", tmp_path / "a")
    pooled = run_grid(GridConfig.from_dict({**grid, "workers": 2}), tmp_path / "b" / "r.jsonl", tmp_path / "b")
    assert [r.run_id for r in pooled] == [r.run_id for r in alone]  # the jobs' order, whoever finished first
    for a, b in zip(alone, pooled):
        assert b.metrics == a.metrics and b.selected_options == a.selected_options
    assert not (tmp_path / "b" / "cache").exists()  # the shared files go when the grid is complete


def test_urgent_jobs_go_to_the_next_free_worker_before_earlier_queued_ones(monkeypatch, tmp_path):
    from concurrent.futures import Future

    from saftune import pool as pool_module

    started = []  # (job name, its executor future), in the order the workers got them

    class FakeExecutor:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, job):
            future = Future()
            started.append((job.config.method_options["name"], future))
            return future

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", FakeExecutor)

    def job(name):
        return pool_module.Job(RunConfig(model="tiny-sentence", dataset="toy-text", method="zeroshot",
                                         method_options={"name": name}))

    with pool_module.RunPool(2, cache_dir=tmp_path) as pool:
        normal = pool.submit([job(f"n{i}") for i in range(4)])
        urgent = pool.submit([job("u0"), job("u1")], urgent=True)
        assert [name for name, _ in started] == ["n0", "n1"]  # no more jobs than workers were handed out
        started[0][1].set_result("record n0")
        assert [name for name, _ in started] == ["n0", "n1", "u0"]
        assert normal[0].result() == "record n0"
        started[1][1].set_exception(RuntimeError("job n1 failed"))
        started[2][1].set_result("record u0")
        assert [name for name, _ in started] == ["n0", "n1", "u0", "u1", "n2"]
        with pytest.raises(RuntimeError, match="n1 failed"):
            normal[1].result()
        assert urgent[0].result() == "record u0"
    assert normal[3].cancelled()  # a job still waiting when the pool closes never starts


def test_jobs_doing_the_same_work_never_run_side_by_side(monkeypatch, tmp_path):
    from concurrent.futures import Future

    from saftune import pool as pool_module
    from saftune.grid import _same_work

    started = []

    class FakeExecutor:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, job):
            started.append((job.config.seed, job.config.method, Future()))
            return started[-1][2]

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", FakeExecutor)

    def job(method, seed):
        config = RunConfig(model="tiny-sentence", dataset="toy-text", method=method, seed=seed)
        return pool_module.Job(config, same_work=_same_work(config))

    assert job("zeroshot", 1).same_work == job("zeroshot", 2).same_work and job("ft", 1).same_work is None
    with pool_module.RunPool(2, cache_dir=tmp_path) as pool:
        handles = pool.submit([job("zeroshot", 1), job("zeroshot", 2), job("ft", 1), job("ft", 2)])
        # zero-shot seed 2 would evaluate what seed 1 is evaluating: ft takes the second worker
        assert [(seed, method) for seed, method, _ in started] == [(1, "zeroshot"), (1, "ft")]
        started[0][2].set_result("zeroshot 1")
        assert [(seed, method) for seed, method, _ in started][2:] == [(2, "zeroshot")]
        started[1][2].set_result("ft 1")
        started[2][2].set_result("zeroshot 2")
        assert [(seed, method) for seed, method, _ in started][3:] == [(2, "ft")]
        assert [h.result() for h in handles[:3]] == ["zeroshot 1", "zeroshot 2", "ft 1"]


def test_a_damaged_shared_training_file_is_a_miss_not_an_error(tmp_path, caplog):
    from saftune.train.shared import SharedTraining, TrainedState

    SharedTraining(directory=tmp_path).put("k", TrainedState({"w": torch.ones(3)}, steps=2, seconds=1.0))
    assert torch.equal(SharedTraining(directory=tmp_path).get("k").state["w"], torch.ones(3))
    (tmp_path / "k.safetensors").write_bytes(b"not safetensors")
    assert SharedTraining(directory=tmp_path).get("k") is None
    assert "unreadable" in caplog.text


def test_a_sparsity_sweep_scores_once_per_seed_and_selects_what_scoring_again_selects(tmp_path):
    cache = RunCache()
    dense = _run("saft", {"lr": 1e-2, "sparsity": 0.05}, cache, tmp_path / "a")
    sparse = _run("saft", {"lr": 3e-3, "sparsity": 0.01}, cache, tmp_path / "b")
    alone = _run("saft", {"lr": 3e-3, "sparsity": 0.01}, None, tmp_path / "c")
    assert cache.scores.hits == 1 and len(cache.scores) == 1  # the second run's learning rate and sparsity differ
    from saftune.sparse import SparseMask
    masks = {name: SparseMask.load(tmp_path / name / "mask.safetensors") for name in "abc"}
    for name, tensor in masks["c"].indices.items():
        assert torch.equal(masks["b"].indices[name], tensor)
    assert masks["a"].num_selected > masks["b"].num_selected
    assert sparse.metrics == alone.metrics and dense.metrics != sparse.metrics
    _run("saft", {"lr": 3e-3, "sparsity": 0.01}, cache, tmp_path / "d", seed=2)  # another seed scores again
    _run("saft", {"lr": 3e-3, "sparsity": 0.01, "score": "random"}, cache, tmp_path / "e")  # no data: not kept
    assert cache.scores.hits == 1 and len(cache.scores) == 2


def test_a_finished_run_directory_is_not_run_again_but_a_trial_is_evaluated_fully(tmp_path, monkeypatch):
    from saftune import run as run_module

    first = _run("ft", {"lr": 1e-3}, out=tmp_path / "r")
    calls = []
    monkeypatch.setattr(run_module, "fit", lambda *a, **k: calls.append(1))
    again = _run("ft", {"lr": 1e-3}, out=tmp_path / "r")  # a grid stopped before writing its results line
    assert not calls and again.metrics == first.metrics and again.train_seconds == first.train_seconds
    monkeypatch.undo()
    other = _run("ft", {"lr": 3e-3}, out=tmp_path / "r")  # other settings in the same directory: run afresh
    assert other.metrics != first.metrics
    # A trial evaluated on validation only is not a finished grid run of the same settings.
    config = RunConfig(model="tiny-sentence", dataset="toy-text", method="ft", method_options={"lr": 1e-3},
                       train=TRAIN.replace(checkpoint_every=10**9), seed=1)
    trial = run_experiment(config, tmp_path / "t", evaluate_splits="val")
    assert set(trial.metrics) == {"val"}
    full = run_experiment(config, tmp_path / "t")
    assert "id" in full.metrics and full.metrics["val"] == trial.metrics["val"]


def test_the_selection_is_kept_when_a_fixed_row_changes(tmp_path):
    from saftune.grid import _selection_key

    grid = {"name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1],
            "methods": ["ft", {"name": "l1", "method": "l1", "options": {"lr": 1e-3}}],
            "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 1e-3]}}}}
    changed = {**grid, "methods": ["ft", {"name": "l1", "method": "l1", "options": {"lr": 3e-3}}]}
    assert _selection_key(GridConfig.from_dict(grid)) == _selection_key(GridConfig.from_dict(changed))
    reselected = {**grid, "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 3e-3]}}}}
    assert _selection_key(GridConfig.from_dict(grid)) != _selection_key(GridConfig.from_dict(reselected))


def test_a_row_added_to_a_grid_keeps_the_other_rows_selections(tmp_path):
    from saftune.grid import _cached_selection, _selection_key

    grid = {"name": "t", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1], "methods": ["ft"],
            "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 1e-3]}}}}
    cache = tmp_path / "selection.json"
    cache.write_text(json.dumps({"settings": _selection_key(GridConfig.from_dict(grid)),
                                 "variants": {"ft": {"chosen": {"lr": 1e-3}}}}))
    added = {**grid, "methods": ["ft", "l1"], "selection": {"seed": 1, "grid": {"ft": {"lr": [1e-4, 1e-3]},
                                                                                 "l1": {"lr": [1e-3]}}}}
    assert _cached_selection(cache, _selection_key(GridConfig.from_dict(added))) == {"ft": {"chosen": {"lr": 1e-3}}}
    regridded = {**added, "selection": {"seed": 1, "grid": {"ft": {"lr": [3e-4]}, "l1": {"lr": [1e-3]}}}}
    assert _cached_selection(cache, _selection_key(GridConfig.from_dict(regridded))) == {}
    other_data = {**added, "dataset_options": {"size": 10}}
    assert _cached_selection(cache, _selection_key(GridConfig.from_dict(other_data))) == {}
