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
import inspect
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .nets import network_id


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


StepMode = Literal["auto", "eager", "graph"]


@dataclass
class HParams:
    """Base of every method's hyperparameter dataclass: the optimiser settings all share, and
    how a training step is executed (`step`, which changes speed, not what is computed)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    # eager: run `train_step` as Python; graph: record it once as a CUDA graph and replay it
    # (no per-kernel host cost); auto: graph on CUDA for methods that can be captured, else eager.
    step: StepMode = "auto"

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work; subclasses extend this."""
        if not self.lr > 0 or self.lr == float("inf"):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Turn a command-line string into the declared field type (int, float, bool, str, Literal)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        if value.lower() in ("none", "null", ""):
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
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
    # Whether `predict` draws random numbers (NoProp's chains start from noise): its accuracy
    # is then a random variable, and the harness averages `--inference-runs` passes.
    samples_at_inference: ClassVar[bool] = False
    # How the method interleaves its losses, where papers distinguish schedules that bpfree's
    # implementation fixes (target propagation: `parallel`, forward and feedback losses on
    # every batch, against `alternating` epochs). "" when there is nothing to choose. Recorded
    # with every unit, so that a published number is compared only with the same schedule.
    schedule: ClassVar[str] = ""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, task: Task, config: HParams) -> None:
        self.task = task
        self.config = config
        self.device = task.device
        self.optimizers = {}
        self.step_mode = self._resolve_step_mode()
        self._graphs: dict[tuple, CapturedStep] = {}
        self._warm: dict[tuple, int] = {}

    # --- how a step is executed -------------------------------------------------------------
    def capturable(self) -> bool:
        """Whether `train_step` can be recorded once as a CUDA graph and replayed: it must
        launch the same kernels every step, change no host-side state, never read a device
        value on the host, and build its optimisers with `make_optimizer`. Methods that meet
        this say so by overriding; the default is the safe answer."""
        return False

    def _resolve_step_mode(self) -> str:
        mode = getattr(self.config, "step", "eager")
        cuda = self.device.type == "cuda"
        if mode == "auto":
            return "graph" if cuda and self.capturable() else "eager"
        if mode == "graph" and not cuda:
            raise ConfigError("step=graph records a CUDA graph and needs --device cuda; "
                              "use step=eager (or auto) on the CPU")
        if mode == "graph" and not self.capturable():
            raise ConfigError(f"step=graph: {self.name} with these settings cannot be captured "
                              "as a CUDA graph (see its docs); use step=eager or auto")
        return mode

    def make_optimizer(self, cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any
                       ) -> torch.optim.Optimizer:
        """`cls(params, **kwargs)`, with the fused CUDA kernel on a GPU (one launch for all
        parameters) and, in graph mode, its step counters on the device (`capturable`), so
        that the update can be replayed inside a CUDA graph. On the CPU nothing is added,
        which keeps CPU results bit-identical to the plain optimiser."""
        accepts = inspect.signature(cls).parameters
        if self.device.type == "cuda":
            if "fused" in accepts:
                kwargs.setdefault("fused", True)
            if self.step_mode == "graph" and "capturable" in accepts:
                kwargs.setdefault("capturable", True)
        return cls(params, **kwargs)

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One training step, executed as `step_mode` says; what the harness calls.

        In graph mode the first `GRAPH_WARMUP` steps of each input shape run eagerly on a side
        stream (CUDA's rule before capture; they are real training steps), the next one is
        recorded and every later one replays the recording on static copies of the inputs.
        The returned tensors are then the graph's static outputs: read them before the next
        step, as the harness does.
        """
        if self.step_mode != "graph":
            return self.train_step(x, y)
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        graph = self._graphs.get(key)
        if graph is None:
            if self._warm.get(key, 0) < GRAPH_WARMUP:
                self._warm[key] = self._warm.get(key, 0) + 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = self.train_step(x, y)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            graph = self._graphs[key] = CapturedStep(self, x, y)
        return graph(x, y)

    def drop_graphs(self) -> None:
        """Forget recorded steps (after new tensors replaced the ones they were recorded on)."""
        self._graphs.clear()
        self._warm.clear()

    def __deepcopy__(self, memo: dict) -> Method:
        """Copies (warm-up, cost measurement) share nothing with the original, recorded CUDA
        graphs included: a copy records its own."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for key, value in vars(self).items():
            if key in ("_graphs", "_warm"):
                setattr(clone, key, {})
            else:
                setattr(clone, key, copy.deepcopy(value, memo))
        return clone

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

    # --- what the method trains ---------------------------------------------------------
    @classmethod
    def network_of(cls, config: HParams) -> str:
        """A stable id of the network this configuration trains: its architecture and size,
        e.g. `cnn`, `mlp-2x256-relu`, `noprop-dt-T10-one-hot` (`methods.nets.network_id`).

        Two units with the same id train the same network, so their accuracy and cost compare
        like with like; the report compares every method with a backprop run of the same id
        (its *backprop twin*). The id names the network that makes the predictions; parts that
        only the learning rule needs (auxiliary heads, feedback weights, label embeddings)
        are not in it (the parameter count still counts them). The default reads the shared
        nets' `arch`, `width`, `depth` and, when the config has one, `bias`; a method with
        another network overrides this.
        """
        if not hasattr(config, "arch"):
            raise NotImplementedError(f"{cls.name} has no `arch`: it must define network_of")
        return network_id(config.arch, getattr(config, "width", 256), getattr(config, "depth", 2),
                          getattr(config, "bias", True))

    @property
    def network(self) -> str:
        """`network_of` this method's own configuration."""
        return type(self).network_of(self.config)

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
        self.drop_graphs()  # the optimisers now hold new state tensors


# Eager steps per input shape before a step is recorded as a CUDA graph.
GRAPH_WARMUP = 2


class CapturedStep:
    """One `train_step` recorded as a CUDA graph on static input buffers.

    Recording launches nothing, so the first call records and then replays: every call
    performs exactly one training step. The method's parameters, buffers, gradients and
    optimiser state are used in place, so they keep learning across replays; random numbers
    come from CUDA's graph-safe generator, which advances its offset on every replay.
    """

    def __init__(self, method: Method, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()
        self.graph = torch.cuda.CUDAGraph()
        for opt in method.optimizers.values():
            opt.zero_grad(set_to_none=True)  # gradients are allocated in the graph's pool
        with torch.cuda.graph(self.graph):
            self.out = method.train_step(self.x, self.y)

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.out
