"""The asset cache: registry, missing / half-finished / tampered assets, atomic installs, extractors.

Everything except the last few tests runs in a temporary SAFTUNE_HOME with fake archives: no network.
"""

import hashlib
import io
import json
import math
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from saftune import assets
from saftune.assets import download, formats
from saftune.assets import (
    ASSETS,
    Asset,
    AssetFetchError,
    AssetMissingError,
    ChecksumMismatchError,
    asset_path,
    cache_dir,
    fetch,
    list_assets,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache directory as SAFTUNE_HOME."""
    root = tmp_path / "home"
    monkeypatch.setenv("SAFTUNE_HOME", str(root))
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to download fail loudly."""

    def refuse(asset, into):
        raise AssertionError(f"test tried to download {asset.name}")

    monkeypatch.setattr(download, "download_archive", refuse)


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def toy_asset(tmp_path, monkeypatch):
    """Register a fake asset "toy" (a zip with two files) and return (archive path, its sha256)."""
    archive = tmp_path / "toy-1.0-py3-none-any.whl"
    archive.write_bytes(_zip_bytes({"toy/data/a.txt": b"alpha", "toy/data/sub/b.txt": b"beta", "toy/x.py": b""}))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()

    def extract(src, dest):
        formats.copy_zip_tree(src, "toy/data/", dest)

    monkeypatch.setitem(ASSETS, "toy", Asset("toy", "a toy asset", "pypi-wheel", "toy==1.0", digest, extract))
    return archive, digest


# ---------------------------------------------------------------------------------------------------
# registry and paths


def test_registry_lists_every_asset_with_pinned_source_and_checksum():
    listing = list_assets()
    assert set(listing) == {"minilm", "efficientnet-lite0", "vader", "mnist5k", "modeldata", "smollm2", "openai-evals",
                            "bigbench"}
    for name, description in listing.items():
        assert description and "\n" not in description
        asset = ASSETS[name]
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256), name
        assert re.search(r"==?\d", asset.requirement), f"{name} must pin a version: {asset.requirement}"
        assert asset.source in {"pypi-wheel", "pypi-sdist", "debian"}
    # The EfficientNet model code loads this exact file name; the description documents it.
    assert assets.EFFICIENTNET_FILE in listing["efficientnet-lite0"]
    assert ASSETS["modeldata"].optional and not ASSETS["vader"].optional


def test_cache_dir_honours_saftune_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFTUNE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SAFTUNE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "saftune"


def test_missing_asset_names_the_fetch_command(home):
    with pytest.raises(AssetMissingError, match=r"run: saftune fetch vader$") as info:
        asset_path("vader")
    assert isinstance(info.value, FileNotFoundError)
    assert "vaderSentiment==3.3.2" in str(info.value)
    assert not home.exists(), "asset_path must never create or download anything"


def test_unknown_asset_suggests_a_close_name():
    with pytest.raises(ValueError, match="Did you mean 'minilm'"):
        asset_path("minilmm")


def test_half_finished_directory_is_not_trusted(home):
    # What a crash could leave: the files are there, the completion marker is not.
    (home / "vader").mkdir(parents=True)
    (home / "vader" / "tweets_GroundTruth.txt").write_text("1\t2.0\tgood\n")
    with pytest.raises(AssetMissingError, match="not from a completed fetch.*run: saftune fetch vader"):
        asset_path("vader")
    # A marker from a different archive (an older registry entry) is not trusted either.
    marker = {"name": "vader", "sha256": "0" * 64}
    (home / "vader" / assets.MARKER).write_text(json.dumps(marker))
    with pytest.raises(AssetMissingError):
        asset_path("vader")
    marker["sha256"] = ASSETS["vader"].sha256
    (home / "vader" / assets.MARKER).write_text(json.dumps(marker))
    assert asset_path("vader") == home / "vader"


# ---------------------------------------------------------------------------------------------------
# fetch: checksum, atomic install, failures


def test_checksum_mismatch_is_refused_and_writes_nothing(home, tmp_path, monkeypatch):
    fake = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    fake.write_bytes(_tar_gz_bytes({"vaderSentiment-3.3.2/setup.py": b"# not the real sdist"}))
    with pytest.raises(ChecksumMismatchError, match="refusing"):
        fetch("vader", archive=fake)
    # Same through the download path (pip stubbed out by a function returning the fake file).
    monkeypatch.setattr(download, "download_archive", lambda asset, into: fake)
    with pytest.raises(ChecksumMismatchError):
        fetch("vader")
    assert not (home / "vader").exists()
    assert not list(home.glob(".vader.partial-*"))


def test_fetch_installs_atomically_with_marker(home, toy_asset, monkeypatch):
    archive, digest = toy_asset
    monkeypatch.setattr(download, "download_archive", lambda asset, into: archive)
    path = fetch("toy")
    assert path == home / "toy" == asset_path("toy")
    assert (path / "a.txt").read_text() == "alpha" and (path / "sub" / "b.txt").read_text() == "beta"
    assert not (path / "x.py").exists(), "only the files under the prefix are kept"
    marker = json.loads((path / assets.MARKER).read_text())
    assert marker["sha256"] == digest and marker["files"] == ["a.txt", "sub/b.txt"]
    assert not list(home.glob(".toy.partial-*")) and not list(home.glob(".toy.old-*"))


def test_fetch_does_not_download_again_unless_forced(home, toy_asset, no_network):
    archive, _ = toy_asset
    fetch("toy", archive=archive)
    (home / "toy" / "a.txt").write_text("edited")
    assert fetch("toy") == home / "toy"  # cached: _download (which would raise) is not called
    assert (home / "toy" / "a.txt").read_text() == "edited"
    fetch("toy", archive=archive, force=True)
    assert (home / "toy" / "a.txt").read_text() == "alpha"


