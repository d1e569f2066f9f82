"""`sentiment-domains`: binary sentiment with a natural domain shift, from human-rated sentences.

The VADER ground-truth sets (Hutto & Gilbert, ICWSM 2014) rate sentences from four sources on one
scale, the mean of 20 raters' scores in [-4, 4]. One labelling protocol across sources makes the shift
between them a shift in the *text* only, which is what the benchmark measures: train on movie-review
snippets, test on tweets, Amazon product-review snippets and New York Times editorial snippets.

Protocol:

* binarised at |rating| > 0.5: rating > 0.5 -> "positive", rating < -0.5 -> "negative", the weakly
  rated rest is dropped (mostly neutral sentences no prompt can classify);
* ID = movie snippets (sentences repeated in the file are kept once, so no text is in both train and
  test): a fixed class-balanced test set of 1000 + 1000 sentences, chosen once with a constant seed;
  the other sentences form the training pool;
* from the pool, per class and with the run `seed`: `val_per_class` validation sentences (64) and
  `shots` training sentences (16; None: the whole rest of the pool). Hyperparameters are chosen on
  `val`, never on the OOD sets;
* OOD = the full binarised tweets, amazon and nyt domains (fixed); with `extra_domains=True` also
  `food-reviews`: the 5000 Amazon fine-food reviews of R's modeldata (`small_fine_foods`, train and test
  together), whose only label is "great" (5 stars) vs "other" (1 to 4 stars), mapped to positive vs
  negative. "Negative" there thus includes lukewarm 4-star reviews: a label shift as well as a text
  shift, so expect lower accuracy on it;
* HTML entities (tweets' "&amp;") are unescaped and HTML line breaks removed; otherwise the text is
  as the raters saw it.

Example:
    >>> b = load_dataset("sentiment-domains", shots=16, seed=1)   # doctest: +SKIP
    >>> len(b.train), b.train.class_counts().tolist()    # doctest: +SKIP
    (32, [16, 16])
    >>> b.prompts()                                      # doctest: +SKIP
    [['a negative review.'], ['a positive review.']]
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass

import numpy as np

from saftune.assets import VADER_FILES, asset_path
from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.embedded.sampling import few_shot, fixed_balanced, subsample
from saftune.data.registry import register_dataset

CLASSNAMES = ["negative", "positive"]
TEMPLATES = ["a {} review."]
THRESHOLD = 0.5           # |mean rating| must exceed this; on the [-4, 4] scale 0.5 is "barely" polar
ID_DOMAIN = "movies"
OOD_DOMAINS = ("tweets", "amazon", "nyt")
ID_TEST_PER_CLASS = 1000  # 2000 ID test sentences leave ~4000 per class in the training pool
TEST_SEED = 20140601      # constant: the ID test set and eval subsamples never depend on the run seed


def _clean(text: str) -> str:
    text = html.unescape(text.strip())
    return re.sub(r"\s*<br\s*/?>\s*", " ", text).strip()


def read_vader_domain(domain: str) -> tuple[list[str], np.ndarray]:
    """Texts and mean ratings of one VADER domain ("tweets", "movies", "amazon", "nyt"), in file order.

    Each line of a ``*_GroundTruth.txt`` file is ``id <tab> mean rating <tab> text``.

    Example:
        >>> texts, ratings = read_vader_domain("tweets")   # doctest: +SKIP
        >>> len(texts), float(ratings.min()) >= -4          # doctest: +SKIP
        (4200, True)
    """
    if domain not in VADER_FILES:
        raise ValueError(f"unknown VADER domain {domain!r}; known: {', '.join(VADER_FILES)}")
    path = asset_path("vader") / VADER_FILES[domain]
    texts, ratings = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path.name}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        ratings.append(float(fields[1]))
        texts.append(_clean(fields[2]))
    return texts, np.asarray(ratings)


def binarise(texts: list[str], ratings: np.ndarray, threshold: float = THRESHOLD) -> tuple[list[str], np.ndarray]:
    """Keep sentences with |rating| > threshold; label 1 (positive) if rating > threshold, else 0.

    Example:
        >>> binarise(["good", "meh", "bad"], np.array([2.0, 0.3, -1.0]))
        (['good', 'bad'], array([1, 0]))
    """
    keep = np.abs(ratings) > threshold
    return [t for t, k in zip(texts, keep) if k], (ratings[keep] > threshold).astype(np.int64)


def _dedupe(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    seen, keep = set(), []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return [texts[i] for i in keep], labels[keep]


def read_food_reviews() -> tuple[list[str], np.ndarray]:
    """The 5000 modeldata fine-food reviews; label 1 for score "great" (5 stars), 0 for "other"."""
    texts, labels = [], []
    with open(asset_path("modeldata") / "fine_foods.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(_clean(row["review"]))
            labels.append(1 if row["score"] == "great" else 0)
    return texts, np.asarray(labels, dtype=np.int64)


def _counts(labels: np.ndarray, total: int) -> dict:
    negative, positive = np.bincount(labels, minlength=2).tolist()
    return {"negative": negative, "positive": positive, "dropped": total - negative - positive}


def _split(name: str, texts: list[str], labels: np.ndarray, indices: np.ndarray) -> Split:
    return Split(name, [texts[i] for i in indices], labels[indices])


@dataclass
class SentimentOptions(Config):
    """Options of `sentiment-domains` (see the module docstring for the protocol)."""

    shots: int | None = option(16, "training sentences per class, drawn by `seed` from the ID pool; none: the whole "
                               "pool minus the validation set", low=1)
    seed: int = option(1, "run seed (the protocol uses 1, 2, 3); changes train and val only", low=0)
    val_per_class: int = option(64, "validation sentences per class, from the pool, disjoint from train", low=0)
    extra_domains: bool = option(False, "add the food-reviews OOD split (needs the optional modeldata asset)")
    max_test: int | None = option(None, "shrink the ID test set to at most this many sentences (class-balanced, "
                                  "fixed seed); none: full set", low=1)
    max_ood: int | None = option(None, "same for each OOD split", low=1)


@register_dataset("sentiment-domains",
                  "VADER human-rated sentences: train on movie snippets, test on tweets / Amazon / NYT (embedded default)",
                  options=SentimentOptions)
def sentiment_domains(options: SentimentOptions) -> Benchmark:
    """Build the `sentiment-domains` benchmark (see the module docstring for the protocol).

    Raises:
        AssetMissingError: `vader` (or, with extra_domains, `modeldata`) was not fetched.

    Example:
        >>> b = sentiment_domains(SentimentOptions(shots=4, seed=2, max_test=200, max_ood=200))  # doctest: +SKIP
        >>> len(b.test), sorted(b.ood)                                                          # doctest: +SKIP
        (200, ['amazon', 'nyt', 'tweets'])
    """
    shots, seed, val_per_class = options.shots, options.seed, options.val_per_class
    extra_domains, max_test, max_ood = options.extra_domains, options.max_test, options.max_ood
    texts, ratings = read_vader_domain(ID_DOMAIN)
    polar_texts, polar_labels = binarise(texts, ratings)
    movie_texts, movie_labels = _dedupe(polar_texts, polar_labels)
    duplicates = len(polar_texts) - len(movie_texts)
    counts = {ID_DOMAIN: {**_counts(movie_labels, len(texts) - duplicates), "duplicates": duplicates}}

    test_idx = fixed_balanced(movie_labels, ID_TEST_PER_CLASS, TEST_SEED, num_classes=2)
    pool_idx = np.setdiff1d(np.arange(len(movie_texts)), test_idx)
    train_in_pool, val_in_pool = few_shot(movie_labels[pool_idx], shots, val_per_class, seed, num_classes=2)
    test_idx = test_idx[subsample(movie_labels[test_idx], max_test, TEST_SEED, num_classes=2)]

    ood = {}
    for domain in OOD_DOMAINS + (("food-reviews",) if extra_domains else ()):
        if domain == "food-reviews":
            d_texts, d_labels = read_food_reviews()
            raw_total = len(d_texts)
        else:
            texts, ratings = read_vader_domain(domain)
            d_texts, d_labels = binarise(texts, ratings)
            raw_total = len(texts)
        counts[domain] = _counts(d_labels, raw_total)
        ood[domain] = _split(domain, d_texts, d_labels, subsample(d_labels, max_ood, TEST_SEED, num_classes=2))

    train = _split(f"{ID_DOMAIN}/train", movie_texts, movie_labels, pool_idx[train_in_pool])
    val = _split(f"{ID_DOMAIN}/val", movie_texts, movie_labels, pool_idx[val_in_pool])
    test = _split(f"{ID_DOMAIN}/test", movie_texts, movie_labels, test_idx)
    info = {
        "source": "vaderSentiment==3.3.2 sdist, hutto_ICWSM_2014 ground truth (Hutto & Gilbert, ICWSM 2014)"
                  + ("; r-cran-modeldata 1.1.0 small_fine_foods" if extra_domains else ""),
        "threshold": THRESHOLD,
        "binarisation": "rating > 0.5 positive, rating < -0.5 negative, rest dropped"
                        + ("; food-reviews: great positive, other negative" if extra_domains else ""),
        "id_domain": ID_DOMAIN,
        "shots": shots,
        "seed": seed,
        "val_per_class": val_per_class,
        "id_test_per_class": ID_TEST_PER_CLASS,
        "test_seed": TEST_SEED,
        "max_test": max_test,
        "max_ood": max_ood,
        "pool_size": len(pool_idx),
        "counts": counts,
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test),
                        **{name: len(split) for name, split in ood.items()}},
    }
    return Benchmark("sentiment-domains", "text", list(CLASSNAMES), list(TEMPLATES), train, val, test, ood, info)
