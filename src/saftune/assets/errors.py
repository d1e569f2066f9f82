"""What can go wrong with an asset: it was never fetched, or fetching it failed."""


class AssetMissingError(FileNotFoundError):
    """An asset is needed but has not been fetched (or its fetch did not complete)."""


class AssetFetchError(RuntimeError):
    """Downloading or extracting an asset failed; the cache is left as it was."""


class ChecksumMismatchError(AssetFetchError):
    """The downloaded archive is not the one whose sha256 the registry records."""
