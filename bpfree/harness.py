"""Runs one method on one dataset with one seed, and measures it.

The harness knows nothing about how a method learns: it calls `train_step` on minibatches,
`predict` on held-out data, and measures cost around those calls. Every method gets the same
data order, epochs, batch size and evaluation, which is what makes the comparison fair.

Timing rules (written down because they decide what the numbers mean):
- warm-up steps run on a *copy* of the method and the RNG state is restored afterwards, so
  warm-up affects neither the timing nor what is learned;
- the device is synchronised before every clock read;
- evaluation is outside the timed region; `epoch_time_s` is training only;
- so are a method's `diagnostics` (after each epoch's evaluation, on one fixed training batch,
  with the RNG state restored afterwards; their cost is recorded as `diag_time_s`).
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

from bpfree import measure
from bpfree.checkpoints import load_checkpoint, save_checkpoint
from bpfree.data import DATASETS, Dataset, check_batch_size
from bpfree.methods import HParams, Method, Task, get_method
from bpfree.records import (
    COMPLETE,
    LOCK_NAME,
    SCHEMA_VERSION,
    LockHeld,
    RecordsError,
    Status,
    exclusive,
    read_json,
    read_unit,
    remove_stale_temporaries,
    unit_is_done,
    write_csv,
    write_json,
)

TRAIN_SAMPLE = 2000  # training examples shown to data-dependent initialisers
TRAIN_EVAL = 10000  # training examples on which train accuracy is measured each epoch
DIAG_BATCH = 256  # training examples of the fixed batch a method's diagnostics are computed on


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
    # Inference passes per evaluation for methods whose prediction samples (NoProp): the
    # NoProp paper reports the mean over 5. Their time is eval_time_s, never training time.
    inference_runs: int = 1
    keep_model: bool = False  # write the trained state to model.pt (for `bpfree evaluate`)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from bpfree.methods import ConfigError

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


def batches(n: int, batch_size: int, seed: int, epoch: int,
            device: torch.device | str = "cpu") -> list[Tensor]:
    """The shuffled minibatch indices of one epoch: a function of (seed, epoch) only, so a
    resumed run sees exactly the batches the uninterrupted one would have. The permutation is
    copied to `device` once, so the training loop indexes device memory with device indices
    (a host-to-device copy per step would synchronise with the device every step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).to(device).split(batch_size))


def train_epoch(method: Method, x: Tensor, y: Tensor, order: list[Tensor]
                ) -> tuple[dict[str, Tensor], float, float]:
    """One epoch of `method.step` over the minibatches `order`: the timed region.

    Returns the per-step mean of every diagnostic the method returns (still on the device),
    the seconds the epoch took between two device synchronisations, and the loss of its first
    step (read after the clock stops). Nothing in the loop waits for the device: diagnostics
    are summed as tensors.
    """
    device = x.device
    method.train()
    sums: dict[str, Tensor] = {}
    first: Tensor | None = None
    measure.synchronize(device)
    start = time.perf_counter()
    for idx in order:
        for key, value in method.step(x[idx], y[idx]).items():
            sums[key] = sums[key] + value if key in sums else value.detach().clone()
        if first is None:
            first = sums["loss"].clone()
    measure.synchronize(device)
    seconds = time.perf_counter() - start
    return {k: v / len(order) for k, v in sums.items()}, seconds, float(first)


# An epoch whose mean loss exceeds this many times the magnitude of the unit's very first
# step loss has diverged, even if every number is still finite (a loss of 1e22 is not a
# result). Large enough that no method that learns crosses it: a loss at initialisation is
# the largest a sane run sees.
DIVERGENCE_FACTOR = 1e3


def diverged(means: dict[str, Tensor], first_loss: float | None = None) -> bool:
    """Whether an epoch's mean diagnostics say training blew up: one of them is not finite,
    or the mean loss is above DIVERGENCE_FACTOR times the first step's (docs/records.md)."""
    if not all(is_finite(v) for v in means.values()):
        return True
    if first_loss is None or not math.isfinite(first_loss) or "loss" not in means:
        return False
    return abs(float(means["loss"])) > DIVERGENCE_FACTOR * max(abs(first_loss), 1e-8)


@torch.no_grad()
def accuracy(method: Method, x: Tensor, y: Tensor, batch_size: int) -> float:
    method.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, len(x), batch_size):
        scores = method.predict(x[start : start + batch_size])
        correct += (scores.argmax(1) == y[start : start + batch_size]).sum()
    return correct.item() / max(len(x), 1)


