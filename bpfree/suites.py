"""Named comparisons: which methods, on what data, with what budget; and backprop twins.

Every method in a suite gets the same data, epochs, batch size and seeds; only its own
hyperparameter preset differs (each method's `quick` or `paper` preset).

A method is compared with backprop only on the same network (`Method.network_of`): its
*backprop twin* is `backprop` (or, for NoProp-DT's blocks, `backprop-blocks`) configured to
train that network. A suite with `twins=True` adds the twin of every unit that lacks one, so
its report has a like-for-like reference for every method that has one (docs/reports.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from bpfree.harness import Unit
from bpfree.methods import ConfigError, HParams, Method, get_method

# The backprop methods a twin can be, in the order they are tried.
BASELINES = ("backprop", "backprop-blocks")


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    dataset: str
    epochs: int
    seeds: tuple[int, ...]
    preset: str
    batch_size: int = 128
    methods: tuple[str, ...] | None = None  # None: every registered method
    twins: bool = False  # add the backprop twin of every unit (docs/reports.md)
    # evaluation passes per epoch of a method whose prediction samples (--inference-runs)
    inference_runs: int = 1


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in [
        Suite(
            "quick",
            "every method on mnist-5k, 2 epochs, quick presets, seed 0, each next to backprop "
            "on its own network (under 2 minutes on 2 quiet CPU cores)",
            "mnist-5k",
            epochs=2,
            seeds=(0,),
            preset="quick",
            twins=True,
        ),
        Suite(
            "paper-mnist",
            "NoProp paper's MNIST comparison: NoProp DT/CT/FM and its backprop baseline, "
            "paper presets, 3 seeds x 5 inference runs (the paper's protocol), 100 epochs "
            "(needs --data-dir; hours on a GPU)",
            "mnist",
            epochs=100,
            seeds=(0, 1, 2),
            preset="paper",
            inference_runs=5,
            methods=("backprop-blocks", "noprop-dt", "noprop-ct", "noprop-fm"),
        ),
    ]
}


# Settings a twin copies: what the network is (arch, width, depth, bias, T, the embedding)
# and how it starts (embedding initialisation and scale, classifier initialisation, dropout).
TWIN_KEYS = ("arch", "width", "depth", "bias", "T", "embedding", "embed_dim", "embed_init",
             "embed_scale", "classifier_init", "dropout")


def twin(cls: type[Method], config: HParams) -> tuple[str, dict[str, Any]] | None:
    """(baseline method, overrides) of the backprop run on the network `config` trains, or
    None when no baseline can train it (NoProp-CT/FM's continuous-time block).

    The overrides are the settings the baseline's config shares with `config` among those
    that shape the network or its initialisation (arch, width, depth, bias; T and the label
    embedding), and the result is checked: the baseline built with them must report the same
    `network_of`. Its optimiser settings stay the baseline's own.
    """
    network = cls.network_of(config)
    values = asdict(config)
    for name in BASELINES:
        base = get_method(name)
        shared = {k: values[k] for k in TWIN_KEYS
                  if k in values and k in base.Config.__dataclass_fields__}
        try:
            candidate = base.config_for("default", shared)
        except ConfigError:  # the baseline cannot take these values: not its network
            continue
        if base.network_of(candidate) == network:
            return name, shared
    return None


def _key(unit: Unit) -> tuple[str, str, int, str]:
    return (unit.method, unit.dataset, unit.seed,
            json.dumps(asdict(unit.config()), sort_keys=True, default=str))


def add_twins(units: list[Unit]) -> list[Unit]:
    """The backprop twins `units` lack, one per (network, dataset, seed), in order.

    A twin starts from the unit's preset when its method has one of that name (`quick` next to
    `quick`), else from its `default`; a unit whose configuration some unit already has (a
    `backprop` already in the list, or a twin already added) is not added twice.
    """
    seen = {_key(u) for u in units}
    added = []
    for unit in units:
        cls = get_method(unit.method)
        if cls.name in BASELINES:
            continue
        found = twin(cls, unit.config())
        if found is None:
            continue
        name, overrides = found
        preset = unit.preset if unit.preset in get_method(name).presets else "default"
        candidate = Unit(name, unit.dataset, unit.seed, preset, tuple(sorted(overrides.items())))
        if _key(candidate) not in seen:
            seen.add(_key(candidate))
            added.append(candidate)
    return added


def describe_recorded(method: str, config: str) -> dict[str, str]:
    """{"network", "schedule"} of a unit from its recorded configuration (JSON), for records
    written before bpfree recorded them (`bpfree report` passes this to
    `bpfree.reports.report.build`); {} when the method is no longer registered or the
    configuration no longer builds, so that such a unit is never given a guessed network."""
    try:
        cls = get_method(method)
        settings = json.loads(config) if isinstance(config, str) else None
        if not isinstance(settings, dict) or not settings:
            return {}
        return {"network": cls.network_of(cls.config_for("default", settings)),
                "schedule": cls.schedule}
    except (ConfigError, ValueError, TypeError):
        return {}
