"""Fine-tuning methods: each a config dataclass + a small class, registered by name.

Example:
    >>> from saftune.methods import list_methods
    >>> list(list_methods())
    ['zeroshot', 'lp', 'lpft', 'ft', 'l1', 'l2sp', 'kd', 'wiseft', 'lora', 'bitfit', 'flyp', 'clipood', 'coop', 'cocoop', 'maple', 'saft']
"""

from saftune.methods.base import (
    Method,
    MethodConfig,
    PrepareContext,
    create_method,
    list_methods,
    method_class,
    register_method,
    result_kinds,
)

__all__ = ["Method", "MethodConfig", "PrepareContext", "create_method", "list_methods", "method_class",
           "register_method", "result_kinds"]
