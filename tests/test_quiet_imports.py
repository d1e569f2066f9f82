"""PEFT imports torchao when it is installed, and torchao logs a line for each CUDA extension it cannot load:
saftune's own imports of PEFT keep those lines out of the user's output (the demo's workers import it for LoRA)."""

import subprocess
import sys

import pytest

# A process set up as `saftune demo`'s workers are (saftune.pool._start_worker: logging at WARNING to stderr).
_WORKER = "import logging; logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s'); "


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", _WORKER + code], capture_output=True, text=True, check=True).stderr


def test_loras_import_of_peft_keeps_torchaos_import_lines_out_of_the_output():
    pytest.importorskip("peft")
    bare = _stderr("import peft")
    if "torchao" not in bare and "_pytree" not in bare:
        pytest.skip("importing PEFT prints nothing here (torchao not installed, or quiet on this machine)")
    quiet = _stderr("from saftune.methods.lora import _lora_config; _lora_config(8, 16, 0.0, ['q'])")
    assert "torchao" not in quiet and "_pytree" not in quiet, quiet


def test_the_demos_workers_load_models_without_torchaos_import_lines(tmp_path):
    # transformers imports torchao in its quantizers, which any model's from_pretrained loads.
    pytest.importorskip("transformers")
    bare = _stderr("import transformers.quantizers")
    if "torchao" not in bare and "_pytree" not in bare:
        pytest.skip("transformers' quantizers import quietly here (torchao not installed, or quiet on this machine)")
    quiet = _stderr(f"from saftune.pool import _start_worker; _start_worker(1, {str(tmp_path)!r}, logging.WARNING); "
                    "import transformers.quantizers")
    assert "torchao" not in quiet and "_pytree" not in quiet, quiet
