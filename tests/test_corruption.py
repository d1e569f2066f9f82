"""Damaged files are refused with a message naming the file and the fix; nothing else is touched.

Every file a run or a grid reads back is truncated (a write cut short), has one bit of a stored number
flipped (a disk or copy error that leaves the format valid) or is replaced with random bytes. Loading
it must fail with an error that names it and says what to do, never hand back wrong numbers, and every
other file (the rest of the run, the other runs, the earlier results) must stay byte for byte as it was.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import toy_tasks

from saftune.grid import GridConfig, run_dir, run_grid
from saftune.methods import create_method
from saftune.report.results import parse_results
from saftune.models import create
from saftune.results import ResultError, load_result
from saftune.run import RunConfig, run_experiment
from saftune.sparse import DeltaError, MaskFileError, SparseDelta
from saftune.train import CheckpointError, TrainConfig, fit

DAMAGES = ("truncated", "flipped", "garbage")


def _flip_offset(path: Path, data: bytes) -> int:
    """A byte of a stored number: flipping its lowest bit keeps the file well-formed."""
    if path.name == "mask.safetensors":
        return len(data) - 4  # the low byte of the last selected index (int32): the index moves by one
    if path.suffix == ".safetensors":
        return len(data) - 1  # the tensor data ends the file
    if path.suffix == ".pt":  # the first byte of the first tensor record of torch's zip archive
        with zipfile.ZipFile(path) as archive:
            offset = next(i for i in archive.infolist() if "/data/" in i.filename).header_offset
        name_length, extra_length = (int.from_bytes(data[offset + k : offset + k + 2], "little") for k in (26, 28))
        return offset + 30 + name_length + extra_length
    key = {"trainer.json": b'"step": ', "adapter_config.json": b'"r": '}[path.name]  # the step; LoRA's rank
    return data.index(key) + len(key)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        at = _flip_offset(path, data)
        data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
    else:
        data = random.Random(path.name).randbytes(len(data))
    path.write_bytes(data)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


# ---------------------------------------------------------------------------------------------------
# One run: its checkpoint, its mask, its outputs.

RUN = RunConfig(model="tiny-sentence", dataset="toy-text", method="saft", method_options={"lr": 1e-2, "sparsity": 0.02},
                train=TrainConfig(max_steps=3, batch_size=4, checkpoint_every=1, progress=False))


@pytest.fixture(scope="module")
def saft_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saft") / "run"
    run_experiment(RUN, run)
    return run


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "trainer.json"])
def test_a_damaged_checkpoint_is_refused_and_kept(saft_run, tmp_path, name, how):
    run = _copy(saft_run, tmp_path)
    damage(run / "checkpoint" / name, how)
    before = snapshot(run)
    with pytest.raises(CheckpointError) as error:
        run_experiment(RUN, run)
    assert str(run / "checkpoint") in str(error.value)
    assert f"delete {str(run / 'checkpoint')!r} to start the run afresh" in str(error.value)
    assert snapshot(run) == before  # the damaged checkpoint too: refused, not deleted


def test_deleting_a_damaged_checkpoint_as_told_trains_the_same_result_again(saft_run, tmp_path):
    run = _copy(saft_run, tmp_path)
    damage(run / "checkpoint" / "trainable.safetensors", "flipped")
    with pytest.raises(CheckpointError):
        run_experiment(RUN, run)
    shutil.rmtree(run / "checkpoint")
    run_experiment(RUN, run)
    _assert_same_delta(run / "result", saft_run / "result")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_mask_is_not_resumed_with(saft_run, tmp_path, how):
    run = _copy(saft_run, tmp_path)
    damage(run / "mask.safetensors", how)
    before = snapshot(run)
    with pytest.raises(MaskFileError) as error:
        run_experiment(RUN, run)
    message = str(error.value)
    assert str(run / "mask.safetensors") in message and "cannot resume" in message and "--no-resume" in message
    assert snapshot(run) == before


def test_damaged_outputs_are_written_again_by_the_same_run(saft_run, tmp_path):
    run = _copy(saft_run, tmp_path)
    damage(run / "run.json", "garbage")
    damage(run / "metrics.json", "truncated")
    damage(run / "result" / "delta.safetensors", "flipped")
    with pytest.raises(DeltaError, match="do not match the checksum"):
        SparseDelta.from_pretrained(run / "result")
    run_experiment(RUN, run)  # resumes from the final checkpoint: no training, evaluated and saved again
    _assert_same_delta(run / "result", saft_run / "result")
    assert json.loads((run / "run.json").read_text()) == json.loads((saft_run / "run.json").read_text())
    assert json.loads((run / "metrics.json").read_text())["metrics"] == json.loads((saft_run / "metrics.json").read_text())["metrics"]


def _assert_same_delta(a_dir: Path, b_dir: Path) -> None:
    a, b = SparseDelta.from_pretrained(a_dir), SparseDelta.from_pretrained(b_dir)
    assert a.indices.keys() == b.indices.keys()
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]) and torch.equal(a.values[name], b.values[name]), name


# ---------------------------------------------------------------------------------------------------
# Result artifacts of every kind.

KINDS = {  # method -> (options, the files of its result)
    "saft": ({"lr": 1e-2, "sparsity": 0.05}, ["delta.safetensors", "saftune_config.json"]),
    "ft": ({"lr": 1e-3}, ["model.safetensors", "saftune_config.json"]),
    "lp": ({"probe_steps": 5}, ["weights.safetensors", "saftune_config.json"]),
    "lora": ({"lr": 1e-2, "rank": 2}, ["adapter_model.safetensors", "adapter_config.json", "saftune_config.json"]),
    "coop": ({"lr": 1e-2}, ["prompt.safetensors", "saftune_config.json"]),
    "cocoop": ({"lr": 1e-2}, ["prompt.safetensors", "saftune_config.json"]),
    "maple": ({"lr": 1e-2, "depth": 2}, ["prompt.safetensors", "saftune_config.json"]),
}
# saftune_config.json is metadata a user may edit (e.g. the base model's path): it has no checksum, so a
# flipped bit in it is not detectable; its numbers are covered by the other files' checksums.
CASES = [(m, f, how) for m, (_, files) in KINDS.items() for f in files for how in DAMAGES
         if not (f == "saftune_config.json" and how == "flipped")]


def _tiny_clip():
    model = create("tiny-clip")
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    return model, bench


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (options, _) in KINDS.items():
        model, bench = _tiny_clip()
        method = create_method(name, options)
        fit(model, method, bench.train, TrainConfig(max_steps=2, batch_size=4, progress=False))
        out[name] = method.save_result(model, tmp_path_factory.mktemp(name) / "result", {"method": name})
    return out


def test_undamaged_results_load(results):
    for directory in results.values():
        load_result(directory, _tiny_clip()[0])


@pytest.mark.parametrize("method, name, how", CASES)
def test_a_damaged_result_is_refused_and_the_model_left_alone(results, tmp_path, method, name, how):
    directory = _copy(results[method], tmp_path)
    damage(directory / name, how)
    before = snapshot(directory)
    model, _ = _tiny_clip()
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises((ResultError, DeltaError)) as error:
        load_result(directory, model)
    assert str(directory / name) in str(error.value)
    assert snapshot(directory) == before
    after = dict(model.named_parameters())
    assert after.keys() == pristine.keys()  # no adapter or prompt attached
    assert all(torch.equal(after[n], p) for n, p in pristine.items())  # no value written


# ---------------------------------------------------------------------------------------------------
# A grid: its results file, its selection cache, its runs.

GRID = {
    "name": "corrupt", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
    "train": {"max_steps": 2, "batch_size": 4, "progress": False, "checkpoint_every": 1},
    "methods": ["zeroshot", "saft"],
    "selection": {"seed": 1, "grid": {"saft": {"lr": [1e-3, 1e-2]}}},
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid") / "out"
    assert len(run_grid(GridConfig.from_dict(GRID), out / "results.jsonl", out)) == 4
    return out


def _rerun(out: Path) -> list[dict]:
    return run_grid(GridConfig.from_dict(GRID), out / "results.jsonl", out)


def test_a_damaged_line_of_the_results_costs_only_its_run(grid, tmp_path):
    out = _copy(grid, tmp_path)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    ids = [json.loads(line)["run_id"] for line in lines]
    lines[1] = b"#" * (len(lines[1]) - 1) + b"\n"  # still one line, no longer JSON
    (out / "results.jsonl").write_bytes(b"".join(lines))
    redone = ids[1]
    others = {rid: snapshot(run_dir(out, rid)) for rid in ids if rid != redone}
    new = _rerun(out)
    assert [r.run_id for r in new] == [redone]
    after = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert after[:4] == lines and json.loads(after[4])["run_id"] == redone  # earlier lines kept, in place
    assert {rid: snapshot(run_dir(out, rid)) for rid in others} == others


def test_bytes_that_are_not_text_in_the_results_cost_only_their_run(grid, tmp_path):
    out = _copy(grid, tmp_path)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    ids = [json.loads(line)["run_id"] for line in lines]
    lines[2] = lines[2][:10] + b"\xff\xfe" + lines[2][12:]
    (out / "results.jsonl").write_bytes(b"".join(lines))
    assert "line 3: not UTF-8 text" in parse_results(out / "results.jsonl")[1][0]  # the report names it too
    others = {rid: snapshot(run_dir(out, rid)) for rid in ids if rid != ids[2]}
    assert [r.run_id for r in _rerun(out)] == [ids[2]]
    assert (out / "results.jsonl").read_bytes().splitlines(keepends=True)[:4] == lines  # earlier lines kept, in place
    assert {rid: snapshot(run_dir(out, rid)) for rid in others} == others


def test_a_complete_last_line_without_its_newline_is_kept(grid, tmp_path):
    out = _copy(grid, tmp_path)
    text = (out / "results.jsonl").read_bytes()
    (out / "results.jsonl").write_bytes(text.rstrip(b"\n"))  # the crash came just before the newline
    assert _rerun(out) == []
    assert (out / "results.jsonl").read_bytes() == text


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_selection_is_refused_not_redone(grid, tmp_path, how):
    out = _copy(grid, tmp_path)
    damage(out / "selection.json", how)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"selection\.json' is damaged .*delete it to select the hyperparameters again"):
        _rerun(out)
    assert snapshot(out) == before  # no trial rerun, no run directory replaced


def test_a_damaged_checkpoint_stops_the_grid_at_its_run_and_touches_nothing_else(grid, tmp_path):
    out = _copy(grid, tmp_path)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-1]))  # the last run is to be done again ...
    last = json.loads(lines[-1])["run_id"]
    damage(run_dir(out, last) / "checkpoint" / "optimizer.pt", "flipped")  # ... from a damaged checkpoint
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="optimizer.pt' is damaged"):
        _rerun(out)
    assert snapshot(out) == before
