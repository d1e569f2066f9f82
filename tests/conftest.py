"""Shared fixtures.

`require_asset(name)` gives the directory of a fetched asset (see `saftune.assets`). Tests that use it
need the real data; the documented test command fetches the assets first, so a missing asset is a
setup error and fails the test with the command that fixes it. Only an *optional* asset (which
`fetch all` skips on a machine that cannot get it) makes its tests skip, with the reason.

`copies_path` makes the sparse kernels copy and run the sampled product where `native_dots` would read in place.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def require_asset():
    """A function `name -> Path` returning `asset_path(name)`, or failing the test with the fetch command."""
    from saftune.assets import ASSETS, AssetMissingError, asset_path

    def get(name: str) -> Path:
        try:
            return asset_path(name)
        except AssetMissingError as e:
            if ASSETS[name].optional:  # `fetch all` skips an optional asset it cannot get (no apt, say)
                pytest.skip(f"optional asset missing: {e}")
            pytest.fail(str(e), pytrace=False)

    return get


@pytest.fixture
def copies_path(monkeypatch):
    """The sparse kernels' copies and sampled product, not `native_dots` reading in place: for tests of the copies."""
    from saftune.sparse import native_dots

    monkeypatch.setattr(native_dots, "MAX_ENTRIES_PER_ROW", 0)
