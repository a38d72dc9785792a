"""Runs one method on one dataset with one seed, and measures it.

The harness knows nothing about how a method learns: it calls `train_step` on minibatches,
`predict` on held-out data, and measures cost around those calls. Every method gets the same
data order, epochs, batch size and evaluation, which is what makes the comparison fair.

Timing rules (written down because they decide what the numbers mean):
- warm-up steps run on a *copy* of the method and the RNG state is restored afterwards, so
  warm-up affects neither the timing nor what is learned;
- the device is synchronised before every clock read;
- evaluation is outside the timed region; `epoch_time_s` is training only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks import measure
from benchmarks.data import DATASETS, Dataset
from benchmarks.records import (
    SCHEMA_VERSION,
    load_checkpoint,
    save_checkpoint,
    unit_is_done,
    write_csv,
    write_json,
)
from methods import HParams, Method, Task, get_method

TRAIN_SAMPLE = 2000  # training examples shown to data-dependent initialisers
TRAIN_EVAL = 10000  # training examples on which train accuracy is measured each epoch


@dataclass(frozen=True)
class Unit:
    """One cell of a comparison: a method with its hyperparameters, a dataset and a seed."""

    method: str
    dataset: str
    seed: int
    preset: str = "default"
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        """A folder name that is stable across runs, so re-running resumes the same unit."""
        base = f"{self.method}__{self.dataset}__{self.preset}__s{self.seed}"
        if not self.overrides:
            return base
        digest = hashlib.sha1(json.dumps(self.overrides, default=str).encode()).hexdigest()
        return f"{base}__{digest[:8]}"

    def config(self) -> HParams:
        return get_method(self.method).config_for(self.preset, dict(self.overrides))


@dataclass(frozen=True)
class Budget:
    """What every unit of a run gets, identically."""

    epochs: int = 1
    batch_size: int = 128
    device: str = "cpu"
    warmup_steps: int = 2
    eval_batch_size: int = 1000
    target_accuracy: float | None = None  # None: the dataset's default target


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from methods import ConfigError

        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (warm-up, cost measurement) without disturbing the training RNG stream."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The shuffled minibatch indices of one epoch: a function of (seed, epoch) only, so a
    resumed run sees exactly the batches the uninterrupted one would have."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


@torch.no_grad()
def accuracy(method: Method, x: Tensor, y: Tensor, batch_size: int) -> float:
    method.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, len(x), batch_size):
        scores = method.predict(x[start : start + batch_size])
        correct += (scores.argmax(1) == y[start : start + batch_size]).sum()
    return correct.item() / max(len(x), 1)


def measure_costs(method: Method, x: Tensor, y: Tensor, device: torch.device) -> dict[str, Any]:
    """FLOPs, activation bytes and peak memory of one training step and one prediction, each
    on a fresh copy of the method so the real one is untouched."""
    params = list(method.model.parameters())
    with preserved_rng(device):
        flops_train = measure.count_flops(lambda: copy.deepcopy(method).train_step(x, y))
        m = copy.deepcopy(method)
        m.train()
        act_peak, act_total = measure.saved_tensor_bytes(
            lambda: m.train_step(x, y), exclude=list(m.model.parameters())
        )
        m = copy.deepcopy(method)
        m.train()
        m.train_step(x, y)  # optimiser state exists from the first step on: count it
        persistent = [*m.model.parameters(), *m.model.buffers()]
        persistent += [t for opt in m.optimizers.values() for s in opt.state.values()
                       for t in s.values() if isinstance(t, Tensor)]
        peak = measure.peak_step_memory(lambda: m.train_step(x, y), device, persistent)
        m.eval()
        flops_predict = measure.count_flops(lambda: m.predict(x))
    return {
        "params": sum(p.numel() for p in params),
        "flops_train_step": flops_train,
        "flops_predict": flops_predict,
        "act_bytes_peak": act_peak,
        "act_bytes_total": act_total,
        "peak_mem_bytes": peak.bytes,
        "peak_mem_kind": peak.kind,
    }


def is_finite(value: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(value)).all())


@dataclass
class UnitResult:
    records: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def run_unit(
    unit: Unit, data: Dataset, budget: Budget, unit_dir: Path, progress: bool = False
) -> UnitResult:
    """Train and measure one unit, resuming from its checkpoint if one exists."""
    device = resolve_device(budget.device)
    cls = get_method(unit.method)
    config = unit.config()
    info = DATASETS.get(data.name)
    target = budget.target_accuracy or (info.target_accuracy if info else None)
    identity = {
        "schema": SCHEMA_VERSION,
        "unit": unit.id,
        "method": unit.method,
        "family": cls.family,
        "dataset": data.name,
        "seed": unit.seed,
        "preset": unit.preset,
        "config": json.dumps(asdict(config), sort_keys=True),
        "epochs": budget.epochs,
        "batch_size": budget.batch_size,
        "device": str(device),
    }
    (unit_dir / "failed.json").unlink(missing_ok=True)  # a re-run retries a failed unit
    write_json(unit_dir / "unit.json", identity)

    torch.manual_seed(unit.seed)
    gen = torch.Generator().manual_seed(unit.seed)
    sample_idx = torch.randperm(len(data.train_x), generator=gen)[:TRAIN_SAMPLE]
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    task = Task(
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        device=device,
        seed=unit.seed,
        train_sample=(train_x[sample_idx.to(device)], train_y[sample_idx.to(device)]),
        steps_per_epoch=math.ceil(len(train_x) / budget.batch_size),
    )
    method = cls(task, config)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    eval_idx = torch.randperm(len(train_x), generator=gen)[:TRAIN_EVAL].to(device)
    val = (data.val_x.to(device), data.val_y.to(device)) if data.val_x is not None else None

    first = batches(len(train_x), budget.batch_size, unit.seed, 0)[0].to(device)
    costs = measure_costs(method, train_x[first], train_y[first], device)
    with preserved_rng(device):
        warm = copy.deepcopy(method)
        warm.train()
        for _ in range(budget.warmup_steps):
            warm.train_step(train_x[first], train_y[first])
        measure.synchronize(device)
        del warm

    checkpoint = load_checkpoint(unit_dir / "checkpoint.pt")
    rows: list[dict[str, Any]] = []
    cum_time, images, status = 0.0, 0, "finished"
    if checkpoint is not None:
        method.load_state_dict(checkpoint["method"])
        rows, cum_time, images = checkpoint["rows"], checkpoint["cum_time"], checkpoint["images"]
        set_rng_state(checkpoint["rng"], device)

    epochs = tqdm(
        range(len(rows), budget.epochs), desc=unit.id, disable=not progress, leave=False,
        initial=len(rows), total=budget.epochs,
    )
    for epoch in epochs:
        method.train()
        sums: dict[str, Tensor] = {}
        order = batches(len(train_x), budget.batch_size, unit.seed, epoch + 1)
        measure.synchronize(device)
        start = time.perf_counter()
        for idx in tqdm(order, desc="batches", disable=not progress, leave=False):
            idx = idx.to(device)
            for key, value in method.train_step(train_x[idx], train_y[idx]).items():
                sums[key] = sums[key] + value if key in sums else value.detach().clone()
        measure.synchronize(device)
        seconds = time.perf_counter() - start
        cum_time += seconds
        images += len(train_x)
        diagnostics = {f"train_{k}": (v / len(order)).item() for k, v in sums.items()}
        if not all(math.isfinite(v) for v in diagnostics.values()):
            status = "diverged"
        test_acc = accuracy(method, test_x, test_y, budget.eval_batch_size)
        rows.append(
            {
                "unit": unit.id,
                "method": unit.method,
                "dataset": data.name,
                "seed": unit.seed,
                "epoch": epoch + 1,
                "train_acc": accuracy(method, train_x[eval_idx], train_y[eval_idx], budget.eval_batch_size),
                "test_acc": test_acc,
                "val_acc": accuracy(method, *val, budget.eval_batch_size) if val else float("nan"),
                "epoch_time_s": seconds,
                "cum_time_s": cum_time,
                "cum_train_flops": costs["flops_train_step"] / budget.batch_size * images,
                **diagnostics,
            }
        )
        write_csv(unit_dir / "records.csv", pd.DataFrame(rows))
        if status == "diverged":
            break
        save_checkpoint(
            unit_dir / "checkpoint.pt",
            {"method": method.state_dict(), "rows": rows, "cum_time": cum_time,
             "images": images, "rng": rng_state(device)},
        )
        epochs.set_postfix(test_acc=f"{test_acc:.4f}")

    records = pd.DataFrame(rows)
    reached = records[records["test_acc"] >= target] if target and len(records) else records.iloc[:0]
    summary = {
        **identity,
        "status": status,
        "epochs_done": len(rows),
        "final_test_acc": rows[-1]["test_acc"] if rows else float("nan"),
        "best_test_acc": max(r["test_acc"] for r in rows) if rows else float("nan"),
        "final_train_acc": rows[-1]["train_acc"] if rows else float("nan"),
        "final_val_acc": rows[-1]["val_acc"] if rows else float("nan"),
        "train_time_s": cum_time,
        "time_per_epoch_s": cum_time / max(len(rows), 1),
        "throughput_img_s": images / cum_time if cum_time > 0 else float("nan"),
        "target_acc": target,
        "time_to_target_s": float(reached["cum_time_s"].iloc[0]) if len(reached) else float("nan"),
        **costs,
        "process_peak_rss_bytes": measure.process_peak_rss_bytes(),
    }
    write_json(unit_dir / "summary.json", summary)
    (unit_dir / "checkpoint.pt").unlink(missing_ok=True)
    return UnitResult(records, summary)


def run_units(
    units: list[Unit], data: dict[str, Dataset], budget: Budget, run_dir: Path,
    progress: bool = False,
) -> list[UnitResult]:
    """Run every unit not yet done; a unit that raises is recorded as failed and the rest go on."""
    from benchmarks.records import merge_run

    results = []
    for unit in tqdm(units, desc="units", disable=not progress):
        unit_dir = run_dir / "units" / unit.id
        if unit_is_done(unit_dir):
            continue
        try:
            results.append(run_unit(unit, data[unit.dataset], budget, unit_dir, progress))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a broken unit must not stop the sweep; record why
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            identity = {"unit": unit.id, "method": unit.method, "dataset": unit.dataset,
                        "seed": unit.seed, "preset": unit.preset}
            write_json(unit_dir / "failed.json",
                       {**identity, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        merge_run(run_dir)
    merge_run(run_dir)
    return results
