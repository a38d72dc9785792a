"""asv benchmarks of every method (see docs/benchmarking.md).

asv imports this suite from the working tree and bpfree from the commit under test, so the
same measuring code runs against each commit's methods. Two rules keep the history true:

- The parameters are the fixed list `METHODS` below, not the registry of the commit under
  test: asv discovers parameters once and addresses them by index, so a list that changed
  between commits would file one method's numbers under another's name. A test keeps the
  list equal to today's registry; a method that a commit does not have is skipped (n/a).
- Only the methods' own interface is used (`Task`, `config_for`, `train_step`, `predict`),
  which is the same at every commit: from before the `bpfree` package, when the methods were
  the top-level package `methods`, too. Measurements that need the application (the CI gate's
  budget) exist from the `bpfree` package on and are skipped before it.

- `TrainStep` / `Predict`: wall-clock of one training step / one prediction on a batch of
  `BATCH` random MNIST-shaped (1x28x28, 10 classes) or CIFAR-shaped (3x32x32, 100 classes)
  inputs, with the method's `quick` preset, on CPU and on CUDA when there is one.
- `TrainStepMemory`: peak RSS of the benchmark process around a training step on CPU
  (includes the interpreter and torch, about 0.5 GB, so read it across commits).
- `Counts`: parameters and FLOPs of one training step (FlopCounterMode): deterministic.
- `GateMetrics`: the `bpfree check` gate's test error after its small budget. asv treats every
  track_ value as lower-is-better, hence error, not accuracy.

`version` is set by hand on every class: asv's default (a hash of the source) would orphan the
history whenever this file is edited. It names what is measured, so it changes exactly when
the numbers stop being comparable (batch size, preset, the gate's budget).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

try:  # the bpfree package (from its first commit on)
    from bpfree.methods import Method, Task, all_methods
except ImportError:  # earlier commits installed the methods as a top-level package
    from methods import Method, Task, all_methods  # type: ignore[no-redef]

# Every method bpfree has had, in a fixed order (tests/test_benchmarks.py keeps it equal to the
# registry). Append new methods; never reorder or remove: positions are asv's keys.
METHODS = [
    "backprop", "backprop-blocks", "ddtp-linear", "dtp", "fg-a", "fg-w", "lg-fg-a", "noprop-ct",
    "noprop-dt", "noprop-fm", "brsf", "dfa", "fa", "frsf", "usf", "ff", "pepita",
]
# Input shape and number of classes of the datasets whose cost is compared.
SHAPES = {"mnist": ((1, 28, 28), 10), "cifar": ((3, 32, 32), 100)}
# device_count() asks NVML, which unlike is_available() leaves CUDA uninitialised in the
# forkserver parent, so that forked benchmark processes can still use CUDA.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.device_count() > 0 else [])]
BATCH = 128  # the harness's default batch size
PRESET = "quick"


def build_method(
    name: str, shape: str, device: str, batch: int = BATCH
) -> tuple[Method, Tensor, Tensor]:
    """A method seeded with 0, its `quick` preset, and one random batch of the given shape.
    A commit older than the method has no such method: asv records the NotImplementedError
    raised from setup as skipped (n/a), not as a failure."""
    methods = all_methods()
    if name not in methods:
        raise NotImplementedError(f"{name} is not registered at this commit")
    input_shape, num_classes = SHAPES[shape]
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(batch, *input_shape, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    cls = methods[name]
    task = Task(input_shape, num_classes, dev, seed=0, train_sample=(x, y))
    return cls(task, cls.config_for(PRESET)), x, y


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TrainStep:
    """One `train_step` on a batch, after one warm-up step (lazy optimiser state, kernels)."""

    params = (METHODS, list(SHAPES), DEVICES)
    param_names = ("method", "input", "device")
    version = f"train_step batch={BATCH} preset={PRESET}"
    timeout = 300
    number = 1  # one step is far above the timer's resolution
    repeat = (1, 5, 10.0)  # per round (asv runs 2): at most 5 samples or 10 s, so ~20 s each

    def setup(self, name: str, shape: str, device: str) -> None:
        self.method, self.x, self.y = build_method(name, shape, device)
        self.method.train()
        self.method.train_step(self.x, self.y)
        synchronize(device)

    def time_train_step(self, name: str, shape: str, device: str) -> None:
        self.method.train_step(self.x, self.y)
        synchronize(device)


class TrainStepMemory:
    """Peak RSS of a process that built a method and ran two training steps on MNIST-shaped
    input on CPU. RSS says nothing about GPU memory, and one shape is enough to see a method's
    footprint move across commits; `bpfree run` records per-device peaks (peak_mem_bytes)."""

    params = (METHODS,)
    param_names = ("method",)
    version = f"peakmem train_step mnist cpu batch={BATCH} preset={PRESET}"
    timeout = 300

    def setup(self, name: str) -> None:
        self.method, self.x, self.y = build_method(name, "mnist", "cpu")
        self.method.train()
        self.method.train_step(self.x, self.y)

    def peakmem_train_step(self, name: str) -> None:
        self.method.train_step(self.x, self.y)


class Predict:
    """One `predict` on a batch in eval mode, after one warm-up call."""

    params = (METHODS, list(SHAPES), DEVICES)
    param_names = ("method", "input", "device")
    version = f"predict batch={BATCH} preset={PRESET}"
    timeout = 300
    number = 1
    repeat = (1, 5, 10.0)

    def setup(self, name: str, shape: str, device: str) -> None:
        self.method, self.x, _ = build_method(name, shape, device)
        self.method.eval()
        self.method.predict(self.x)
        synchronize(device)

    def time_predict(self, name: str, shape: str, device: str) -> None:
        self.method.predict(self.x)
        synchronize(device)


class Counts:
    """Parameters and FLOPs of one training step on an MNIST-shaped batch on CPU: counts, so
    they move only when a method's network or update rule changes."""

    params = (METHODS,)
    param_names = ("method",)
    version = f"counts mnist cpu batch={BATCH} preset={PRESET}"
    timeout = 300

    def setup(self, name: str) -> None:
        self.method, self.x, self.y = build_method(name, "mnist", "cpu")
        self.method.train()

    def track_params(self, name: str) -> float:
        return float(sum(p.numel() for p in self.method.model.parameters()))

    track_params.unit = "parameters"

    def track_flops_train_step(self, name: str) -> float:
        with FlopCounterMode(display=False) as counter:
            self.method.train_step(self.x, self.y)
        return float(counter.get_total_flops())

    track_flops_train_step.unit = "FLOPs"


class GateMetrics:
    """The CI gate's test error per method after its small budget, measured once per commit
    (`setup_cache`) by `bpfree check`'s own code, so asv's history and the gate agree."""

    params = (METHODS,)
    param_names = ("method",)
    version = "gate test_error mnist-5k 512 images batch 64 quick seed 0"
    timeout = 1200  # setup_cache trains every method on the gate's budget

    def setup_cache(self) -> dict[str, dict[str, Any]]:
        try:
            from bpfree.check import measure_all
        except ImportError:  # before the bpfree package: no gate to ask
            return {}
        return measure_all().set_index("method").to_dict("index")

    def setup(self, cache: dict[str, dict[str, Any]], name: str) -> None:
        if name not in cache:
            raise NotImplementedError(f"no gate measurement of {name} at this commit")
        if cache[name]["error"]:
            raise RuntimeError(f"{name} failed the gate's measurement: {cache[name]['error']}")

    def track_test_error(self, cache: dict[str, dict[str, Any]], name: str) -> float:
        return float(cache[name]["test_error"])

    track_test_error.unit = "error"
