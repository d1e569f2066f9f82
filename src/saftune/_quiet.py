"""Optional libraries imported without their import-time noise.

torchao (installed for the quantized base, and imported by PEFT and by transformers' quantizers whenever
it is installed: the latter on any model's `from_pretrained`) logs a line for each optional CUDA extension
it cannot load on a CPU machine, and torch's pytree warns once about enums torchao registers. Neither
concerns the user; without this, ten such lines opened the output of `saftune demo`, whose worker
processes load MiniLM. `quiet_torchao` silences one import; `quiet_torchao_logs` keeps those loggers
quiet for the whole process (the CLI and its worker processes call it).

Example:
    >>> before = logging.getLogger("torchao").level
    >>> with quiet_torchao():
    ...     print("not shown")  # stdout, stderr and torchao's loggers are quiet inside the block
    >>> logging.getLogger("torchao").level == before
    True
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Silence torchao's import-time log lines and prints (and torch's pytree warning) inside the block."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def quiet_torchao_logs() -> None:
    """Keep torchao's import-time log lines (and torch's pytree warning about its enums) out of this process's
    log for good: transformers imports torchao on a model's first `from_pretrained`, wherever that happens."""
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
