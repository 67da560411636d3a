"""The algorithm registry: ``algorithm=NAME`` -> its :class:`fastpref.train.algorithms.base.Algorithm` subclass.

Its own module so that :mod:`fastpref.train.config` can check ``algorithm`` and load the algorithms' sections
without importing the algorithms (which import the model code, which imports the config): this module imports
nothing of fastpref at import time; :func:`register_algorithm` registers a class's config section through
``fastpref.train.config.register_config_section`` when it runs (the config is loaded by then).
``fastpref.train.algorithms.base`` re-exports these names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastpref.train.algorithms.base import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}
"""``{name: Algorithm subclass}``; filled by :func:`register_algorithm`."""

_BUILTIN_MODULES = ("fastpref.train.algorithms.sft", "fastpref.train.algorithms.preference",
                    "fastpref.train.algorithms.kto", "fastpref.train.algorithms.rm")
_ONLINE_PACKAGE = "fastpref.train.online"


def register_algorithm(name: str):
    """Class decorator: register an :class:`Algorithm` subclass as ``algorithm=name`` (and its config section)."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        if ALGORITHMS.get(name, cls) is not cls:
            raise ValueError(f"register_algorithm: {name!r} is already registered by {ALGORITHMS[name]!r}")
        cls.name = name
        ALGORITHMS[name] = cls
        if cls.config_class is not None:
            from fastpref.train.config import register_config_section

            register_config_section(name, cls.config_class)
        return cls

    return deco


def load_builtin_algorithms() -> None:
    """Import the built-in algorithm modules (and ``fastpref.train.online`` when present) so they register."""
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    try:
        importlib.import_module(_ONLINE_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != _ONLINE_PACKAGE:
            raise
