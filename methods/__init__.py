"""Training rules compared by bpfree, discovered by convention; installed as `bpfree.methods`.

Adding a method means adding one module here with one `Method` subclass that sets `name`:
`all_methods()` imports every module of this package and collects such classes, so the CLI,
the tests, the asv benchmarks and the CI gate pick it up with no other edit. A module that
fails to import does not take the others down: it is listed by `broken_modules()` (and by
`bpfree list`), and the contract tests fail on it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

if __name__ != "bpfree.methods":  # the same files under a second name would register twice
    raise ImportError(f"this folder is installed as bpfree.methods: import bpfree.methods, "
                      f"not {__name__}")

from .base import ConfigError, HParams, Method, Task  # noqa: E402

__all__ = ["ConfigError", "HParams", "Method", "Task", "all_methods", "broken_modules",
           "get_method"]


@cache
def _discover() -> tuple[dict[str, type[Method]], dict[str, str]]:
    found: dict[str, type[Method]] = {}
    broken: dict[str, str] = {}
    for info in pkgutil.iter_modules(__path__):
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # listed as broken; every other method still loads
            broken[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Method)
                and obj.name
                and obj.__module__ == module.__name__
            ):
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two methods are named {obj.name!r}")
                found[obj.name] = obj
    return dict(sorted(found.items())), broken


def all_methods() -> dict[str, type[Method]]:
    """Every registered method by name, in a stable (alphabetical) order."""
    return dict(_discover()[0])


def broken_modules() -> dict[str, str]:
    """Method modules that failed to import, with their errors."""
    return dict(_discover()[1])


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        broken = broken_modules()
        hint = f"; modules that failed to import: {', '.join(broken)}" if broken else ""
        raise ConfigError(
            f"unknown method {name!r}; known: {', '.join(methods)} (see `bpfree list`){hint}"
        )
    return methods[name]