def evaluate(method: Method, x: Tensor, y: Tensor, batch_size: int, runs: int, seed: int
             ) -> list[float]:
    """Accuracy of `runs` independent inference passes (one for a method whose `predict`
    does not sample). Pass r draws its noise from a generator seeded with (seed, r) and
    leaves the training RNG untouched, so evaluating never changes what is learned, and a
    saved model evaluated again with the same seed gives the same numbers."""
    runs = runs if method.samples_at_inference else 1
    device = x.device
    out = []
    with preserved_rng(device):
        for r in range(runs):
            torch.manual_seed(seed * 1_000_003 + 7_919 * r + 1)
            out.append(accuracy(method, x, y, batch_size))
    return out


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


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


def method_diagnostics(
    method: Method, x: Tensor, y: Tensor, device: torch.device
) -> dict[str, float]:
    """The method's `diagnostics` on one batch as record columns `diag_<key>`, plus their cost
    `diag_time_s`; nothing for a method that has none.

    The RNG state is restored afterwards. The method itself guarantees that its state does not
    change (tests/test_feedback_alignment.py checks every method that has diagnostics), so it is
    not copied: a copy would double the memory of a large model on a GPU.
    """
    measure.synchronize(device)
    start = time.perf_counter()
    with preserved_rng(device):
        values = method.diagnostics(x, y)
    measure.synchronize(device)
    seconds = time.perf_counter() - start
    if not values:
        return {}
    return {**{f"diag_{key}": float(v) for key, v in values.items()}, "diag_time_s": seconds}


@dataclass
class UnitResult:
    records: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    # Set when this process did not train the unit because another one holds its lock.
    busy: str | None = None


def build_method(cls: type[Method], config: HParams, data: Dataset, seed: int,
                 device: torch.device, batch_size: int | None = None
                 ) -> tuple[Method, tuple[Tensor, Tensor], Tensor, Tensor]:
    """A unit's method, seeded, with the training split on `device`, the indices of the
    training images its train accuracy is measured on and those of its fixed diagnostics
    batch. The data-dependent initialisers see a seeded sample of `TRAIN_SAMPLE` training
    images, never validation or test; methods with a schedule learn the epoch's length."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sample_idx = torch.randperm(len(data.train_x), generator=gen)[:TRAIN_SAMPLE].to(device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    task = Task(
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        device=device,
        seed=seed,
        train_sample=(train_x[sample_idx], train_y[sample_idx]),
        steps_per_epoch=math.ceil(len(train_x) / batch_size) if batch_size else None,
    )
    method = cls(task, config)
    eval_idx = torch.randperm(len(train_x), generator=gen)[:TRAIN_EVAL].to(device)
    diag_idx = torch.randperm(len(train_x), generator=gen)[:DIAG_BATCH].to(device)
    return method, (train_x, train_y), eval_idx, diag_idx


@dataclass
class Setup:
    """A unit ready to train: its method and the data splits it uses, on its device."""

    method: Method
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    eval_idx: Tensor  # the training images whose accuracy is recorded as train_acc
    diag_idx: Tensor  # the fixed batch the method's diagnostics are computed on
    device: torch.device


@dataclass
class Progress:
    """What a unit has done so far: saved in its checkpoint after every epoch."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    cum_time: float = 0.0
    images: int = 0
    first_loss: float | None = None  # the loss of the unit's first step, for `diverged`


def identity(unit: Unit, cls: type[Method], config: HParams, data: Dataset, budget: Budget,
             device: torch.device) -> dict[str, Any]:
    """unit.json: what the unit is and the budget it trains with."""
    return {
        "schema": SCHEMA_VERSION,
        "unit": unit.id,
        "method": unit.method,
        "family": cls.family,
        # What was trained, so that a report compares it only with the same network (its
        # backprop twin) and published numbers only with the same setup.
        "network": cls.network_of(config),
        "schedule": cls.schedule,
        "dataset": data.name,
        "seed": unit.seed,
        "preset": unit.preset,
        "config": json.dumps(asdict(config), sort_keys=True),
        "epochs": budget.epochs,
        "batch_size": budget.batch_size,
        "device": str(device),
        "inference_runs": budget.inference_runs,
    }


