"""Text suites read from local files. Importing this package registers them:

* `boss-sentiment`, `boss-toxicity`, `boss-nli`: the BOSS OOD benchmark (Yuan et al., 2023), one ID
  dataset and three OOD test sets per task (see `saftune.data.text.boss` for the layout and format);
* `text-files`: your own CSV / TSV / JSONL files, a train / val / test file and named OOD files (see
  `saftune.data.text.files`).

Example:
    >>> from saftune.data.registry import load_dataset
    >>> b = load_dataset("boss-sentiment", root="/data", shots=16, seed=1)  # doctest: +SKIP
    >>> sorted(b.ood)                                                       # doctest: +SKIP
    ['dynasent', 'semeval', 'sst5']
"""

from saftune.data.text.boss import NLI_SEPARATOR, TASKS, BossTask, boss_dir, build_boss, read_boss_tsv
from saftune.data.text.files import TextFileError, build_text_files, read_text_file

__all__ = ["NLI_SEPARATOR", "TASKS", "BossTask", "TextFileError", "boss_dir", "build_boss", "build_text_files",
           "read_boss_tsv", "read_text_file"]
