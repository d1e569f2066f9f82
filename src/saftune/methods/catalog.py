"""Importing this module registers the built-in methods; `BUILTIN_ORDER` is how lists show them."""

from saftune.methods import zeroshot  # noqa: F401  isort: skip
from saftune.methods import lp  # noqa: F401  isort: skip
from saftune.methods import lpft  # noqa: F401  isort: skip
from saftune.methods import ft  # noqa: F401  isort: skip
from saftune.methods import l1  # noqa: F401  isort: skip
from saftune.methods import l2sp  # noqa: F401  isort: skip
from saftune.methods import kd  # noqa: F401  isort: skip
from saftune.methods import wiseft  # noqa: F401  isort: skip
from saftune.methods import lora  # noqa: F401  isort: skip
from saftune.methods import bitfit  # noqa: F401  isort: skip
from saftune.methods import flyp  # noqa: F401  isort: skip
from saftune.methods import clipood  # noqa: F401  isort: skip
from saftune.methods import coop  # noqa: F401  isort: skip
from saftune.methods import cocoop  # noqa: F401  isort: skip
from saftune.methods import maple  # noqa: F401  isort: skip
from saftune.methods import saft  # noqa: F401  isort: skip

# The order the papers list them in (registration order depends on which module is imported first).
BUILTIN_ORDER = ["zeroshot", "lp", "lpft", "ft", "l1", "l2sp", "kd", "wiseft", "lora", "bitfit", "flyp", "clipood",
                 "coop", "cocoop", "maple", "saft"]
