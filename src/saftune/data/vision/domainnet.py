"""DomainNet (Peng et al., ICCV 2019) from its own local layout: train on one domain, test on the others.

The robust fine-tuning papers fine-tune CLIP on the `real` domain and report accuracy on its test set
(ID) and on the test sets of clipart, infograph, painting, quickdraw and sketch (OOD), 345 classes in
each. Layout, as the official archives unpack:

    $SAFTUNE_DATA/domainnet/
      real/<class>/<image>          clipart/, infograph/, painting/, quickdraw/, sketch/ alike
      real_train.txt                the official split lists: one "<domain>/<class>/<file> <label>"
      real_test.txt                 per line, the path relative to the domainnet/ folder
      clipart_test.txt, ...         the test list of every OOD domain

Class names are the class folder names with "_" read as a space ("aircraft_carrier" -> "aircraft
carrier"), in label order. Every list must number the classes the same way; the ID training list
must hold every class.

Protocol (`build_benchmark`, as the other image suites): `shots` images per class drawn with `seed`
from the ID training list (None: the whole list, the papers' full fine-tuning); validation is carved
from the training list, disjoint from the training images (`val_shots` per class; 4 by default, at
most 10% of a class with full data); ID test = the ID test list; OOD = each other domain's test list.
The few-shot sample is cached in `<id domain>/split_fewshot/`.

Example:
    >>> parse_list_line("real/aircraft_carrier/real_001_000001.jpg 0", "real_train.txt", 1)
    ('real/aircraft_carrier/real_001_000001.jpg', 'aircraft_carrier', 0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from saftune.config import option
from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset
from saftune.data.templates import templates_for
from saftune.data.vision.coop import SplitFileError
from saftune.data.vision.folder import readable_name
from saftune.data.vision.paths import DatasetNotFoundError, dataset_dir, require
from saftune.data.vision.protocol import DatasetSource, FewShotOptions, build_benchmark, register_source

logger = logging.getLogger(__name__)

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
LAYOUT = """$SAFTUNE_DATA/domainnet/
  real/<class>/<image>       (and clipart/, infograph/, painting/, quickdraw/, sketch/)
  real_train.txt             official split lists: one "<domain>/<class>/<file> <label>" per line
  real_test.txt
  <domain>_test.txt          for every OOD domain"""
_LINE_FORM = "'<domain>/<class>/<file> <label>' (an image path relative to the domainnet folder, then its class index)"


def parse_list_line(line: str, path: str, number: int) -> tuple[str, str, int]:
    """(relative image path, class folder, label) of one split-list line.

    Raises:
        SplitFileError: naming the file, the line and the expected form.
    """
    # Split on the last space: the label is last, and the path itself has none in the official lists.
    rel, _, label = line.strip().rpartition(" ")
    parts = rel.split("/")
    if not rel or len(parts) < 3 or not label.isdigit():
        raise SplitFileError(f"{path!r} line {number}: expected {_LINE_FORM}, got {line.strip()!r}; "
                             "use DomainNet's official split lists")
    return rel, parts[-2], int(label)


class _ClassTable:
    """Label <-> class folder, checked across every list read (the first line naming each is kept)."""

    def __init__(self):
        self.folder_of: dict[int, tuple[str, str, int]] = {}  # label -> (folder, file, line)
        self.label_of: dict[str, tuple[int, str, int]] = {}  # folder -> (label, file, line)

    def add(self, folder: str, label: int, path: str, number: int, new_classes: bool) -> None:
        known = self.label_of.get(folder)
        if known is None and not new_classes:
            raise SplitFileError(f"{path!r} line {number}: class folder {folder!r} is not in the ID training list; "
                                 "every domain's list must use the ID domain's 345 classes (use the official lists)")
        if known is not None and known[0] != label:
            raise SplitFileError(f"{path!r} line {number}: class {folder!r} has label {label}, but label {known[0]} "
                                 f"in {known[1]!r} line {known[2]}; every list must number the classes the same "
                                 "way (use the official lists)")
        other = self.folder_of.get(label)
        if other is not None and other[0] != folder:
            raise SplitFileError(f"{path!r} line {number}: label {label} is class {folder!r}, but class {other[0]!r} "
                                 f"in {other[1]!r} line {other[2]}; one label per class folder (use the official "
                                 "lists)")
        self.label_of.setdefault(folder, (label, path, number))
        self.folder_of.setdefault(label, (folder, path, number))

    def classnames(self, path: str) -> list[str]:
        n = max(self.folder_of, default=-1) + 1
        missing = sorted(set(range(n)) - set(self.folder_of))
        if not n or missing:
            raise SplitFileError(f"{path!r}: labels must be 0..{n - 1} with every class in the training list; no "
                                 f"line has label {missing[:10]}" if n else f"{path!r} lists no image")
        return [readable_name(self.folder_of[i][0]) for i in range(n)]


def read_split_list(path: Path, folder: Path, classes: _ClassTable, name: str, new_classes: bool = False) -> Split:
    """A split of absolute image paths from one DomainNet list, checking labels against `classes`."""
    require(path, "DomainNet split list", LAYOUT)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SplitFileError(f"{str(path)!r} is not UTF-8 text ({e}); use DomainNet's official split lists") from None
    inputs, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rel, class_folder, label = parse_list_line(line, str(path), number)
        classes.add(class_folder, label, str(path), number, new_classes)
        inputs.append(folder / rel)
        labels.append(label)
    if not inputs:
        raise SplitFileError(f"{str(path)!r} lists no image; use DomainNet's official split lists")
    if not inputs[0].exists():
        # One file per list catches images unpacked somewhere else at load time, not mid-training.
        raise DatasetNotFoundError(f"{str(path)!r} line 1 refers to {str(inputs[0])!r}, which does not exist; are "
                                   f"the images in {str(folder)!r}? Expected layout:\n{LAYOUT}")
    return Split(name, inputs, np.asarray(labels, dtype=np.int64))


def _source(id_domain: str, root) -> tuple[DatasetSource, _ClassTable]:
    folder = dataset_dir(root, "domainnet", LAYOUT, marker=f"{id_domain}_train.txt")
    classes = _ClassTable()
    train_list = require(folder / f"{id_domain}_train.txt", "DomainNet split list", LAYOUT)
    train = read_split_list(train_list, folder, classes, f"{id_domain}/train", new_classes=True)
    classnames = classes.classnames(str(train_list))
    test = read_split_list(folder / f"{id_domain}_test.txt", folder, classes, f"{id_domain}/test")
    source = DatasetSource(
        name="domainnet",
        classnames=classnames,
        templates=templates_for("domainnet"),
        # The few-shot cache goes beside the ID domain's images, so each ID domain keeps its own sample.
        dataset_dir=folder / id_domain,
        image_root=folder,
        load_train=lambda: train,
        load_val=None,
        load_test=lambda: test,
        info={"source": str(folder), "id_domain": id_domain},
    )
    return source, classes


def domainnet_source(id_domain: str = "real", root=None) -> DatasetSource:
    """DomainNet's `id_domain` as a `DatasetSource` (training and test lists; validation carved from train)."""
    return _source(id_domain, root)[0]