def prepare(unit: Unit, data: Dataset, budget: Budget, device: torch.device) -> Setup:
    method, train, eval_idx, diag_idx = build_method(
        get_method(unit.method), unit.config(), data, unit.seed, device, budget.batch_size)
    test = (data.test_x.to(device), data.test_y.to(device))
    val = (data.val_x.to(device), data.val_y.to(device)) if data.val_x is not None else None
    return Setup(method, train, test, val, eval_idx, diag_idx, device)


def warm_up(setup: Setup, x: Tensor, y: Tensor, steps: int) -> None:
    """Kernel selection and lazy state on a copy, with the RNG restored: nothing learned."""
    with preserved_rng(setup.device):
        warm = copy.deepcopy(setup.method)
        warm.train()
        for _ in range(steps):
            warm.step(x, y)
        measure.synchronize(setup.device)


def resume(unit_dir: Path, setup: Setup) -> Progress:
    """The unit's progress from its checkpoint (method, RNG, rows), or a fresh start."""
    checkpoint = load_checkpoint(unit_dir / "checkpoint.pt")
    if checkpoint is None:
        return Progress()
    setup.method.load_state_dict(checkpoint["method"])
    set_rng_state(checkpoint["rng"], setup.device)
    return Progress(checkpoint["rows"], checkpoint["cum_time"], checkpoint["images"],
                    checkpoint.get("first_loss"))


def save_progress(unit_dir: Path, setup: Setup, progress: Progress) -> None:
    save_checkpoint(unit_dir / "checkpoint.pt", {
        "method": setup.method.state_dict(), "rows": progress.rows,
        "cum_time": progress.cum_time, "images": progress.images,
        "first_loss": progress.first_loss, "rng": rng_state(setup.device)})


def evaluate_epoch(setup: Setup, budget: Budget, seed: int) -> dict[str, Any]:
    """Test, validation and train-subset accuracy after an epoch (outside the timed region)."""
    start = time.perf_counter()
    method, runs, batch = setup.method, budget.inference_runs, budget.eval_batch_size
    tests = evaluate(method, *setup.test, batch, runs, seed)
    vals = evaluate(method, *setup.val, batch, runs, seed) if setup.val else [float("nan")]
    train_x, train_y = setup.train
    train_acc = evaluate(method, train_x[setup.eval_idx], train_y[setup.eval_idx], batch, 1,
                         seed)[0]
    (test_acc, test_se), (val_acc, val_se) = mean_and_se(tests), mean_and_se(vals)
    return {"train_acc": train_acc, "test_acc": test_acc, "test_acc_se": test_se,
            "val_acc": val_acc, "val_acc_se": val_se, "inference_runs": len(tests),
            "eval_time_s": time.perf_counter() - start}


def summarise(ident: dict[str, Any], setup: Setup, progress: Progress, status: Status,
              costs: dict[str, Any], target: float | None) -> dict[str, Any]:
    """summary.json: the unit's numbers to report, from its epochs and its costs."""
    rows, cum_time = progress.rows, progress.cum_time
    last = rows[-1] if rows else {}
    reached = [r["cum_time_s"] for r in rows if target and r["test_acc"] >= target]
    nan = float("nan")
    return {
        **ident,
        "step_mode": setup.method.step_mode,
        "status": status.value,
        "epochs_done": len(rows),
        "final_test_acc": last.get("test_acc", nan),
        "final_test_acc_se": last.get("test_acc_se", nan),
        "best_test_acc": max((r["test_acc"] for r in rows), default=nan),
        "final_train_acc": last.get("train_acc", nan),
        "final_val_acc": last.get("val_acc", nan),
        "train_time_s": cum_time,
        "time_per_epoch_s": cum_time / max(len(rows), 1),
        "throughput_img_s": progress.images / cum_time if cum_time > 0 else nan,
        "eval_time_s": sum(r.get("eval_time_s", 0.0) for r in rows),
        "target_acc": target,
        "time_to_target_s": reached[0] if reached else nan,
        **costs,
        "process_peak_rss_bytes": measure.process_peak_rss_bytes(),
    }


# What a unit folder's records say about the unit: resuming or reusing it under any other
# value would mix two budgets in one unit (the run folder's own check is records.start_run).
UNIT_BUDGET = ("method", "dataset", "seed", "config", "epochs", "batch_size", "device",
               "inference_runs")


