"""`accelerate launch` runs saftune's training as torchrun does; FSDP2 shards the frozen base (2 gloo CPU processes).

accelerate: `tests/distributed_worker.py` trains SAFT under torchrun, under `accelerate launch --multi_gpu`
(which starts the processes through torchrun, on a CPU-only machine too) and under the variables MPI
sets for `accelerate launch --cpu --mpirun_hostfile`; the three must agree (same process layout, so
the same arithmetic). `accelerate launch --cpu` without a hostfile starts one process: saftune says so.

FSDP2: `tests/fsdp_worker.py` trains with the frozen base replicated and then sharded by
`shard_frozen_base`, in the same 2 processes on the same batches: losses, trained values and logits
must agree, and each process must hold about half the frozen entries.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saftune import distributed

pytest.importorskip("accelerate")

TESTS = Path(__file__).parent
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE", "PMI_RANK")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch; once more if a gloo process died of SIGABRT (rare on busy cores; see tests/test_distributed.py)."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=240)
    if done.returncode != 0 and "SIGABRT" in done.stderr:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


# ---------------------------------------------------------------------------------------------- accelerate launch


@pytest.fixture(scope="module")
def torchrun_saft(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    _run([*TORCHRUN, str(TESTS / "distributed_worker.py"), str(out), "saft"])
    return load_file(str(out / "saft.safetensors"))


def _assert_same_training(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert want["moved"].item() > 1e-3  # training changed the values: the comparison means something
    for key in want:
        if key.startswith("mask/"):
            assert torch.equal(got[key], want[key]), key
        else:
            torch.testing.assert_close(got[key], want[key], msg=key)


def test_accelerate_launch_multi_gpu_on_cpu_trains_like_torchrun(tmp_path, torchrun_saft):
    """`--multi_gpu` means "start the processes with torchrun": the variables are torchrun's, gloo on CPU."""
    _run([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
          str(TESTS / "distributed_worker.py"), str(tmp_path), "saft"])
    assert len(list(tmp_path.glob("gather_rows.rank*.safetensors"))) == 2
    _assert_same_training(load_file(str(tmp_path / "saft.safetensors")), torchrun_saft)


def test_mpi_variables_as_accelerate_launch_cpu_mpirun_sets_them_train_like_torchrun(tmp_path, torchrun_saft):
    """`accelerate launch --cpu --mpirun_hostfile H` runs mpirun: Open MPI's variables, plus MASTER_ADDR/PORT."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "distributed_worker.py"), str(tmp_path), "saft"],
                              env=_env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="True"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in outputs)
    assert len(list(tmp_path.glob("gather_rows.rank*.safetensors"))) == 2
    _assert_same_training(load_file(str(tmp_path / "saft.safetensors")), torchrun_saft)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun here (Open MPI: apt-get install openmpi-bin)")
def test_accelerate_launch_cpu_mpirun_trains_like_torchrun(tmp_path, torchrun_saft):
    """The real launch the test above imitates (when Open MPI is installed)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = _env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # test machines often run as root
    _run([*ACCELERATE, "--cpu", "--num_processes", "2", "--mpirun_hostfile", str(hostfile), "--main_process_port",
          str(_free_port()), str(TESTS / "distributed_worker.py"), str(tmp_path), "saft"], env)
    assert len(list(tmp_path.glob("gather_rows.rank*.safetensors"))) == 2  # two processes, ranks 0 and 1
    _assert_same_training(load_file(str(tmp_path / "saft.safetensors")), torchrun_saft)


