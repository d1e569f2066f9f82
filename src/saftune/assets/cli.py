"""The assets' own command line (`python -m saftune.assets`); `saftune fetch` wraps the same `main`."""

from __future__ import annotations

import argparse
import logging
import sys

from saftune.assets.cache import cache_dir, is_complete
from saftune.assets.catalog import ASSETS, get_asset, list_assets
from saftune.assets.download import fetch
from saftune.assets.errors import AssetFetchError


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch [NAME ...|all] [--force] [--archive FILE]`` and ``list``.

    Example:
        >>> main(["list"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="saftune-assets", description="Fetch real weights and data into the cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download, verify and extract assets (default: all)")
    p_fetch.add_argument("names", nargs="*", default=["all"], help=f"asset names or 'all' ({', '.join(ASSETS)})")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even if cached")
    p_fetch.add_argument("--archive", help="use this downloaded archive file (one asset only)")
    sub.add_parser("list", help="list the assets and whether they are cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "list":
        for name, description in list_assets().items():
            state = "cached" if is_complete(ASSETS[name], cache_dir() / name) else "missing"
            print(f"{name:20s} {state:8s} {description}")
        print(f"cache: {cache_dir()}")
        return 0

    names = list(ASSETS) if args.names == ["all"] else args.names
    for name in names:
        try:
            get_asset(name)  # unknown names fail before anything downloads
        except ValueError as e:
            parser.error(str(e))
    if args.archive and len(names) != 1:
        parser.error("--archive needs exactly one asset name")
    failed = []
    for name in names:
        try:
            path = fetch(name, force=args.force, archive=args.archive)
            print(f"{name}: {path}")
        except AssetFetchError as e:
            # `fetch all` on a machine without apt still fetches everything the default benchmarks need.
            optional = ASSETS[name].optional and args.names == ["all"]
            print(f"{name}: {'skipped (optional)' if optional else 'FAILED'}: {e}", file=sys.stderr)
            if not optional:
                failed.append(name)
    return 1 if failed else 0
