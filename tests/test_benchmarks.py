"""pytest-benchmark benchmarks of every registered method, and the asv suite's shape.

Under the suite's `--benchmark-disable` (pyproject's addopts) each benchmark runs its target
once as a plain test, so the benchmarks cannot rot; `--benchmark-enable` times them (pedantic
mode: warm-up rounds, then timed rounds). Batches are smaller than asv's so the suite stays
fast; the workflow is in docs/benchmarking.md.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import bpfree.methods
import pytest
import torch
from asv_runner.discovery import disc_benchmarks

from benchmarks import bench_methods
from benchmarks.bench_methods import SHAPES, build_method
from bpfree.harness import measure_costs
from tests.conftest import METHODS

BATCH = 32
ROUNDS, WARMUP_ROUNDS = 5, 1
CPU = torch.device("cpu")


@functools.cache
def costs(name: str) -> dict[str, Any]:
    """FLOPs, bytes held for backward and peak memory of one step (deterministic on CPU)."""
    method, x, y = build_method(name, "mnist", "cpu", batch=BATCH)
    return measure_costs(method, x, y, CPU)


@pytest.mark.parametrize("name", METHODS)
def test_train_step(benchmark, name):
    method, x, y = build_method(name, "mnist", "cpu", batch=BATCH)
    method.train()
    info = costs(name)
    benchmark.extra_info.update(
        {k: info[k] for k in ("params", "flops_train_step", "act_bytes_peak", "act_bytes_total",
                              "peak_mem_bytes", "peak_mem_kind")}, batch=BATCH)
    out = benchmark.pedantic(method.train_step, args=(x, y), rounds=ROUNDS,
                             warmup_rounds=WARMUP_ROUNDS)
    assert torch.isfinite(out["loss"])
    assert info["flops_train_step"] > 0
    # Forward-gradient methods and PEPITA never build a reverse-mode graph: nothing is held
    # for backward (Forward-Forward builds one, a layer at a time).
    no_graph = method.family == "forward-gradient" or method.name == "pepita"
    assert (info["act_bytes_peak"] == 0) == no_graph
    assert info["peak_mem_bytes"] > info["act_bytes_peak"]


@pytest.mark.parametrize("name", METHODS)
def test_predict(benchmark, name):
    method, x, _ = build_method(name, "mnist", "cpu", batch=BATCH)
    method.eval()
    info = costs(name)
    benchmark.extra_info.update(
        {k: info[k] for k in ("params", "flops_predict", "act_bytes_peak", "peak_mem_bytes",
                              "peak_mem_kind")}, batch=BATCH)
    scores = benchmark.pedantic(method.predict, args=(x,), rounds=ROUNDS,
                                warmup_rounds=WARMUP_ROUNDS)
    assert scores.shape == (BATCH, SHAPES["mnist"][1]) and torch.isfinite(scores).all()
    assert info["flops_predict"] > 0


def test_asv_finds_every_method_and_nothing_else():
    """asv treats any time_/mem_/peakmem_/track_ function under benchmarks/ as a benchmark:
    only bench_methods may define them, and each covers the committed method list."""
    found = {b.name: b for b in disc_benchmarks(str(Path(__file__).parents[1] / "benchmarks"))}
    assert set(found) == {
        "bench_methods.TrainStep.time_train_step",
        "bench_methods.TrainStepMemory.peakmem_train_step",
        "bench_methods.Predict.time_predict",
        "bench_methods.Counts.track_params",
        "bench_methods.Counts.track_flops_train_step",
        "bench_methods.GateMetrics.track_test_error",
    }
    for bench in found.values():
        assert list(bench.params[0]) == [repr(m) for m in bench_methods.METHODS]
        assert bench.version is not None  # set by hand, so edits keep the history
        if bench.name.split(".")[-1].startswith("track_"):
            assert bench.unit not in (None, "unit")


def test_asv_method_list_is_fixed_and_covers_the_registry():
    """asv addresses parameters by position: the committed list must hold every registered
    method, each once, so no commit's numbers land under another method's name."""
    assert len(set(bench_methods.METHODS)) == len(bench_methods.METHODS)
    assert set(bench_methods.METHODS) == set(METHODS)


def test_a_method_missing_at_a_commit_is_skipped_not_mislabelled(monkeypatch):
    """At a commit without a method, setup raises NotImplementedError: asv's n/a."""
    registry = {k: v for k, v in bpfree.methods.all_methods().items() if k != "pepita"}
    monkeypatch.setattr(bench_methods, "all_methods", lambda: registry)
    with pytest.raises(NotImplementedError, match="pepita is not registered"):
        bench_methods.Counts().setup("pepita")
    bench = bench_methods.Counts()
    bench.setup("backprop")
    expected = sum(p.numel() for p in build_method("backprop", "mnist", "cpu")[0].model.parameters())
    assert bench.track_params("backprop") == expected
