"""Image suites read from local files: CoOp's ten datasets, ImageNet and its shifts, cross-dataset
transfer, base-to-new splits, DomainNet and plain image folders. Importing this package registers them:

| name            | what                                                                   |
|-----------------|------------------------------------------------------------------------|
| imagenet        | ImageNet few-shot (CoOp layout)                                        |
| imagenet-shift  | ImageNet few-shot + OOD ImageNet-V2/-Sketch/-A/-R                      |
| caltech101, oxford-pets, stanford-cars, oxford-flowers, food101, fgvc-aircraft, sun397, dtd,    |
| eurosat, ucf101 | the CoOp datasets, few-shot, with base-to-new subsampling              |
| domainnet       | DomainNet: train on real, OOD = clipart, infograph, painting, ...      |
| cross-dataset   | train on one dataset, OOD = the others with their own class names      |
| image-folder    | your own `train/ val/ test/ ood/` class folders                        |

Common options: `root` (default `$SAFTUNE_DATA`), `shots=16` (None: full data), `seed=1`,
`subsample="all"|"base"|"new"` (base-to-new), `val_shots`, `templates`, `cache_dir`.

Example:
    >>> from saftune.data.registry import load_dataset
    >>> b = load_dataset("oxford-pets", root="/data", shots=16, seed=1, subsample="base")  # doctest: +SKIP
    >>> sorted(b.ood)                                                                       # doctest: +SKIP
    ['new']
"""

from saftune.data.vision import coop, cross_dataset, custom, domainnet, imagenet  # noqa: F401  (registers the suites)
from saftune.data.vision.base2new import base_new_classes, select_classes, subsample_classes
from saftune.data.vision.coop import COOP_DATASETS, SplitFileError, coop_source, read_split_file
from saftune.data.vision.fewshot import few_shot_indices
from saftune.data.vision.folder import IMAGE_EXTENSIONS, image_folder, list_images
from saftune.data.vision.imagenet import VARIANTS, imagenet_source, imagenet_variant, project_logits, read_classnames
from saftune.data.vision.paths import DATA_ENV, DatasetNotFoundError
from saftune.data.vision.protocol import DatasetSource, build_benchmark, get_source

__all__ = [
    "COOP_DATASETS",
    "DATA_ENV",
    "DatasetNotFoundError",
    "DatasetSource",
    "IMAGE_EXTENSIONS",
    "SplitFileError",
    "VARIANTS",
    "base_new_classes",
    "build_benchmark",
    "coop_source",
    "few_shot_indices",
    "get_source",
    "image_folder",
    "imagenet_source",
    "imagenet_variant",
    "list_images",
    "project_logits",
    "read_classnames",
    "read_split_file",
    "select_classes",
    "subsample_classes",
]