def test_crash_during_extraction_leaves_previous_state(home, toy_asset, monkeypatch):
    archive, digest = toy_asset

    def crash(src, dest):
        (dest / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-extraction

    # First fetch crashes: no directory to trust, no leftovers.
    monkeypatch.setitem(ASSETS, "toy", Asset("toy", "toy", "pypi-wheel", "toy==1.0", digest, crash))
    with pytest.raises(KeyboardInterrupt):
        fetch("toy", archive=archive)
    with pytest.raises(AssetMissingError):
        asset_path("toy")
    assert not list(home.glob(".toy.*partial*"))

    # A forced re-fetch that crashes keeps the good copy already installed.
    good = Asset("toy", "toy", "pypi-wheel", "toy==1.0", digest, lambda s, d: formats.copy_zip_tree(s, "toy/data/", d))
    monkeypatch.setitem(ASSETS, "toy", good)
    fetch("toy", archive=archive)
    monkeypatch.setitem(ASSETS, "toy", Asset("toy", "toy", "pypi-wheel", "toy==1.0", digest, crash))
    with pytest.raises(KeyboardInterrupt):
        fetch("toy", archive=archive, force=True)
    assert (asset_path("toy") / "a.txt").read_text() == "alpha"


def test_stale_partial_directories_are_cleaned_up(home, toy_asset):
    archive, _ = toy_asset
    stale = home / ".toy.partial-crashed"
    stale.mkdir(parents=True)
    fetch("toy", archive=archive)
    assert not stale.exists()


def test_missing_archive_file_is_a_fetch_error(home, tmp_path):
    with pytest.raises(AssetFetchError, match="does not exist"):
        fetch("vader", archive=tmp_path / "nope.tar.gz")


def test_a_downloaded_archive_is_returned_for_checking_and_extraction(tmp_path, monkeypatch):
    def pip_download(command, cwd):  # what `pip download -d DIR` leaves: the one archive file
        (Path(cwd) / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"sdist")

    monkeypatch.setattr(download, "_run", pip_download)
    found = download.download_archive(ASSETS["vader"], tmp_path)
    assert found == tmp_path / "vaderSentiment-3.3.2.tar.gz"


def test_debian_asset_without_apt_explains_why(tmp_path, monkeypatch):
    monkeypatch.setattr(download.shutil, "which", lambda cmd: None)
    with pytest.raises(AssetFetchError, match="needs apt-get.*--archive"):
        download.download_archive(ASSETS["modeldata"], tmp_path)


# ---------------------------------------------------------------------------------------------------
# extractors on small synthetic archives


def test_unsafe_member_paths_are_refused(tmp_path):
    for bad in ["../evil.txt", "/etc/passwd", "a/../../b"]:
        with pytest.raises(AssetFetchError, match="unsafe"):
            formats.safe_join(tmp_path, bad)


def test_vader_extractor_reads_the_nested_tarball(tmp_path):
    inner = _tar_gz_bytes({f"hutto_ICWSM_2014/{f}": b"1\t0.5\tx\n" for f in
                           [*assets.VADER_FILES.values(), "_README_.txt", "vader_icwsm2014_final.pdf"]})
    outer = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    outer.write_bytes(_tar_gz_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    dest = tmp_path / "out"
    dest.mkdir()
    formats.extract_vader(outer, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*assets.VADER_FILES.values(), "_README_.txt"])


def test_deb_reader_finds_the_data_member(tmp_path):
    data = _tar_gz_bytes({"./usr/share/x.txt": b"hello"})

    def member(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")

    deb = tmp_path / "pkg.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.gz", b"xyz")
                    + member("data.tar.gz", data))
    with formats.deb_data_tar(deb) as tar:
        assert tar.extractfile("./usr/share/x.txt").read() == b"hello"
    (tmp_path / "not.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(AssetFetchError, match="not a Debian package"):
        formats.deb_data_tar(tmp_path / "not.deb")


# ---------------------------------------------------------------------------------------------------
# command line


def test_main_list_and_unknown_name(home, capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^vader\s+missing\s+VADER", out, re.MULTILINE) and str(home) in out
    with pytest.raises(SystemExit) as info:
        assets.main(["fetch", "nope"])
    assert info.value.code == 2
    assert "unknown asset 'nope'" in capsys.readouterr().err


def test_main_fetch_with_archive(home, toy_asset, no_network, capsys):
    archive, _ = toy_asset
    assert assets.main(["fetch", "toy", "--archive", str(archive)]) == 0
    assert capsys.readouterr().out.strip() == f"toy: {home / 'toy'}"


# ---------------------------------------------------------------------------------------------------
# the real fetched assets (the test command fetches them first)


def test_real_minilm_directory_loads_with_transformers(require_asset):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path = require_asset("minilm")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("a positive review.")["input_ids"][0] == tokenizer.cls_token_id
    with safe_open(path / "model.safetensors", "pt") as f:
        # The file also stores the 512-entry position_ids buffer, which is not a parameter.
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "position_ids" not in k)
    assert total == 22_713_216  # all-MiniLM-L6-v2's parameter count


def test_real_efficientnet_state_dict(require_asset):
    import torch

    state = torch.load(require_asset("efficientnet-lite0") / assets.EFFICIENTNET_FILE, weights_only=True,
                       map_location="cpu")
    assert len(state) == 296 and "_conv_stem.weight" in state
    assert sum(v.numel() for v in state.values()) == 4_694_073
