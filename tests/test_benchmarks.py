"""Smoke test of benchmarks/scale.py: its worker runs on a ~1M-parameter model and reports sane numbers."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("saftune_bench_scale", SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(scale, capsys, method):
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on two threads crawl when the machine is busy
        scale.main(["--worker", "--quick", "--method", method, "--size", "128x2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_param_count_shapes_and_random_mask(scale):
    model = scale.build_model(128, 2, 6000, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == scale.param_count(128, 2, 6000)
    mask = scale.random_mask(model, 1e-3)
    assert mask.num_selected == math.floor(1e-3 * scale.param_count(128, 2, 6000))
    assert scale.param_count(*scale.parse_size(scale.shape_for(5e9))) <= 5e9
    assert scale.fit_line([(1, 3), (2, 5), (4, 9)]) == pytest.approx((1, 2))


def test_scale_worker_reports_every_method(scale, capsys):
    rows = {m: _worker(scale, capsys, m) for m in ("saft", "saft-bf16", "lora", "limit")}
    params = scale.param_count(128, 2, 6000)
    assert 0.5e6 < params < 2e6
    for method, r in rows.items():
        assert r["method"] == method and r["params"] == params
        assert r["step_seconds"] > 0 and all(t > 0 for t in r["step_seconds_each"]), method
        # in-process (not a fresh process, as in the benchmark) the RSS may shrink a little during the run
        assert r["memory_mib"] > -32 and r["peak_mib"] > r["model_mib"] - 32 > 0, method
    for method in ("saft", "saft-bf16"):
        assert rows[method]["trainable"] == math.floor(rows[method]["sparsity"] * params)
    assert rows["saft-bf16"]["dtype"] == "bfloat16" and rows["saft"]["dtype"] == "float32"
    assert rows["limit"]["trainable"] == 0
    assert 0 < rows["lora"]["trainable"] < params


def test_attention_benchmark_compares_the_two_attention_paths(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("saftune_bench_attention", SCALE.parent / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from saftune.sparse import engine

    projections = engine._attention_projections
    threads = torch.get_num_threads()
    try:
        module.main(["--width", "128", "--layers", "1", "--vocab", "500", "--context", "16", "--batch", "2",
                     "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "a.json")])
    finally:
        torch.set_num_threads(threads)
    assert engine._attention_projections is projections  # the hook-path run puts the attention kernel back
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report["step_seconds"]) == set(module.METHODS)
    assert all(t > 0 for t in report["step_seconds"].values())
    assert report["ratios"]["saft_time_vs_saft_hook_attn"] == pytest.approx(
        report["step_seconds"]["saft"] / report["step_seconds"]["saft-hook-attn"])
    assert "saft_time_vs_limit" in capsys.readouterr().out


def test_scale_ratios_compare_each_dtype_with_itself(scale):
    row = {m: {"step_seconds": s, "memory_mib": mem, "peak_mib": mem + 100}
           for m, s, mem in [("saft", 2.0, 10), ("lora", 4.0, 20), ("limit", 1.0, 5),
                             ("saft-bf16", 1.0, 8), ("lora-bf16", 1.25, 16), ("limit-bf16", 0.5, 4)]}
    r = scale.ratios(row)
    assert r["saft_time_vs_lora"] == 0.5 and r["limit_time_vs_lora"] == 0.25 and r["saft_memory_vs_lora"] == 0.5
    assert r["saft_bf16_time_vs_lora_bf16"] == 0.8 and r["limit_bf16_time_vs_lora_bf16"] == 0.4
    assert r["saft_bf16_time_vs_limit_bf16"] == 2.0 and "saft_time_vs_ft" not in r


def test_llm_engine_worker_measures_every_method_and_both_phase_1s(capsys):
    spec = importlib.util.spec_from_file_location("saftune_bench_llm", SCALE.parent / "llm_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.llama_config(576, 30)  # SmolLM2-135M's shapes
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (1536, 9, 3)
    threads = torch.get_num_threads()
    rows = {}
    try:
        for method in ("limit", "lora", "saft", "phase1-lean", "phase1-onepass", "ft-epoch", "lora-heap-released",
                       "saft-heap-kept"):
            module.main(["--worker", "--model", "llama:64x2", "--method", method, "--seq", "16", "--steps", "1",
                         "--warmup", "1", "--batches", "2", "--threads", "1", "--sparsity", "0.01"])
            rows[method] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        torch.set_num_threads(threads)
    params = rows["saft"]["params"]
    assert rows["saft"]["trainable"] == math.floor(0.01 * params) and rows["limit"]["trainable"] == 0
    assert 0 < rows["lora"]["trainable"] < params
    assert rows["lora-heap-released"]["trainable"] == rows["lora"]["trainable"]  # the same method, its heap released
    assert rows["saft-heap-kept"]["trainable"] == rows["saft"]["trainable"]
    for kind in ("phase1-lean", "phase1-onepass"):  # the chosen mask, then phase 2 with it
        assert rows[kind]["phase1"]["selected"] == rows[kind]["trainable"] == math.floor(0.01 * params)
        assert rows[kind]["phase1"]["seconds"] > 0 and rows[kind]["step_seconds"] > 0
    assert rows["ft-epoch"]["epoch_seconds"] > 0
    ratios = module.phase1_ratios(rows)
    assert set(ratios) >= {"lean_phase1_over_phase2_peak", "onepass_phase1_over_ft_epoch_time"}
    assert ratios["lean_phase1_over_ft_epoch_time"] > 0


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_base_worker_measures_saft_beside_the_quantized_base_qlora_and_the_capacity_path(capsys, scheme):
    pytest.importorskip("torchao")
    spec = importlib.util.spec_from_file_location("saftune_bench_quantized", SCALE.parent / "quantized_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    rows = {}
    saft, limit = f"saft-{scheme}", f"limit-{scheme}"
    try:
        for method in (*module.methods(scheme), "capacity"):
            module.main(["--worker", "--model", "llama:64x2", "--method", method, "--seq", "16", "--steps", "1",
                         "--warmup", "1", "--threads", "1", "--sparsity", "0.01", "--scheme", scheme])
            rows[method] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        torch.set_num_threads(threads)
    params = rows[saft]["params"]
    assert rows[saft]["trainable"] == rows["saft-bf16"]["trainable"] == math.floor(0.01 * params)
    assert 0 < rows["qlora"]["trainable"] < params and rows[limit]["trainable"] == 0
    # Every projection of the model built straight into the scheme is quantized; the tied embedding is not.
    capacity = rows["capacity"]
    assert capacity["scheme"] == scheme and 0 < capacity["quantized_params"] < capacity["params"]
    assert capacity["phase1"]["selected"] == math.floor(0.01 * capacity["params"]) and capacity["step_seconds"] > 0
    timing = {"step_seconds": {m: rows[m]["step_seconds"] for m in module.methods(scheme)}}
    ratios = module.ratios(rows, timing, scheme)
    assert ratios[f"saft_{scheme}_over_qlora_time"] == rows[saft]["step_seconds"] / rows["qlora"]["step_seconds"]


def test_heap_release_benchmark_pairs_saft_with_and_without_the_release(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("saftune_bench_heap", SCALE.parent / "heap_release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "heap_release.json"
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    (run,) = report["runs"].values()
    (pair,) = run["pairs"]
    for variant in ("saft", "saft-heap-kept"):
        assert pair[variant]["method"] == variant and pair[variant]["checkpointing"] is True
        assert pair[variant]["step_seconds"] > 0 and pair[variant]["trainable"] > 0
    summary = run["summary"]
    assert summary["pairs"] == 1
    assert summary["time_ratio_median"] == pytest.approx(pair["saft"]["step_seconds"] / pair["saft-heap-kept"]["step_seconds"])
    assert out.with_suffix(".png").stat().st_size > 0
