"""`sentiment-domains`: binary sentiment with a natural domain shift, from human-rated sentences.

The VADER ground-truth sets (Hutto & Gilbert, ICWSM 2014) rate sentences from four sources on one
scale, the mean of 20 raters' scores in [-4, 4]. One labelling protocol across sources makes the shift
between them a shift in the *text* only, which is what the benchmark measures: by default train on
movie-review snippets, test on tweets, Amazon product-review snippets and New York Times editorial
snippets.

Protocol:

* binarised at |rating| > 0.5: rating > 0.5 -> "positive", rating < -0.5 -> "negative", the weakly
  rated rest is dropped (mostly neutral sentences no prompt can classify);
* ID = one domain, `id_domain` (default movies, the other three OOD), so one benchmark gives four
  directions of shift. Every domain has a fixed evaluation set, chosen once with a constant seed, that
  is the same sentences whether the domain is ID (its test set) or OOD:

  | domain | evaluation set (uncapped)          | held out when ID (test) | training pool when ID   |
  |--------|------------------------------------|-------------------------|-------------------------|
  | movies | 1000 + 1000 held-out sentences     | the same 2000           | the other ~8000         |
  | tweets, amazon, nyt | the whole domain      | 500 + 500               | the rest (~1800-2400)   |

  `max_test` / `max_ood` shrink an evaluation set to a class-balanced subset with the constant seed.
  tweets, amazon and nyt are subsampled from the whole domain, in a fixed order whose first 500 per
  class are the held-out part, so with a cap of at most 1000 a domain's ID test set and its OOD set
  are exactly the same sentences (uncapped, an OOD domain is evaluated whole, an ID domain on its
  held-out 1000). Movie sentences repeated in the file are kept once; in the other domains a pool
  sentence whose text is also held out is dropped from the pool, so no text is in both train and test;
* from the ID pool, per class and with the run `seed`: `val_per_class` validation sentences (64) and
  `shots` training sentences (16; None: the whole rest of the pool). Hyperparameters are chosen on
  `val`, never on the OOD sets;
* with `extra_domains=True` also OOD `food-reviews`: the 5000 Amazon fine-food reviews of R's modeldata
  (`small_fine_foods`, train and test together), whose only label is "great" (5 stars) vs "other" (1 to
  4 stars), mapped to positive vs negative. "Negative" there thus includes lukewarm 4-star reviews: a
  label shift as well as a text shift, so expect lower accuracy on it;
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
DOMAINS = ("movies", "tweets", "amazon", "nyt")
ID_DOMAIN = "movies"  # the default
# Sentences per class held out for testing when the domain is ID. Movies, the largest domain, keeps the
# 1000 its test set always had (~4000 per class stay in the pool); the others hold out 500, which leaves
# at least 562 per class in their pools (tweets' negatives).
HELD_OUT_PER_CLASS = {"movies": 1000, "tweets": 500, "amazon": 500, "nyt": 500}
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


def _read_domain(domain: str) -> tuple[list[str], np.ndarray, dict]:
    """Binarised texts and labels of a VADER domain, and its counts (movies deduplicated)."""
    texts, ratings = read_vader_domain(domain)
    polar_texts, polar_labels = binarise(texts, ratings)
    if domain != "movies":
        return polar_texts, polar_labels, _counts(polar_labels, len(texts))
    unique_texts, unique_labels = _dedupe(polar_texts, polar_labels)
    duplicates = len(polar_texts) - len(unique_texts)
    return unique_texts, unique_labels, {**_counts(unique_labels, len(texts) - duplicates), "duplicates": duplicates}


def held_out(domain: str, labels: np.ndarray) -> np.ndarray:
    """The sentences a domain holds out for testing when it is ID (fixed, class-balanced)."""
    return fixed_balanced(labels, HELD_OUT_PER_CLASS[domain], TEST_SEED, num_classes=2)


def evaluation_indices(domain: str, labels: np.ndarray, cap: int | None, as_id: bool) -> np.ndarray:
    """A domain's fixed evaluation set, at most `cap` sentences (see the module docstring).

    Movies: its held-out sentences, subsampled. The others: the whole domain subsampled, whose fixed
    per-class order starts with the held-out part, so for `cap` <= 1000 the ID and OOD sets coincide;
    as ID it never leaves the held-out part.

    Example:
        >>> labels = np.array([0, 1] * 1500)
        >>> bool((evaluation_indices("nyt", labels, 600, as_id=True)
        ...       == evaluation_indices("nyt", labels, 600, as_id=False)).all())
        True
        >>> len(evaluation_indices("nyt", labels, None, as_id=True)), len(evaluation_indices("nyt", labels, None, False))
        (1000, 3000)
    """
    if domain == "movies":
        held = held_out(domain, labels)
        return held[subsample(labels[held], cap, TEST_SEED, num_classes=2)]
    if not as_id:
        return subsample(labels, cap, TEST_SEED, num_classes=2)
    per_class = HELD_OUT_PER_CLASS[domain] if cap is None else min(HELD_OUT_PER_CLASS[domain], cap // 2)
    # fixed_balanced takes a prefix of one fixed permutation per class, whatever the count: the
    # subsample `subsample(labels, cap)` draws for the OOD role.
    return fixed_balanced(labels, per_class, TEST_SEED, num_classes=2)


def training_pool(texts: list[str], labels: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Indices outside `held` whose text is not held out either, each text once (first occurrence)."""
    seen = {texts[i] for i in held}
    pool = []
    for i in np.setdiff1d(np.arange(len(labels)), held):
        if texts[i] not in seen:
            seen.add(texts[i])
            pool.append(i)
    return np.asarray(pool, dtype=np.int64)


