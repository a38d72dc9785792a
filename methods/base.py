"""The one interface every training rule implements.

A `Method` owns everything about *how* it learns: its networks, its optimisers and its update
step. The harness only ever calls `train_step`, `predict`, `state_dict` and `load_state_dict`,
so backprop, NoProp, forward gradient and target propagation are measured by the same code.

Hyperparameters are a `@dataclass` per method (its `Config`), so every knob is typed,
documented and visible in `bpfree list`; named presets are plain dicts of overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class ConfigError(ValueError):
    """A user mistake in hyperparameters or options: reported as one line, never a traceback."""


# The preset `bpfree tune` writes. Tuned values are per method *and dataset*, which
# `config_for` cannot see, so the caller resolves them (`benchmarks.tune.resolve_preset`) and
# passes the whole tuned configuration as overrides on top of the dataclass defaults.
TUNED_PRESET = "tuned"


@dataclass(frozen=True)
class Task:
    """What a method is asked to learn, independent of how it learns it.

    `train_sample` is a few thousand training examples (inputs, labels) for methods whose
    initialisation depends on data (NoProp's prototype label embeddings). It never contains
    validation or test examples.

    `steps_per_epoch` is the number of `train_step` calls in one epoch of the run
    (ceil(training images / batch size), filled by the harness), for methods whose learning
    rate schedule is defined by epoch; None where there is no epoch (tests, `bpfree cost`).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    device: torch.device = torch.device("cpu")
    seed: int = 0
    train_sample: tuple[Tensor, Tensor] | None = None
    steps_per_epoch: int | None = None


@dataclass
class HParams:
    """Base of every method's hyperparameter dataclass: the optimiser settings all share."""

    lr: float = 1e-3
    weight_decay: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work; subclasses extend this."""
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Turn a command-line string into the declared field type (int, float, bool, str, Literal)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, float, str):
            return kind(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    return value


def make_config(cls: type[HParams], overrides: dict[str, Any], owner: str = "") -> HParams:
    """Build and validate a hyperparameter dataclass from string or typed overrides."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in overrides.items():
        if key not in known:
            where = f" for {owner}" if owner else ""
            raise ConfigError(
                f"unknown hyperparameter {key!r}{where}; known: {', '.join(sorted(known))}"
            )
        values[key] = _coerce(value, hints[key], key)
    config = cls(**values)
    config.validate()
    return config


class Method:
    """Base class of every training rule. Subclass it in one module under `methods/`.

    Subclasses set the declarative attributes below, build their networks into `self.model`
    (one `nn.Module`; use `nn.ModuleDict` for several, so parameter counts and `state_dict`
    cover everything) and their optimisers into `self.optimizers`.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[HParams]] = HParams
    # Named sets of overrides of `Config`'s defaults. `default` is the dataclass itself;
    # `quick` is sized for the quick suite; `paper` holds a source paper's values where given.
    presets: ClassVar[dict[str, dict[str, Any]]] = {"default": {}}
    # What `bpfree tune` searches, declared next to the hyperparameters so each method's author
    # picks its knobs while every method gets the same number of trials. A value is
    # ("loguniform", low, high), ("uniform", low, high), ("randint", low, high) (high
    # exclusive) or ("choice", [values]). Override in a subclass, e.g.
    # `search_space = {**Method.search_space, "T": ("choice", [5, 10])}`.
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"lr": ("loguniform", 1e-4, 1e-2)}

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, task: Task, config: HParams) -> None:
        self.task = task
        self.config = config
        self.device = task.device
        self.optimizers = {}

    # --- what every method implements -------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One update on a minibatch; returns detached scalar diagnostics.

        Values stay tensors so the harness never forces a host-device sync per step; the key
        `loss` is the method's training objective and is what divergence is checked on.
        """
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Class scores of shape (batch, num_classes); the argmax is the prediction."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------
    @classmethod
    def config_for(cls, preset: str = "default", overrides: dict[str, Any] | None = None) -> HParams:
        """The hyperparameters of a named preset with user overrides on top.

        For `TUNED_PRESET` the overrides carry the tuned configuration itself (see above).
        """
        if preset == TUNED_PRESET:
            return make_config(cls.Config, dict(overrides or {}), cls.name)
        if preset not in cls.presets:
            raise ConfigError(
                f"unknown preset {preset!r} for {cls.name}; known: {', '.join(cls.presets)}, "
                f"or {TUNED_PRESET} (after `bpfree tune`)"
            )
        return make_config(cls.Config, {**cls.presets[preset], **(overrides or {})}, cls.name)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Optimisers keep some loaded tensors (Adam's `step`) by reference: copy, so that two
        # methods loaded from one state never share mutable state.
        state = copy.deepcopy(state)
        self.model.load_state_dict(state["model"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
