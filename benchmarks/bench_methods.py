"""asv benchmarks of every registered method (see docs/benchmarking.md).

asv imports this package from the working tree and the project (`methods`) from the commit
under test, so the same measuring code runs against each commit's methods. Parameters come
from the registry: a new method is benchmarked as soon as it is registered.

- `TrainStep` / `Predict`: wall-clock of one training step / one prediction on a batch of
  `BATCH` random MNIST-shaped (1x28x28, 10 classes) or CIFAR-shaped (3x32x32, 100 classes)
  inputs, with the method's `quick` preset, on CPU and on CUDA when there is one.
- `TrainStepMemory`: peak RSS of the benchmark process around a training step on CPU
  (includes the interpreter and torch, about 0.5 GB, so read it across commits).
- `GateMetrics`: the `bpfree check` gate's deterministic metrics (FLOPs per step, bytes held
  for backward, test error after the gate's small `quick`-preset budget on mnist-5k, seed 0),
  tracked over commits. asv treats every track_ value as lower-is-better, hence error, not
  accuracy.

`version` is set by hand on every class: asv's default (a hash of the source) would orphan the
history whenever this file is edited. It names what is measured, so it changes exactly when
the numbers stop being comparable (batch size, preset, the gate's budget).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from benchmarks.check import BUDGET, measure_all
from benchmarks.measure import synchronize
from benchmarks.step_cost import SHAPES
from benchmarks.step_cost import build_method as build_step_method
from methods import Method, all_methods

METHODS = list(all_methods())
# device_count() asks NVML, which unlike is_available() leaves CUDA uninitialised in the
# forkserver parent, so that forked benchmark processes can still use CUDA.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.device_count() > 0 else [])]
BATCH = 128  # the harness's default batch size
PRESET = "quick"


def skip_if_unregistered(name: str) -> None:
    """A commit older than a method has no such method: asv records NotImplementedError from
    setup as "skipped" (n/a) rather than as a failure."""
    if name not in all_methods():
        raise NotImplementedError(f"{name} is not registered at this commit")


def build_method(
    name: str, shape: str, device: str, batch: int = BATCH
) -> tuple[Method, Tensor, Tensor]:
    """A seeded method with its `quick` preset, and one random batch of the given shape."""
    skip_if_unregistered(name)
    return build_step_method(name, shape, device, batch, PRESET)


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
        self.device = torch.device(device)
        self.method.train()
        self.method.train_step(self.x, self.y)
        synchronize(self.device)

    def time_train_step(self, name: str, shape: str, device: str) -> None:
        self.method.train_step(self.x, self.y)
        synchronize(self.device)


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
        self.device = torch.device(device)
        self.method.eval()
        self.method.predict(self.x)
        synchronize(self.device)

    def time_predict(self, name: str, shape: str, device: str) -> None:
        self.method.predict(self.x)
        synchronize(self.device)


class GateMetrics:
    """The CI gate's metrics per method, measured once per commit (`setup_cache`) and read by
    each track_ benchmark, so asv's history and `bpfree check` report the same numbers."""

    params = (METHODS,)
    param_names = ("method",)
    version = f"gate {sorted(asdict(BUDGET).items())}"
    timeout = 900  # setup_cache trains every method on the gate's budget

    def setup_cache(self) -> dict[str, dict[str, Any]]:
        return measure_all().set_index("method").to_dict("index")

    def setup(self, cache: dict[str, dict[str, Any]], name: str) -> None:
        skip_if_unregistered(name)
        if cache[name]["error"]:
            raise RuntimeError(f"{name} failed the gate's measurement: {cache[name]['error']}")

    def track_flops_train_step(self, cache: dict[str, dict[str, Any]], name: str) -> float:
        return float(cache[name]["flops_train_step"])

    track_flops_train_step.unit = "FLOPs"

    def track_activation_bytes(self, cache: dict[str, dict[str, Any]], name: str) -> float:
        return float(cache[name]["act_bytes_peak"])

    track_activation_bytes.unit = "bytes"

    def track_test_error(self, cache: dict[str, dict[str, Any]], name: str) -> float:
        return float(cache[name]["test_error"])

    track_test_error.unit = "error"