@dataclass
class SentimentOptions(Config):
    """Options of `sentiment-domains` (see the module docstring for the protocol)."""

    id_domain: str = option(ID_DOMAIN, "the training (ID) domain; the other three are OOD", choices=DOMAINS)
    shots: int | None = option(16, "training sentences per class, drawn by `seed` from the ID pool; none: the whole "
                               "pool minus the validation set", low=1)
    seed: int = option(1, "run seed (the protocol uses 1, 2, 3); changes train and val only", low=0)
    val_per_class: int = option(64, "validation sentences per class, from the pool, disjoint from train", low=0)
    extra_domains: bool = option(False, "add the food-reviews OOD split (needs the optional modeldata asset)")
    max_test: int | None = option(None, "shrink the ID test set to at most this many sentences (class-balanced, "
                                  "fixed seed; the same sentences as the domain's OOD set under max_ood); none: "
                                  "its whole held-out part", low=1)
    max_ood: int | None = option(None, "same for each OOD split", low=1)


@register_dataset("sentiment-domains",
                  "VADER human-rated sentences: train on movie snippets (or id_domain), test on the other domains of "
                  "tweets / Amazon / NYT / movies (embedded default)",
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
    id_domain = options.id_domain
    counts, ood = {}, {}
    for domain in DOMAINS:
        d_texts, d_labels, counts[domain] = _read_domain(domain)
        if domain == id_domain:
            id_texts, id_labels = d_texts, d_labels
        else:
            ood[domain] = _split(domain, d_texts, d_labels, evaluation_indices(domain, d_labels, max_ood, as_id=False))
    counts = {id_domain: counts[id_domain], **{d: c for d, c in counts.items() if d != id_domain}}

    pool_idx = training_pool(id_texts, id_labels, held_out(id_domain, id_labels))
    train_in_pool, val_in_pool = few_shot(id_labels[pool_idx], shots, val_per_class, seed, num_classes=2)
    test_idx = evaluation_indices(id_domain, id_labels, max_test, as_id=True)
    if extra_domains:
        d_texts, d_labels = read_food_reviews()
        counts["food-reviews"] = _counts(d_labels, len(d_texts))
        ood["food-reviews"] = _split("food-reviews", d_texts, d_labels,
                                     subsample(d_labels, max_ood, TEST_SEED, num_classes=2))

    train = _split(f"{id_domain}/train", id_texts, id_labels, pool_idx[train_in_pool])
    val = _split(f"{id_domain}/val", id_texts, id_labels, pool_idx[val_in_pool])
    test = _split(f"{id_domain}/test", id_texts, id_labels, test_idx)
    info = {
        "source": "vaderSentiment==3.3.2 sdist, hutto_ICWSM_2014 ground truth (Hutto & Gilbert, ICWSM 2014)"
                  + ("; r-cran-modeldata 1.1.0 small_fine_foods" if extra_domains else ""),
        "threshold": THRESHOLD,
        "binarisation": "rating > 0.5 positive, rating < -0.5 negative, rest dropped"
                        + ("; food-reviews: great positive, other negative" if extra_domains else ""),
        "id_domain": id_domain,
        "shots": shots,
        "seed": seed,
        "val_per_class": val_per_class,
        "id_test_per_class": HELD_OUT_PER_CLASS[id_domain],
        "test_seed": TEST_SEED,
        "max_test": max_test,
        "max_ood": max_ood,
        "pool_size": len(pool_idx),
        "counts": counts,
        "split_sizes": {"train": len(train), "val": len(val), "test": len(test),
                        **{name: len(split) for name, split in ood.items()}},
    }
    return Benchmark("sentiment-domains", "text", list(CLASSNAMES), list(TEMPLATES), train, val, test, ood, info)