@dataclass
class DomainNetOptions(FewShotOptions):
    """`FewShotOptions` plus the domains: train on `id_domain`, test on `ood_domains`."""

    shots: int | None = option(16, "training images per class; none: the whole ID training list (the papers' "
                               "full fine-tuning)", low=1)
    id_domain: str = option("real", "the training (ID) domain", choices=DOMAINS)
    ood_domains: list[str] | None = option(None, "OOD test domains (default: the five others)", choices=DOMAINS)
    skip_missing: bool = option(False, "leave out an OOD domain whose test list is missing (logged) instead of "
                                "failing")

    def __post_init__(self):
        super().__post_init__()
        if self.ood_domains is not None and self.id_domain in self.ood_domains:
            raise ValueError(f"DomainNetOptions.ood_domains lists the ID domain {self.id_domain!r}; its test set is "
                             "the ID test split already: remove it")


@register_dataset(
    "domainnet",
    "DomainNet from local files (official split lists): train on real (or id_domain), OOD = clipart, "
    "infograph, painting, quickdraw, sketch; full data or few-shot",
    options=DomainNetOptions,
)
def build_domainnet(options: DomainNetOptions) -> Benchmark:
    """The DomainNet benchmark (see the module docstring)."""
    source, classes = _source(options.id_domain, options.root)
    ood_domains = options.ood_domains or [d for d in DOMAINS if d != options.id_domain]
    ood = {}
    for domain in ood_domains:
        path = source.image_root / f"{domain}_test.txt"
        if not path.is_file() and options.skip_missing:
            logger.warning("domainnet: leaving out %s: %s not found", domain, path)
            continue
        ood[domain] = read_split_list(path, source.image_root, classes, domain)
    bench = build_benchmark(source, **options.sampling(), ood=ood, name="domainnet")
    bench.info["ood_domains"] = list(ood)
    return bench


register_source("domainnet")(partial(domainnet_source, "real"))
