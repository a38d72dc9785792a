"""Training rules compared by bpfree, discovered by convention.

Adding a method means adding one module here with one `Method` subclass that sets `name`:
`all_methods()` imports every module of this package and collects such classes, so the CLI,
the tests, the asv benchmarks and the CI gate pick it up with no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from methods.base import ConfigError, HParams, Method, Task

__all__ = ["ConfigError", "HParams", "Method", "Task", "all_methods", "get_method"]


def all_methods() -> dict[str, type[Method]]:
    """Every registered method by name, in a stable (alphabetical) order."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
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
    return dict(sorted(found.items()))


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        raise ConfigError(
            f"unknown method {name!r}; known: {', '.join(methods)} (see `bpfree list`)"
        )
    return methods[name]