def test_accelerate_launch_cpu_without_mpi_starts_one_process_and_saftune_warns(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("from saftune import distributed\n"
                      "distributed.init_from_env('cpu')\n"
                      "print('world size', distributed.world_size(), flush=True)\n")
    done = _run([*ACCELERATE, "--cpu", "--num_processes", "2", "--main_process_port", str(_free_port()), str(script)])
    assert done.stdout.count("world size 1") == 1  # accelerate started one process, not two
    assert "accelerate launch --cpu started one process" in done.stderr


def test_mpi_variables_are_read_like_torchrun_ones(monkeypatch):
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("PMI_SIZE", "1")  # a single-task Slurm / MPI job: one process
    assert not distributed.launched()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    assert distributed.launched() and distributed._launcher_env() == {"WORLD_SIZE": "4", "RANK": "2"}
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's variables win
    assert not distributed.launched()


# ---------------------------------------------------------------------------------------------- FSDP2


def _fsdp_run(out: Path, mode: str) -> list[dict]:
    _run([*TORCHRUN, str(TESTS / "fsdp_worker.py"), str(out), mode])
    return [load_file(str(out / f"{mode}.rank{r}.safetensors")) for r in range(2)]


def _assert_sharded_trains_like_replicated(ranks: list[dict]) -> None:
    for got in ranks:
        assert got["plain/moved"].item() > 1e-2  # training changed the values: the comparison means something
        for key in [k for k in got if k.startswith("plain/") and k != "plain/moved"]:
            torch.testing.assert_close(got["fsdp/" + key[6:]], got[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(ranks[1]["fsdp/logits"], ranks[0]["fsdp/logits"])  # every rank the same merged model


def _assert_holds_about_half(ranks: list[dict]) -> None:
    total, replicated = ranks[0]["fsdp/total_numel"].item(), ranks[0]["fsdp/replicated_numel"].item()
    local = [r["fsdp/local_numel"].item() for r in ranks]
    assert sum(local) == total + replicated  # the shards partition the base; the replicated tensors are in both
    assert all(0.45 * total < n < 0.55 * total for n in local), (local, total)
    assert replicated < 0.03 * total  # only the hook-trained tensors (LayerNorm / RMSNorm weights, biases) stay whole


@pytest.mark.parametrize("mode", ["toy", "llama"])
def test_fsdp_sharded_base_trains_like_replicated(tmp_path, mode):
    """toy: the tied embedding, attention, linear and hook routes; llama: tiny-llama, its decoder layers as units."""
    ranks = _fsdp_run(tmp_path, mode)
    _assert_sharded_trains_like_replicated(ranks)
    _assert_holds_about_half(ranks)
    assert all(r["fsdp/alive_unsharded"].item() == 0 for r in ranks)  # the engine let go of the whole weights
    assert ranks[0]["fsdp/units"].item() == {"toy": 3, "llama": 2}[mode]


def test_fsdp_with_saftune_trainer_trains_like_replicated(tmp_path):
    """SAFT with phase 1, `fit` and `predict` on tiny-sentence: its embeddings and two layers are the units."""
    ranks = _fsdp_run(tmp_path, "fit")
    _assert_sharded_trains_like_replicated(ranks)
    _assert_holds_about_half(ranks)
    assert ranks[0]["fsdp/units"].item() == 3
    torch.testing.assert_close(ranks[0]["fsdp/grad_norm"], ranks[0]["plain/grad_norm"], rtol=1e-5, atol=1e-6)


def test_fsdp_training_never_moves_the_whole_model_to_the_device(tmp_path):
    """A model bigger than one device stays in host memory: with `train.fsdp` only shards (FSDP2) and the
    engine's O(d) tensors move; without it the trainer moves the model whole, as before."""
    for got in _fsdp_run(tmp_path, "host"):
        assert got["plain/whole_moves"].item() >= 1  # the watch sees the trainer's move
        assert got["fsdp/whole_moves"].item() == 0
        assert got["fsdp/engine_moves"].item() == 1  # shard_frozen_base moved the engine to the mesh's device
        torch.testing.assert_close(got["fsdp/loss"], got["plain/loss"], rtol=1e-5, atol=1e-6)
        for key in [k for k in got if k.startswith("plain/values/")]:
            torch.testing.assert_close(got["fsdp/" + key[6:]], got[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sharded_phase_1_selects_the_same_mask_holding_half_the_scores(tmp_path):
    ranks = _fsdp_run(tmp_path, "select")
    for got in ranks:
        names = [k[len("plain/mask/"):] for k in got if k.startswith("plain/mask/")]
        assert sum(got[f"plain/mask/{n}"].numel() for n in names) == 268  # 1% of tiny-llama's 26,880 entries
        for n in names:
            assert torch.equal(got[f"fsdp/mask/{n}"], got[f"plain/mask/{n}"]), n
        assert got["plain/untouched"].item() == 1 and got["fsdp/untouched"].item() == 1
        assert got["fsdp/examples"].item() == 21  # 7 batches of 3, the padded one not counted
    local = [r["fsdp/score_local"].item() for r in ranks]
    total = ranks[0]["fsdp/score_total"].item()
    assert sum(local) == total and all(0.45 * total < n < 0.55 * total for n in local), (local, total)


def _cli_train(out: Path, *extra: str) -> dict:
    """`saftune train` of SAFT on tiny-sentence under torchrun (2 processes), as a user launches it."""
    # 16 training examples in batches of 3: the last global batch has one example, so rank 1's share is
    # empty; 7 test sentences in evaluation batches of 3: rank 0 runs two forwards, rank 1 one.
    _run([*TORCHRUN, "-m", "saftune.cli", "train", "--model", "tiny-sentence", "--dataset", "toy-text",
          "--dataset-option", "test_size=7", "--method", "saft", "--method-option", "kernels=on",
          "--method-option", "lr=1e-2", "--method-option", "sparsity=0.05", "--set", "train.epochs=2",
          "--set", "train.batch_size=3", "--set", "eval_batch_size=3", "--out", str(out), *extra])
    return {"metrics": json.loads((out / "metrics.json").read_text())["metrics"],
            "log": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()],
            "delta": load_file(str(out / "result" / "delta.safetensors"))}


def test_cli_train_fsdp_with_empty_shares_trains_and_evaluates_like_replicated(tmp_path):
    """`saftune train --fsdp`: a process with an empty share of a micro-batch, or fewer evaluation batches,
    still joins every forward's all-gather (without that, the other process waits forever)."""
    plain, sharded = _cli_train(tmp_path / "plain"), _cli_train(tmp_path / "fsdp", "--fsdp")
    assert [r["loss"] for r in sharded["log"]] == pytest.approx([r["loss"] for r in plain["log"]], rel=1e-5)
    assert len(plain["log"]) == 12  # 6 batches per epoch, the last of one example
    assert sharded["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)
    assert sharded["delta"].keys() == plain["delta"].keys()
    for key in plain["delta"]:
        torch.testing.assert_close(sharded["delta"][key], plain["delta"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp_is_refused_before_phase_1_for_a_dense_method_or_in_one_process():
    from saftune.data import load_dataset
    from saftune.methods import create_method
    from saftune.models import create
    from saftune.train import TrainConfig, fit

    bench = load_dataset("toy-text", shots=2, test_size=2)
    model = create("tiny-sentence", seed=0)
    model.set_classes(bench.classnames, bench.templates)
    config = TrainConfig(max_steps=1, fsdp=True, device="cpu")
    with pytest.raises(ValueError, match="method 'ft' trains dense tensors.*drop fsdp"):
        fit(model, create_method("ft"), bench.train, config)
    saft = create_method("saft")
    with pytest.raises(ValueError, match="this is one process: launch with torchrun --nproc-per-node"):
        fit(model, saft, bench.train, config)
    assert not hasattr(saft, "mask")  # refused before phase 1


def test_plan_units_takes_the_blocks_a_hf_model_names():
    from saftune.integrations.fsdp import plan_units
    from saftune.models import create

    assert plan_units(create("tiny-sentence", seed=0)) == ["encoder.embeddings", "encoder.encoder.layer.0",
                                                          "encoder.encoder.layer.1"]


def test_shard_frozen_base_needs_several_processes():
    from torch import nn

    from saftune.integrations.fsdp import shard_frozen_base
    from saftune.sparse import SparseMask, sparsify

    net = nn.Linear(4, 3)
    sm = sparsify(net, SparseMask({"weight": torch.tensor([0, 5])}, {"weight": (3, 4), "bias": (3,)}))
    with pytest.raises(RuntimeError, match="torchrun"):
        shard_frozen_base(sm)
