"""Learnable toy tasks for the tiny models: word-sentiment sentences and dark/bright images."""

import numpy as np

from saftune.data import Benchmark, Split

POSITIVE = ["good", "great", "superb", "lovely", "brilliant", "fine", "happy", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "boring", "dreadful", "sad", "terrible", "weak"]


def text_split(name: str, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choice(POSITIVE if label else NEGATIVE, size=3)
        texts.append("the film was " + " and ".join(words))
        labels.append(label)
    return Split(name, texts, labels)


def image_split(name: str, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 2
        base = 200 if label else 50
        images.append(np.clip(base + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8))
        labels.append(label)
    return Split(name, images, labels)


def benchmark(modality: str, n_train: int = 16) -> Benchmark:
    make = text_split if modality == "text" else image_split
    classes = ["negative", "positive"] if modality == "text" else ["dark", "bright"]
    templates = ["a {} review."] if modality == "text" else ["a {} photo."]
    return Benchmark("toy", modality, classes, templates, make("train", n_train, 0), make("val", 8, 1),
                     make("test", 16, 2), {"shifted": make("shifted", 16, 3)})
