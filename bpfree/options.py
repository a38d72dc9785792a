"""Checks of the options every verb shares (methods, dataset, seeds, budget), in one place, so
that `bpfree run`, `sweep`, `cost`, `tune` and `evaluate` refuse the same mistakes with the
same one-line message. Each returns the checked value or raises ConfigError."""

from __future__ import annotations

from collections.abc import Iterable

from bpfree.data import DATASETS, DatasetInfo
from bpfree.methods import ConfigError, get_method

INT64 = (-(2**63), 2**63 - 1)
DEVICES = ("auto", "cpu", "cuda")


def check_methods(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ConfigError("no method given; see `bpfree list`")
    for name in names:
        get_method(name)
    return names


def check_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def check_seeds(seeds: Iterable[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds:
        raise ConfigError("no seed given")
    for seed in seeds:
        if not INT64[0] <= seed <= INT64[1]:
            raise ConfigError(f"seed {seed} does not fit in 64 bits")
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise ConfigError(f"seed(s) {', '.join(map(str, duplicates))} given twice: each seed is "
                          f"one unit")
    return seeds


def at_least(name: str, value: int, low: int = 1) -> int:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return value


def check_val_fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {value}")
    return value


def check_target_acc(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"target accuracy must be in (0, 1] (a fraction), got {value}")
    return value


def check_device(value: str) -> str:
    if value not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {value!r}")
    return value
