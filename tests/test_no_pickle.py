"""Files the library reads hold data, never code: nothing is unpickled, no loader may run code.

The source is scanned: every `torch.load` passes `weights_only=True`; pickle and its relatives are
never imported; numpy never allows pickles; YAML is read with `safe_load` only; no model code is
fetched and run (`trust_remote_code`); TorchScript (code) is never loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "saftune"
PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
CODE_LOADERS = {"torch.jit.load", "yaml.load", "yaml.load_all", "yaml.full_load", "yaml.full_load_all", "yaml.unsafe_load",
                "yaml.unsafe_load_all", "pandas.read_pickle", "numpy.load", "torch.load", "torch.serialization.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full dotted name, from the module's imports (`import torch as t`, `from torch import load`)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that could unpickle or run code from a file, as "file:line: what"."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if _is_true(node, "trust_remote_code"):
            found.append(f"{where}: trust_remote_code=True")
        if name in ("torch.load", "torch.serialization.load"):
            if not _is_true(node, "weights_only"):
                found.append(f"{where}: {name} without weights_only=True")
        elif name == "numpy.load":
            if _is_true(node, "allow_pickle"):
                found.append(f"{where}: numpy.load with allow_pickle=True")
        elif name in CODE_LOADERS:
            found.append(f"{where}: {name}")
    return found


def test_the_library_never_unpickles_or_runs_code_from_files():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 30
    offenders = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(SOURCE.parent)))]
    assert offenders == []
    # the scan does see the library's loaders (checkpoints, EfficientNet weights)
    calls = [path for path in files if "torch.load(" in path.read_text()]
    assert {p.name for p in calls} >= {"checkpoint.py", "efficientnet.py"}


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "import torch as t\nt.load(path, map_location='cpu')",
    "from torch import load\nload(path)",
    "import pickle",
    "from joblib import load",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(path, trust_remote_code=True)",
    "import torch\ntorch.jit.load(path)",
])
def test_the_scan_finds_each_kind_of_unsafe_load(snippet):
    assert len(unsafe_loads(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load(path)",
    "import yaml\nyaml.safe_load(text)",
])
def test_the_scan_accepts_safe_loads(snippet):
    assert unsafe_loads(snippet) == []
