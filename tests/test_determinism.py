"""Determinism on CPU: the same seed gives the same few-shot subset, mask, delta and metrics; another seed
gives another few-shot subset. (Sampling on its own: test_data_embedded.py::test_sentiment_seeds and
::test_digits_seeds_and_disjointness; resumed training: test_trainer.py.)"""

import numpy as np
import pytest
import torch

from saftune import SparseDelta, SparseMask
from saftune.methods import create_method
from saftune.models import create
from saftune.run import RunConfig, build_benchmark, run_experiment
from saftune.train import fit

CASES = {
    "sentiment-domains": ("vader", "tiny-sentence", {"shots": 4, "val_per_class": 4, "max_test": 20, "max_ood": 20}),
    "digits-shift": ("mnist5k", "tiny-clip", {"shots": 2, "val_per_class": 2, "max_test": 20, "max_ood": 20}),
}
TRAIN = {"epochs": 2, "batch_size": 4, "progress": False}
SAFT = {"sparsity": 0.01, "lr": 1e-2}


def _config(dataset: str, seed: int = 1) -> RunConfig:
    _, model, options = CASES[dataset]
    return RunConfig.from_dict({"model": model, "dataset": dataset, "dataset_options": options, "method": "saft",
                                "method_options": SAFT, "train": TRAIN, "seed": seed})


def _inputs(split) -> np.ndarray:
    return np.stack(split.inputs) if isinstance(split.inputs[0], np.ndarray) else np.asarray(split.inputs)


def _train(config: RunConfig):
    """The run's few-shot training split, SAFT mask and sparse delta (no evaluation)."""
    bench = build_benchmark(config)
    model = create(config.model, seed=config.seed)
    model.set_classes(bench.classnames, bench.templates)
    method = create_method("saft", SAFT)
    fit(model, method, bench.train, config.train.replace(seed=config.seed))
    return bench.train, method.mask, method.sparse.delta()


@pytest.mark.parametrize("dataset", list(CASES))
def test_the_same_seed_gives_the_same_subset_mask_and_delta(require_asset, dataset):
    require_asset(CASES[dataset][0])
    (train_a, mask_a, delta_a), (train_b, mask_b, delta_b) = _train(_config(dataset)), _train(_config(dataset))
    assert np.array_equal(_inputs(train_a), _inputs(train_b)) and np.array_equal(train_a.labels, train_b.labels)
    assert mask_a == mask_b and mask_a.num_selected > 0
    assert delta_a.fingerprint == delta_b.fingerprint
    assert all(torch.equal(delta_a.values[n], delta_b.values[n]) for n in delta_a.indices)
    assert any(not torch.equal(delta_a.values[n], delta_a.pretrained[n].float()) for n in delta_a.indices)  # it trained

    other = build_benchmark(_config(dataset, seed=2)).train
    assert not np.array_equal(_inputs(train_a), _inputs(other))


def test_a_whole_run_twice_gives_the_same_files_and_metrics(tmp_path, require_asset):
    require_asset("vader")
    config = _config("sentiment-domains")
    records = [run_experiment(config, tmp_path / name) for name in ("a", "b")]
    assert SparseMask.load(tmp_path / "a" / "mask.safetensors") == SparseMask.load(tmp_path / "b" / "mask.safetensors")
    deltas = [SparseDelta.from_pretrained(tmp_path / name / "result") for name in ("a", "b")]
    assert all(torch.equal(deltas[0].values[n], deltas[1].values[n]) for n in deltas[0].indices)
    assert records[0].metrics == records[1].metrics
    assert records[0].loss_curve == records[1].loss_curve
