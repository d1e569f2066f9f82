"""Every method on the real embedded benchmark: all-MiniLM-L6-v2 on VADER sentiment domains.

Short runs (16 shots per class, a few epochs, 300 ID / 100 per-OOD test sentences) so the whole matrix
finishes in a couple of minutes on 2 CPU cores.
"""

import pytest

from saftune.methods import list_methods
from saftune.run import RunConfig, run_experiment

SHORT = {"epochs": 4, "batch_size": 8, "progress": False}
OPTIONS = {"ft": {"lr": 2e-5}, "lpft": {"lr": 2e-5}, "saft": {"lr": 1e-4}, "wiseft": {"lr": 2e-5, "alphas": [0.0, 0.5, 1.0]}}


@pytest.fixture(scope="module")
def records(require_asset):
    require_asset("minilm"), require_asset("vader")
    out = {}
    for method in list_methods():
        if method == "maple":  # deep prompts in CLIP's two towers: MiniLM has one (tested on the tiny CLIP)
            continue
        config = RunConfig.from_dict({
            "model": "minilm", "method": method, "method_options": OPTIONS.get(method, {}), "seed": 1,
            "dataset_options": {"max_test": 300, "max_ood": 100}, "train": SHORT,
        })
        out[method] = run_experiment(config).to_dict()
    return out


def test_every_method_finishes_and_reports_id_and_ood(records):
    for method, record in records.items():
        metrics = record["metrics"]
        assert set(metrics) >= {"val", "id", "ood/tweets", "ood/amazon", "ood/nyt", "ood_avg"}, method
        assert all(0.0 <= v <= 1.0 for v in metrics.values()), method
        print(f"{method:9s} id {metrics['id']:.3f} ood_avg {metrics['ood_avg']:.3f} trainable {record['trainable']}")


def test_full_finetuning_beats_zero_shot_in_distribution(records):
    assert records["ft"]["metrics"]["id"] > records["zeroshot"]["metrics"]["id"] + 0.02


def test_trainable_counts_match_the_methods(records):
    total = records["ft"]["total_params"]
    assert records["ft"]["trainable"] == total
    assert records["saft"]["trainable"] == int(0.001 * total)
    assert 0 < records["bitfit"]["trainable"] < 0.01 * total
    assert 0 < records["lora"]["trainable"] < 0.05 * total
    assert records["coop"]["trainable"] == 16 * 384
    assert records["zeroshot"]["trainable"] == 0
    assert [p["alpha"] for p in records["wiseft"]["wiseft_curve"]] == [0.0, 0.5, 1.0]
    # the curve's alpha = 0 end is the pretrained model: zero-shot accuracy exactly
    assert records["wiseft"]["wiseft_curve"][0]["id"] == records["zeroshot"]["metrics"]["id"]
