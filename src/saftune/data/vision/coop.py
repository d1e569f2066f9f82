"""The ten CoOp fine-grained datasets, read from CoOp's local layout and fixed split files.

Each dataset lives in its own folder under the data root (`root=` or `$SAFTUNE_DATA`) and, except
FGVC-Aircraft, comes with CoOp's split file `split_zhou_<Name>.json`:

    {"train": [[relative image path, label, class name], ...], "val": [...], "test": [...]}

where paths are relative to the dataset's image folder. Class names come from the split file.

| registry name   | folder          | image folder          | split file                              |
|-----------------|-----------------|-----------------------|-----------------------------------------|
| caltech101      | caltech-101     | 101_ObjectCategories  | split_zhou_Caltech101.json              |
| oxford-pets     | oxford_pets     | images                | split_zhou_OxfordPets.json              |
| stanford-cars   | stanford_cars   | (the folder itself)   | split_zhou_StanfordCars.json            |
| oxford-flowers  | oxford_flowers  | jpg                   | split_zhou_OxfordFlowers.json           |
| food101         | food-101        | images                | split_zhou_Food101.json                 |
| fgvc-aircraft   | fgvc_aircraft   | images                | variants.txt + images_variant_{train,val,test}.txt |
| sun397          | sun397          | SUN397                | split_zhou_SUN397.json                  |
| dtd             | dtd             | images                | split_zhou_DescribableTextures.json     |
| eurosat         | eurosat         | 2750                  | split_zhou_EuroSAT.json                 |
| ucf101          | ucf101          | UCF-101-midframes     | split_zhou_UCF101.json                  |

FGVC-Aircraft uses the dataset's own files (the `data/` folder of fgvc-aircraft-2013b renamed to
`fgvc_aircraft/`): `variants.txt` lists the 100 class names in label order, and each line of
`images_variant_<split>.txt` is "<image id> <variant name>" for `images/<image id>.jpg`.

Every dataset is registered with the shared `SubsampleOptions`:
`load_dataset("oxford-pets", root=..., shots=16, seed=1, subsample="all"|"base"|"new")`.

Example:
    >>> spec = COOP_DATASETS["oxford-pets"]
    >>> spec.folder, spec.image_dir, spec.split_file
    ('oxford_pets', 'images', 'split_zhou_OxfordPets.json')
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset
from saftune.data.templates import templates_for
from saftune.data.vision.paths import DatasetNotFoundError, dataset_dir, require
from saftune.data.vision.protocol import DatasetSource, SubsampleOptions, build_benchmark, register_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoopSpec:
    """Where one CoOp dataset lives under the data root."""

    name: str  # saftune registry name
    coop_name: str  # CoOp's class name, as in the split file name
    folder: str  # folder under the data root
    image_dir: str  # image folder inside it ("" = the folder itself)
    split_file: str | None  # CoOp's split file; None: FGVC-Aircraft's own text files
    title: str  # human-readable dataset name for help texts

    @property
    def layout(self) -> str:
        images = self.image_dir or "<the images' own sub-folders>"
        if self.split_file is None:
            return (
                f"$SAFTUNE_DATA/{self.folder}/\n  {images}/\n  variants.txt\n"
                "  images_variant_train.txt\n  images_variant_val.txt\n  images_variant_test.txt"
            )
        return f"$SAFTUNE_DATA/{self.folder}/\n  {images}/\n  {self.split_file}"


# fmt: off
_SPECS = [
    #        registry name     CoOp name              folder            image folder            split file
    CoopSpec("caltech101",     "Caltech101",          "caltech-101",    "101_ObjectCategories", "split_zhou_Caltech101.json",          "Caltech101"),  # noqa: E501
    CoopSpec("oxford-pets",    "OxfordPets",          "oxford_pets",    "images",               "split_zhou_OxfordPets.json",          "Oxford-IIIT Pets"),  # noqa: E501
    CoopSpec("stanford-cars",  "StanfordCars",        "stanford_cars",  "",                     "split_zhou_StanfordCars.json",        "Stanford Cars"),  # noqa: E501
    CoopSpec("oxford-flowers", "OxfordFlowers",       "oxford_flowers", "jpg",                  "split_zhou_OxfordFlowers.json",       "Oxford Flowers102"),  # noqa: E501
    CoopSpec("food101",        "Food101",             "food-101",       "images",               "split_zhou_Food101.json",             "Food-101"),  # noqa: E501
    CoopSpec("fgvc-aircraft",  "FGVCAircraft",        "fgvc_aircraft",  "images",               None,                                  "FGVC-Aircraft"),  # noqa: E501
    CoopSpec("sun397",         "SUN397",              "sun397",         "SUN397",               "split_zhou_SUN397.json",              "SUN397"),  # noqa: E501
    CoopSpec("dtd",            "DescribableTextures", "dtd",            "images",               "split_zhou_DescribableTextures.json", "DTD textures"),  # noqa: E501
    CoopSpec("eurosat",        "EuroSAT",             "eurosat",        "2750",                 "split_zhou_EuroSAT.json",             "EuroSAT"),  # noqa: E501
    CoopSpec("ucf101",         "UCF101",              "ucf101",         "UCF-101-midframes",    "split_zhou_UCF101.json",              "UCF101 mid-frames"),  # noqa: E501
]
# fmt: on
COOP_DATASETS: dict[str, CoopSpec] = {s.name: s for s in _SPECS}


class SplitFileError(ValueError):
    """A split file is malformed; the message names the file and the problem."""


def read_split_file(path: Path, image_root: Path) -> tuple[dict[str, Split], list[str]]:
    """Read a CoOp split file into {"train", "val", "test"} splits of absolute image paths.

    Returns:
        (splits, classnames), class names in label order taken from the file's rows.

    Raises:
        SplitFileError: not JSON, a part or row malformed, a label with two names, or labels that are
            not 0..n-1.
    """
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SplitFileError(f"cannot read split file {str(path)!r}: {e}") from e
    names: dict[int, str] = {}
    splits = {}
    for part in ("train", "val", "test"):
        rows = obj.get(part) if isinstance(obj, dict) else None
        if not isinstance(rows, list):
            raise SplitFileError(f"split file {str(path)!r} has no {part!r} list")
        inputs, labels = [], []
        for i, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)):
                raise SplitFileError(f"split file {str(path)!r}: {part}[{i}] is not [path, label, classname]: {row!r}")
            rel, label, name = row[0], int(row[1]), str(row[2])
            if names.setdefault(label, name) != name:
                raise SplitFileError(
                    f"split file {str(path)!r}: label {label} is named both {names[label]!r} and {name!r}"
                )
            inputs.append(image_root / rel)
            labels.append(label)
        splits[part] = Split(part, inputs, np.asarray(labels, dtype=np.int64))
    n = max(names, default=-1) + 1
    missing = sorted(set(range(n)) - set(names))
    if missing or min(names, default=0) < 0:
        raise SplitFileError(f"split file {str(path)!r}: labels must be 0..{n - 1}; missing {missing[:10]}")
    return splits, [names[i] for i in range(n)]


def read_aircraft(folder: Path, image_root: Path) -> tuple[dict[str, Split], list[str]]:
    """Read FGVC-Aircraft's `variants.txt` and `images_variant_{train,val,test}.txt`."""
    variants_file = folder / "variants.txt"
    classnames = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for part in ("train", "val", "test"):
        path = folder / f"images_variant_{part}.txt"
        inputs, labels = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            # Variant names contain spaces ("Cessna 172", "Boeing 737-200"): split on the first only.
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise SplitFileError(f"{str(path)!r} line {n}: variant {variant!r} is not in {str(variants_file)!r}")
            inputs.append(image_root / f"{image_id}.jpg")
            labels.append(label_of[variant])
        splits[part] = Split(part, inputs, np.asarray(labels, dtype=np.int64))
    return splits, classnames


