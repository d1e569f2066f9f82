"""A training process killed with SIGKILL, again and again, resumes to the bit-identical result.

Each attempt is a real process running `saftune train`, killed without warning (no handler, no
cleanup), then started again with the same command. The final artifact must equal, bit for bit, the
one of a run that was never interrupted. Attempts are forked from a server process that has imported
the library once, so an attempt costs milliseconds instead of the seconds of importing torch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import toy_tasks
from safetensors.torch import load_file

from saftune.cli import main
from saftune.methods import create_method
from saftune.models import create
from saftune.sparse import MaskFileError, SparseDelta, SparseMask
from saftune.train import TrainConfig, fit, trainer
from saftune.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

STEPS = 40
PACE_S = 0.02  # a pause per step in killed attempts: the kill lands mid-run even on a busy machine


def _command(method: str, options: list[str], out: Path) -> list[str]:
    args = ["-q", "train", "--model", "tiny-sentence", "--dataset", "toy-text", "--method", method,
            "--set", f"train.max_steps={STEPS}", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=1",
            "--set", "train.progress=false", "--out", str(out)]
    for option in options:
        args += ["--method-option", option]
    return args


def _train(args: list[str], pace: float, log: str) -> None:
    """One attempt: `saftune ARGS` in this (forked) process, its output in `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # one thread: the same order of float sums in every process
    if pace:
        from saftune.train import trainer

        save = trainer.save_checkpoint

        def paced(*a, **kw):  # the pause changes no number, only when a kill can land
            time.sleep(pace)
            return save(*a, **kw)

        trainer.save_checkpoint = paced
    sys.exit(main(args))


@pytest.fixture(scope="module")
def processes():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["saftune.cli", "saftune.run", "saftune.methods.catalog", "saftune.models.text",
                                    "transformers.models.bert.modeling_bert"])
    return context


def _start(processes, args, out: Path, pace: float = 0.0):
    process = processes.Process(target=_train, args=(args, pace, str(out.parent / f"{out.name}.log")))
    process.start()
    return process


def _checkpoint_step(run: Path) -> int:
    """The step of the run's valid checkpoint (0: none yet); tolerates reading mid-rename."""
    for _ in range(100):
        path = find_checkpoint(run)
        if path is None:
            return 0
        try:
            return json.loads((path / "trainer.json").read_text())["step"]
        except (OSError, ValueError):
            time.sleep(0.001)
    raise AssertionError(f"no readable checkpoint in {run}")


def _wait_for(condition, process, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.is_alive(), f"the attempt ended (exit code {process.exitcode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _log(run: Path) -> list[dict]:
    """log.jsonl without wall-clock times."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "log.jsonl").read_text().splitlines()]


def _kill_and_resume(processes, args, run: Path, seed: int) -> list[int]:
    """Kill `saftune ARGS` four times (once before its first checkpoint), then let it finish.

    Returns the checkpoint step found after each kill.
    """
    rng = random.Random(seed)
    steps = []
    for attempt in range(4):
        process = _start(processes, args, run, pace=PACE_S)
        if attempt == 0:  # right after phase 1 wrote the mask (or, for ft, as soon as the log appears)
            _wait_for(lambda: (run / "mask.safetensors").exists() or (run / "log.jsonl").exists(), process, "training starts")
        else:
            target = steps[-1] + rng.randint(1, 6)
            _wait_for(lambda t=target: _checkpoint_step(run) >= t, process, f"checkpoint step {target}")
            time.sleep(rng.uniform(0, 1.5 * PACE_S))  # anywhere in the step: computing, logging, checkpointing
        process.kill()
        process.join()
        assert process.exitcode == -signal.SIGKILL, f"attempt {attempt} was not killed (exit code {process.exitcode})"
        steps.append(_checkpoint_step(run))
    assert steps[-1] < STEPS
    process = _start(processes, args, run)
    process.join()
    assert process.exitcode == 0, (run.parent / f"{run.name}.log").read_text()[-3000:]
    return steps


@pytest.mark.parametrize("method, options, seed", [
    ("saft", ["lr=1e-2", "sparsity=0.02"], 11),  # a sparse delta; phase 1 writes mask.safetensors
    ("ft", ["lr=1e-3"], 12),                     # the whole classifier's weights
])
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_result(processes, tmp_path, method, options, seed):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    reference = _start(processes, _command(method, options, clean), clean)  # runs beside the killed attempts
    steps = _kill_and_resume(processes, _command(method, options, killed), killed, seed)
    reference.join()
    assert reference.exitcode == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert steps == sorted(steps) and steps[-1] > steps[1], f"the attempts made no progress: {steps}"

    if method == "saft":
        a, b = SparseDelta.from_pretrained(clean / "result"), SparseDelta.from_pretrained(killed / "result")
        assert a.indices.keys() == b.indices.keys() and a.num_entries > 0
        for name in a.indices:
            assert torch.equal(a.indices[name], b.indices[name]), name
            assert torch.equal(a.values[name], b.values[name]), name
            assert torch.equal(a.pretrained[name], b.pretrained[name]), name
        assert any(not torch.equal(a.values[n], a.pretrained[n]) for n in a.indices)  # training changed something
    else:
        a, b = load_file(str(clean / "result" / "model.safetensors")), load_file(str(killed / "result" / "model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    # every step logged exactly once, with the same losses and learning rates as the clean run
    assert [r["step"] for r in _log(killed)] == list(range(1, STEPS + 1))
    assert _log(killed) == _log(clean)
    clean_metrics = json.loads((clean / "metrics.json").read_text())
    killed_metrics = json.loads((killed / "metrics.json").read_text())
    assert killed_metrics["metrics"] == clean_metrics["metrics"]
    assert killed_metrics["steps"] == STEPS


# ---------------------------------------------------------------------------------------------------
# A crash inside save_checkpoint, at each of its file-system changes in turn.

class _Died(BaseException):
    """The process died: nothing after this point runs (not even `except Exception` or cleanup)."""


_CHANGES = ("unlink", "remove", "rmdir", "rename", "replace")  # the calls that change which files exist


def _die_at(monkeypatch, k: int) -> dict:
    """Let the first `k` file-system changes happen, then die at the next and at every later one."""
    seen = {"n": 0}
    for name in _CHANGES:
        real = getattr(os, name)

        def change(*args, _real=real, **kwargs):
            seen["n"] += 1
            if seen["n"] > k:
                raise _Died
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, change)
    return seen


def _optimizer(seed: int):
    torch.manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    weight.sum().backward()
    optimizer.step()
    scheduler.step()
    return weight, optimizer, scheduler


@pytest.mark.parametrize("previous", ["checkpoint", ".checkpoint.old"])  # the latter: resumed after a crash mid-swap
def test_a_crash_at_any_point_of_saving_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, previous):
    crashes = 0
    for k in range(100):
        run = tmp_path / f"crash-{k}"
        weight, optimizer, scheduler = _optimizer(seed=0)
        save_checkpoint(run, step=3, trainable={"w": weight}, optimizer=optimizer, scheduler=scheduler, fingerprint="f")
        if previous != "checkpoint":
            (run / "checkpoint").rename(run / previous)
        weight, optimizer, scheduler = _optimizer(seed=1)
        with monkeypatch.context() as patch:
            _die_at(patch, k)
            try:
                save_checkpoint(run, step=4, trainable={"w": weight}, optimizer=optimizer, scheduler=scheduler,
                                fingerprint="f")
            except _Died:
                crashes += 1
            else:
                break  # k is past the last change: every crash point was tried
        found = find_checkpoint(run)
        assert found is not None, f"crash after {k} changes: no checkpoint left"
        state = load_checkpoint(found, "f")  # complete and undamaged, whichever it is
        assert state["step"] in (3, 4), k
        expected = weight.detach() if state["step"] == 4 else _optimizer(seed=0)[0].detach()
        assert torch.equal(state["trainable"]["w"], expected), k
    assert crashes >= 5  # the swap really has several steps, each of which was a crash point
    final = load_checkpoint(find_checkpoint(run), "f")
    assert final["step"] == 4 and sorted(p.name for p in run.iterdir()) == ["checkpoint"]


# ---------------------------------------------------------------------------------------------------
# A run started afresh in a directory that holds an older run's checkpoint.

def _fit(run, options, resume=True, crash_at=None):
    model = create("tiny-sentence")
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    method = create_method("saft", {"lr": 1e-2, "sparsity": 0.05, "budget": "per_tensor", **options})
    if crash_at is not None:
        def crash(m, step, total):
            if step == crash_at:
                raise RuntimeError("crash")
        method.after_step = crash
    fit(model, method, bench.train, TrainConfig(epochs=2, batch_size=4, progress=False, checkpoint_every=4),
        run_dir=run, resume=resume)
    return method


def test_a_fresh_attempt_discards_the_older_checkpoint_so_its_mask_is_never_paired_with_it(tmp_path):
    run = tmp_path / "run"
    first = _fit(run, {"score": "grad"})
    # Started afresh (resume=False) with another score, it writes its mask, then dies before its first
    # checkpoint. The first run's checkpoint is gone, so nothing can resume it with the second mask.
    with pytest.raises(RuntimeError, match="crash"):
        _fit(run, {"score": "magnitude"}, resume=False, crash_at=1)
    assert find_checkpoint(run) is None
    second_mask = SparseMask.load(run / "mask.safetensors")
    assert second_mask != first.mask and second_mask.counts == first.mask.counts  # same shapes: would load silently


def test_a_resumed_checkpoint_refuses_a_mask_of_other_settings(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _fit(run, {"score": "grad"})
    _fit(other, {"score": "magnitude"})
    shutil.copy(other / "mask.safetensors", run / "mask.safetensors")  # e.g. files copied between runs by hand
    with pytest.raises(MaskFileError, match=r"selected by a run with other settings.*--no-resume"):
        _fit(run, {"score": "grad"})


def test_train_no_resume_discards_the_older_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny-sentence", "--dataset", "toy-text", "--method", "saft", "--method-option",
            "lr=1e-2", "--set", "train.max_steps=3", "--set", "train.progress=false", "--out", str(out)]
    assert main([*args, "--set", "train.checkpoint_every=1"]) == 0
    assert find_checkpoint(out) is not None

    def die(*a, **kw):
        raise _Died
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", die)
        with pytest.raises(_Died):
            main([*args, "--method-option", "score=magnitude", "--set", "train.checkpoint_every=1", "--no-resume"])
    assert find_checkpoint(out) is None  # nothing of the first run is left to resume with the second run's mask
    assert main([*args, "--set", "train.checkpoint_every=1"]) == 0
