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
import math
import typing
from collections.abc import Iterator
from contextlib import contextmanager
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

    `steps_per_epoch` is how many `train_step` calls make one epoch (the harness sets it to
    ceil(training examples / batch size)), for methods whose schedules are given in epochs;
    None when the caller does not know, and such a method then falls back to a default it
    documents.
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


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """The angle between two tensors read as flat vectors, in degrees: 0 when they point the
    same way, 90 when orthogonal, 180 when opposite; NaN when either is zero.

    Computed in float64 as 2 atan2(|u - v|, |u + v|) of the unit vectors u, v, which (unlike
    acos of the cosine) is exact near 0 and 180 degrees: a gradient against itself gives 0.
    """
    u, v = a.detach().flatten().double(), b.detach().flatten().double()
    if u.shape != v.shape:
        raise ValueError(f"angle between tensors of {u.numel()} and {v.numel()} elements")
    nu, nv = u.norm(), v.norm()
    if nu == 0 or nv == 0:
        return float("nan")
    u, v = u / nu, v / nv
    return math.degrees(2 * math.atan2(float((u - v).norm()), float((u + v).norm())))


def layer_angles(estimate: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """`angle_degrees` per layer between two gradients keyed by parameter name.

    A layer is one module: the parameters whose names share everything before the last dot
    (`layers.0.weight` and `layers.0.bias` form `layers.0`) are concatenated into one vector.
    """
    groups: dict[str, list[str]] = {}
    for name in reference:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return {
        layer: angle_degrees(
            torch.cat([estimate[n].flatten() for n in names]),
            torch.cat([reference[n].flatten() for n in names]),
        )
        for layer, names in groups.items()
    }


@contextmanager
def diagnostic_mode(module: nn.Module) -> Iterator[None]:
    """Train mode with dropout off, every buffer restored on exit: where `diagnostics` runs.

    Training mode, because the gradient to compare is the one training computes (BatchNorm on
    batch statistics); dropout off, so that the method's estimate and the reference gradient
    are derivatives of one deterministic function; buffers (BatchNorm running statistics)
    restored, so that the forward passes of a diagnostic change nothing.
    """
    modes = [(m, m.training) for m in module.modules()]
    saved = {name: b.clone() for name, b in module.named_buffers()}
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


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

    # --- what a method may implement -----------------------------------------------------
    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Measurements of *how* the method learns, on one batch; none by default.

        The harness calls this once per epoch, after evaluation and outside the timed region,
        on one fixed training batch (the same every epoch of a unit), and records each value
        as a column `diag_<key>` of that epoch's row. It must not change the method's state
        (parameters, buffers, optimiser state, `.grad`), so that a run with diagnostics learns
        exactly what one without them does; it may draw from the global RNG, which the harness
        restores afterwards. Values are plain floats (a host sync here is not timed).

        Conventions the report reads: `angle_update/<layer>` is the angle in degrees
        (`angle_degrees`) between the update direction the method would apply to a layer (its
        gradient estimate, before the optimiser) and the true backprop gradient of the loss it
        is compared against, on this batch.
        """
        return {}

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