def coop_source(name: str, root=None) -> DatasetSource:
    """The `DatasetSource` of a CoOp dataset under `root` (default `$SAFTUNE_DATA`)."""
    spec = COOP_DATASETS[name]
    marker = spec.split_file or "variants.txt"
    folder = dataset_dir(root, spec.folder, spec.layout, marker=marker)
    image_root = folder / spec.image_dir if spec.image_dir else folder
    require(image_root, f"{spec.title} image folder", spec.layout)
    if spec.split_file is None:
        for f in ["variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"]:
            require(folder / f, f"{spec.title} file", spec.layout)
        splits, classnames = read_aircraft(folder, image_root)
        source_file = str(folder / "variants.txt")
    else:
        split_path = require(folder / spec.split_file, f"{spec.title} split file", spec.layout)
        splits, classnames = read_split_file(split_path, image_root)
        source_file = str(split_path)
    for part, split in splits.items():
        # Checking one file per part catches a misplaced image folder at load time, not mid-training.
        if len(split) and not Path(split.inputs[0]).exists():
            raise DatasetNotFoundError(
                f"{spec.title}: the {part} split refers to {str(split.inputs[0])!r}, which does not exist; "
                f"are the images in {str(image_root)!r}? Expected layout:\n{spec.layout}"
            )
    return DatasetSource(
        name=name,
        classnames=classnames,
        templates=templates_for(name),
        dataset_dir=folder,
        image_root=image_root,
        load_train=lambda: splits["train"],
        load_val=lambda: splits["val"],
        load_test=lambda: splits["test"],
        info={"source": source_file, "image_root": str(image_root)},
    )


def _make_builder(name: str):
    def build(options: SubsampleOptions) -> Benchmark:
        return build_benchmark(coop_source(name, options.root), **options.sampling())

    build.__name__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"""{COOP_DATASETS[name].title} benchmark (CoOp protocol), options `SubsampleOptions`.

    Layout:
    {COOP_DATASETS[name].layout}
    """
    return build


for _name, _spec in COOP_DATASETS.items():
    register_source(_name)(partial(coop_source, _name))
    register_dataset(
        _name, f"{_spec.title}, CoOp few-shot protocol from local files ({_spec.folder}/)", options=SubsampleOptions
    )(_make_builder(_name))
