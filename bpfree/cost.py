"""What one training step costs: the `bpfree cost` verb.

`bpfree run` measures a method while it learns; this measures one step in isolation, on random
inputs of a dataset's shape, so that methods can be compared on any device without data
(CIFAR-shaped costs are measured here although CIFAR cannot be downloaded on our machines).
For each method and input shape it reports:

- wall-clock per step: one warm-up step (lazy optimiser state, kernel selection), then
  `repeats` timed steps, each between two device synchronisations; the median is reported
  and the spread kept, because a shared machine's outliers are slow, never fast;
- images/s, FLOPs per step (`torch.utils.flop_counter`, deterministic), the achieved FLOP/s,
  and that as a fraction of the device's float32 matrix-multiply rate measured in the same
  process under the same precision settings (`mm_fraction`, nanoGPT's MFU with a measured
  rather than a datasheet peak, so that it means the same on a laptop and on a GPU);
- bytes held for backward (peak at once and total) and the step's peak memory, from the
  harness's `measure_costs`, so the figures match what `bpfree run` records.

The numbers are only as quiet as the machine: run it alone, and read `torch_threads` and the
device next to them (both are in the output).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor

from bpfree.harness import measure_costs
from bpfree.measure import synchronize
from bpfree.methods import Method, Task, get_method
from bpfree.methods.base import GRAPH_WARMUP

# Input shape and number of classes of the datasets whose cost we compare.
SHAPES = {"mnist": ((1, 28, 28), 10), "cifar": ((3, 32, 32), 100)}


def build_method(
    name: str, shape: str, device: torch.device | str, batch: int, preset: str = "quick",
    overrides: dict | None = None,
) -> tuple[Method, Tensor, Tensor]:
    """A method seeded with 0 and one random batch of the given shape on `device`."""
    input_shape, num_classes = SHAPES[shape]
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(batch, *input_shape, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    cls = get_method(name)
    task = Task(input_shape, num_classes, dev, seed=0, train_sample=(x, y))
    return cls(task, cls.config_for(preset, overrides)), x, y


def matmul_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matrix product on `device`, best of `repeats` after a warm-up,
    under torch's current precision settings (TF32 is off for matmul by default)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def warm_up(method: Method, x: Tensor, y: Tensor, device: torch.device) -> None:
    """Steps until `method.step` runs as it will from then on: one for lazy optimiser state
    and kernel selection, and in graph mode the eager steps and the recording before replay."""
    method.train()
    for _ in range(GRAPH_WARMUP + 2 if method.step_mode == "graph" else 1):
        method.step(x, y)
    synchronize(device)


def step_seconds(method: Method, x: Tensor, y: Tensor, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` training steps (`method.step`, so in the method's step
    mode) after warming up. (Not named `time_*`: asv would collect such a function.)"""
    warm_up(method, x, y, device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        method.step(x, y)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def harness_overhead(method: Method, x: Tensor, y: Tensor, device: torch.device, steps: int,
                     rounds: int = 3) -> tuple[float, float]:
    """(images/s of the harness's epoch loop, images/s of a bare loop of the same steps).

    Both run `steps` steps of `method.step` on the same batches, already on the device: the
    bare loop on pre-cut batches with nothing else, the harness's `train_epoch` on index
    batches into the data, summing diagnostics as in a run. Rounds alternate the two, and
    each keeps its best round, so that a noisy machine slows both alike.
    """
    from bpfree.harness import train_epoch

    n = len(x)
    data_x = x.repeat(steps, *([1] * (x.dim() - 1)))
    data_y = y.repeat(steps)
    order = list(torch.arange(n * steps, device=device).split(n))
    cut = [(data_x[i], data_y[i]) for i in order]
    warm_up(method, x, y, device)
    bare, harness = float("inf"), float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for bx, by in cut:
            method.step(bx, by)
        synchronize(device)
        bare = min(bare, time.perf_counter() - start)
        harness = min(harness, train_epoch(method, data_x, data_y, order)[1])
    return n * steps / harness, n * steps / bare


def step_costs(
    names: list[str], shapes: list[str], device: torch.device, batch: int = 128,
    preset: str = "quick", overrides: dict[str, dict] | None = None, repeats: int = 10,
    overhead_steps: int = 0, progress: Callable[[str], None] | None = None,
    on_row: Callable[[pd.DataFrame], None] | None = None,
) -> pd.DataFrame:
    """One row per (method, shape): time, throughput, FLOPs, bytes and memory of a step, and
    with `overhead_steps` the harness's images/s against a bare loop of that many steps.
    `on_row` gets the rows so far after each one, so that a caller can save them as they come
    (a measurement stopped at a time limit keeps what it measured)."""
    mm_rate = matmul_flops_per_s(device, n=8192 if device.type == "cuda" else 2048)
    rows = []
    for shape in shapes:
        for name in names:
            if progress:
                progress(f"{name} on {shape}")
            method, x, y = build_method(name, shape, device, batch, preset, (overrides or {}).get(name))
            costs = measure_costs(method, x, y, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = step_seconds(method, x, y, device, repeats)
            run_peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                        else float("nan"))
            median = statistics.median(seconds)
            extra = {}
            if overhead_steps:
                harness_rate, bare_rate = harness_overhead(method, x, y, device, overhead_steps)
                extra = {"harness_img_s": harness_rate, "bare_img_s": bare_rate,
                         "harness_overhead": bare_rate / harness_rate - 1}
            rows.append({
                "method": name, "input": shape, "batch": batch, "preset": preset,
                "step_mode": method.step_mode,
                "ms_step": 1e3 * median, "ms_step_min": 1e3 * min(seconds),
                "ms_step_max": 1e3 * max(seconds), "repeats": repeats,
                "img_s": batch / median,
                "gflop_step": costs["flops_train_step"] / 1e9,
                "gflop_s": costs["flops_train_step"] / median / 1e9,
                "mm_fraction": costs["flops_train_step"] / median / mm_rate,
                "mm_gflop_s": mm_rate / 1e9,
                "act_peak_mib": costs["act_bytes_peak"] / 2**20,
                "act_total_mib": costs["act_bytes_total"] / 2**20,
                "peak_mem_mib": costs["peak_mem_bytes"] / 2**20,
                "peak_mem_kind": costs["peak_mem_kind"],
                "run_peak_mem_mib": run_peak / 2**20,
                "params": costs["params"],
                **extra,
            })
            if on_row:
                on_row(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """The table a note or a doc quotes."""
    overhead = "harness_overhead" in frame
    header = ("| input | method | step | ms / step (min-max) | images / s | GFLOP / step | GFLOP/s "
              "| of matmul rate | held for backward, peak (total) MiB | step peak MiB |"
              + (" harness overhead |" if overhead else ""))
    lines = [header, "| --- | --- | --- |" + " ---: |" * (7 + overhead)]
    for r in frame.itertuples():
        lines.append(
            f"| {r.input} | `{r.method}` | {r.step_mode} "
            f"| {r.ms_step:.1f} ({r.ms_step_min:.1f}-{r.ms_step_max:.1f}) "
            f"| {r.img_s:.0f} | {r.gflop_step:.2f} | {r.gflop_s:.0f} | {r.mm_fraction:.0%} "
            f"| {r.act_peak_mib:.1f} ({r.act_total_mib:.1f}) | {r.peak_mem_mib:.1f} |"
            + (f" {r.harness_overhead:+.1%} |" if overhead else "")
        )
    return "\n".join(lines)