def _config_change(before: str, now: str) -> str:
    try:
        old, new = json.loads(before), json.loads(now)
    except (TypeError, ValueError):
        return f"config={before!r}, this run {now!r}"
    keys = sorted(k for k in {*old, *new} if old.get(k, "-") != new.get(k, "-"))
    return "config " + ", ".join(f"{k}={old.get(k, '-')!r}, this run {new.get(k, '-')!r}"
                                 for k in keys)


def check_unit(unit_dir: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The unit's recorded row (`records.read_unit`) if its records were made with the budget
    of `ident`, None if it has none; a RecordsError naming the first key that differs
    otherwise. Extending a finished unit to more epochs is refused too: its summary, its
    time to target and its learning-rate schedule were made for the shorter budget."""
    for name in ("summary.json", "unit.json"):
        if (unit_dir / name).is_file():
            recorded = read_json(unit_dir / name)
            break
    else:
        return read_unit(unit_dir)
    for key in UNIT_BUDGET:
        if key not in recorded or recorded[key] == ident[key]:
            continue
        change = (_config_change(recorded[key], ident[key]) if key == "config" else
                  f"{key}={recorded[key]!r}, this run {ident[key]!r}")
        hint = (" (a finished unit is not extended: train the longer budget into a new "
                "--out DIR)" if key == "epochs" and name == "summary.json" else "")
        raise RecordsError(f"{unit_dir / name} was made with {change}; a unit folder holds "
                           f"one budget: pass another --out DIR{hint}")
    return read_unit(unit_dir)


def run_unit(
    unit: Unit, data: Dataset, budget: Budget, unit_dir: Path, progress: bool = False,
    lock: bool = True,
) -> UnitResult:
    """Train and measure one unit, resuming from its checkpoint if one exists.

    The unit folder's lock is held throughout (`lock=False`: the caller holds it), so no two
    processes ever train one unit; another holder raises `records.LockHeld`. Once it holds
    the lock the unit is checked again: records of another budget are refused, and a unit
    done meanwhile (by a process that held the lock before) is returned as it is, untrained.
    """
    if not lock:
        return _run_unit(unit, data, budget, unit_dir, progress)
    with exclusive(unit_dir / LOCK_NAME, wait_s=0):
        return _run_unit(unit, data, budget, unit_dir, progress)


def _run_unit(unit: Unit, data: Dataset, budget: Budget, unit_dir: Path, progress: bool
              ) -> UnitResult:
    device = resolve_device(budget.device)
    info = DATASETS.get(data.name)
    target = budget.target_accuracy or (info.target_accuracy if info else None)
    ident = identity(unit, get_method(unit.method), unit.config(), data, budget, device)
    row = check_unit(unit_dir, ident)
    if row is not None and row["status"] in COMPLETE:
        rec = unit_dir / "records.csv"
        return UnitResult(pd.read_csv(rec) if rec.is_file() else pd.DataFrame(), row)
    check_batch_size(budget.batch_size, data)  # a sweep's units are checked here
    remove_stale_temporaries(unit_dir)
    (unit_dir / "failed.json").unlink(missing_ok=True)  # a re-run retries a failed unit
    write_json(unit_dir / "unit.json", ident)

    setup = prepare(unit, data, budget, device)
    train_x, train_y = setup.train
    first = batches(len(train_x), budget.batch_size, unit.seed, 0, device)[0]
    costs = measure_costs(setup.method, train_x[first], train_y[first], device)
    warm_up(setup, train_x[first], train_y[first], budget.warmup_steps)
    done = resume(unit_dir, setup)

    status = Status.FINISHED
    bar = tqdm(range(len(done.rows), budget.epochs), desc=unit.id, disable=not progress,
               leave=False, initial=len(done.rows), total=budget.epochs)
    for epoch in bar:
        order = batches(len(train_x), budget.batch_size, unit.seed, epoch + 1, device)
        means, seconds, first_loss = train_epoch(setup.method, train_x, train_y, order)
        done.first_loss = first_loss if done.first_loss is None else done.first_loss
        done.cum_time += seconds
        done.images += len(train_x)
        row = {"unit": unit.id, "method": unit.method, "dataset": data.name, "seed": unit.seed,
               "epoch": epoch + 1,
               **evaluate_epoch(setup, budget, seed=unit.seed * 1_000 + epoch + 1),
               "epoch_time_s": seconds, "cum_time_s": done.cum_time,
               "cum_train_flops": costs["flops_train_step"] / budget.batch_size * done.images,
               **{f"train_{k}": v.item() for k, v in means.items()}}
        if diverged(means, done.first_loss):
            status = Status.DIVERGED
        else:
            row.update(method_diagnostics(setup.method, train_x[setup.diag_idx],
                                          train_y[setup.diag_idx], device))
        done.rows.append(row)
        write_csv(unit_dir / "records.csv", pd.DataFrame(done.rows))
        if status == Status.DIVERGED:
            break
        save_progress(unit_dir, setup, done)
        bar.set_postfix(test_acc=f"{row['test_acc']:.4f}")

    if budget.keep_model:
        save_checkpoint(unit_dir / "model.pt", {"model": setup.method.model.state_dict()})
    summary = summarise(ident, setup, done, status, costs, target)
    write_json(unit_dir / "summary.json", summary)
    (unit_dir / "checkpoint.pt").unlink(missing_ok=True)
    return UnitResult(pd.DataFrame(done.rows), summary)


def run_units(
    units: list[Unit], data: dict[str, Dataset], budget: Budget, run_dir: Path,
    progress: bool = False,
) -> list[UnitResult]:
    """Run every unit not yet done; a unit that raises is recorded as failed and the rest go on.
    Returns the result of every unit run now, failed ones included (status `failed`), and of
    those another process is training (skipped here, `busy` set: that process finishes them).

    A RecordsError (a record that cannot be read or loaded, a budget that differs, a disk that
    is full) stops the run instead: it needs a decision (delete the file, another --out, free
    space) that retrying every other unit would not make.
    """
    from bpfree.records import merge_run

    results = []
    todo = pending(units, data, budget, run_dir)  # every record checked before any training
    for unit in tqdm(todo, desc="units", disable=not progress):
        unit_dir = run_dir / "units" / unit.id
        if _done(unit, data[unit.dataset], budget, unit_dir):  # by another process meanwhile
            continue
        try:
            with exclusive(unit_dir / LOCK_NAME, wait_s=0):  # failed.json too is written under it
                results.append(_attempt(unit, data[unit.dataset], budget, unit_dir, progress))
        except LockHeld as exc:
            results.append(UnitResult(pd.DataFrame(), {"unit": unit.id}, busy=exc.holder))
            continue
        merge_run(run_dir)
    merge_run(run_dir)
    return results


def pending(units: list[Unit], data: dict[str, Dataset], budget: Budget, run_dir: Path
            ) -> list[Unit]:
    """The units of `run_dir` not done yet. Every unit's records are read and checked
    against the budget, so a corrupt record or another budget is refused before anything
    trains."""
    return [u for u in units
            if not _done(u, data[u.dataset], budget, run_dir / "units" / u.id)]


def _done(unit: Unit, data: Dataset, budget: Budget, unit_dir: Path) -> bool:
    """Whether the unit is done, with this budget: a done unit of another budget is a
    RecordsError (`check_unit`), not a result to keep under this one."""
    try:
        ident = identity(unit, get_method(unit.method), unit.config(), data, budget,
                         resolve_device(budget.device))
    except Exception:  # it cannot even start: `_attempt` records why
        return unit_is_done(unit_dir)
    row = check_unit(unit_dir, ident)
    return row is not None and row["status"] in COMPLETE


def _attempt(unit: Unit, data: Dataset, budget: Budget, unit_dir: Path, progress: bool
             ) -> UnitResult:
    """`run_unit` under a lock the caller holds; an exception other than a RecordsError is
    recorded in failed.json (a broken unit must not stop the run) and returned as a result."""
    try:
        return run_unit(unit, data, budget, unit_dir, progress, lock=False)
    except (KeyboardInterrupt, SystemExit, RecordsError):
        raise
    except Exception as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        failure = {"unit": unit.id, "method": unit.method, "dataset": unit.dataset,
                   "seed": unit.seed, "preset": unit.preset, "epochs": budget.epochs,
                   "batch_size": budget.batch_size, "device": budget.device,
                   "status": Status.FAILED.value, "error": f"{type(exc).__name__}: {exc}"}
        try:
            failure["config"] = json.dumps(asdict(unit.config()), sort_keys=True)
        except Exception:  # the unit failed because its configuration cannot be made
            failure["config"] = "{}"
        write_json(unit_dir / "failed.json", failure)
        return UnitResult(pd.DataFrame(), failure)
