"""The toy tasks of `saftune.data.toy`, sized for the method and trainer tests."""

from saftune.data import Benchmark
from saftune.data.toy import image_split, text_split


def benchmark(modality: str, n_train: int = 16) -> Benchmark:
    make = text_split if modality == "text" else image_split
    classes = ["negative", "positive"] if modality == "text" else ["dark", "bright"]
    templates = ["a {} review."] if modality == "text" else ["a {} photo."]
    return Benchmark("toy", modality, classes, templates, make("train", n_train, 0), make("val", 8, 1),
                     make("test", 16, 2), {"shifted": make("shifted", 16, 3)})
