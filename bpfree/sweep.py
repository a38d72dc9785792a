"""`bpfree sweep SWEEP.toml`: a grid of units, run by local worker processes or by Ray.

A sweep is the cross product methods x datasets x epochs x hyperparameter points x seeds.
Each point is one harness unit (`run_unit`, unchanged) that writes its own folder under
`<sweep dir>/units/`, atomically and with per-epoch checkpoints. That is what makes a sweep
resumable without any scheduler state: re-running the same file skips units whose
`summary.json` exists, resumes interrupted ones from their checkpoint and retries failed ones.
`bpfree report` reads a sweep folder like a run folder.

The driver (this process) never trains. It hands units to a pool, records every attempt in
the unit's `attempts.json`, retries failures up to `max_retries` times and writes `failed.json`
(the harness's format) for units that never succeed. Attempts run in their own process
(`benchmarks/workers.py`) so that a crash, an OOM kill or a `kill -9` costs one attempt of one
unit, never the sweep. Sweep files are described in docs/sweeps.md.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import typing
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bpfree import options
from bpfree.harness import Unit
from bpfree.methods import ConfigError
from bpfree.records import (
    COMPLETE,
    DRIVER_LOCK_NAME,
    LockHeld,
    RecordsError,
    exclusive,
    merge_run,
    prepare_out,
    read_unit,
    start_run,
    unit_is_done,
    write_json,
)
from bpfree.workers import Context, LocalPool, Pool, RayPool, start_ray

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport has the same API
    import tomli as tomllib

MAX_LIVE_LINES = 16  # a terminal shows this many running units; the rest are only counted
MERGE_EVERY_S = 30.0  # how often the sweep-level records.csv / summary.csv are refreshed


@dataclass(frozen=True)
class SweepUnit(Unit):
    """A harness unit that also carries its epoch budget.

    Epochs are in the id (`__e<epochs>`) because a sweep may list several, and because a
    finished unit is skipped on resume: a longer budget must be a new unit, not a done one.
    """

    epochs: int = 1

    @property
    def id(self) -> str:
        return f"{super().id}__e{self.epochs}"


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file. Every list is a grid axis; scalars are fixed for all units."""

    # A field's `check` (metadata) is the shared option check it must pass (bpfree.options);
    # its type, read from the annotation, is what a sweep file may give.
    path: Path
    methods: tuple[str, ...] = field(metadata={"check": options.check_methods})
    datasets: tuple[str, ...] = field(
        metadata={"check": lambda names: [options.check_dataset(n) for n in names]})
    seeds: tuple[int, ...] = field(metadata={"check": options.check_seeds})
    epochs: tuple[int, ...] = field(
        metadata={"check": lambda values: [options.at_least("epochs", v) for v in values]})
    preset: str = "default"
    batch_size: int = field(default=128, metadata={"check": lambda v: options.at_least("batch_size", v)})
    device: str = field(default="auto", metadata={"check": options.check_device})
    data_dir: str | None = None
    tuned_dir: str | None = None  # tuned presets for preset = "tuned" (default results/tuned)
    val_fraction: float = field(default=0.0, metadata={"check": options.check_val_fraction})
    target_acc: float | None = field(default=None, metadata={"check": options.check_target_acc})
    max_retries: int = field(default=1, metadata={"check": lambda v: options.at_least("max_retries", v, 0)})
    cpus_per_unit: int | None = field(
        default=None, metadata={"check": lambda v: v is None or options.at_least("cpus_per_unit", v)})
    units_per_gpu: int = field(default=1, metadata={"check": lambda v: options.at_least("units_per_gpu", v)})
    inference_runs: int = field(default=1, metadata={"check": lambda v: options.at_least("inference_runs", v)})
    keep_model: bool = False
    description: str = ""
    # Per method, one or more tables of hyperparameter axes; each table is a cross product,
    # and several tables ([[grid.<method>]]) are their union: how one-factor-at-a-time
    # ablations are written.
    grid: dict[str, tuple[dict[str, tuple[Any, ...]], ...]] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """The sweep as plain data, for meta.json."""
        spec = asdict(self)
        spec["path"] = str(self.path)
        return spec

    def units(self) -> list[SweepUnit]:
        """Every unit of the grid, hyperparameters validated; grouped by dataset so that a
        worker's cached dataset is reused by the units that follow."""
        from bpfree.tune import TUNED_DIR, resolve_preset

        tuned_dir = Path(self.tuned_dir) if self.tuned_dir else TUNED_DIR
        units: dict[str, SweepUnit] = {}
        for dataset, epochs, method in itertools.product(self.datasets, self.epochs, self.methods):
            tables = self.grid.get(method, ({},))
            points = [dict(zip(table, values)) for table in tables
                      for values in itertools.product(*table.values())]
            grid = self.grid.get(method)
            for point in points:
                point = {key: str(value) for key, value in point.items()}
                try:
                    overrides = resolve_preset(method, dataset, self.preset, point, tuned_dir)
                    for seed in self.seeds:
                        unit = SweepUnit(method, dataset, seed, self.preset,
                                         tuple(sorted(overrides.items())), epochs)
                        unit.config()
                        units.setdefault(unit.id, unit)
                except ConfigError as exc:
                    where = f"[grid.{method}] " if grid else ""
                    raise ConfigError(f"{self.path}: {where}{exc}") from None
        return list(units.values())


# --- reading and validating sweep files ----------------------------------------------------

_REQUIRED = tuple(f.name for f in fields(Sweep) if f.default is MISSING
                  and f.default_factory is MISSING and f.name != "path")
_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _fits(value: Any, kind: type) -> bool:
    """Whether a TOML value has the field's type (an integer is a number; a boolean is not)."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _axis(path: Path, key: str, raw: Any, kinds: tuple[type, ...]) -> tuple[Any, ...]:
    """A scalar or a non-empty list, as a tuple without duplicates."""
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(any(_fits(v, k) for k in kinds) for v in values):
        what = " or ".join(_WORDS[k] for k in kinds)
        raise ConfigError(f"{path}: key {key!r} must be {what} or a non-empty list of them, "
                          f"got {raw!r}")
    return tuple(dict.fromkeys(values))


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the sweep file "
                          f"as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def resolve_sweep_path(name: str | Path) -> Path:
    """A sweep file's path: the file itself, or the name of one shipped with bpfree
    (`noprop-mnist` for bpfree/sweeps/noprop-mnist.toml)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = files("bpfree") / "sweeps" / f"{path.stem}.toml"
    if path.suffix in ("", ".toml") and path.parent == Path(".") and bundled.is_file():
        return Path(str(bundled))
    return path


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every mistake is one ConfigError naming the file and key.
    The keys, their types and their checks are the `Sweep` dataclass's own fields."""
    path = resolve_sweep_path(path)
    raw = _read(path)
    hints = typing.get_type_hints(Sweep)
    known = {f.name for f in fields(Sweep) if f.name != "path"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    for key in _REQUIRED:
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r} (every sweep names "
                              f"{', '.join(_REQUIRED)})")
    values: dict[str, Any] = {}
    for item in fields(Sweep):
        key, hint = item.name, hints[item.name]
        if key in ("path", "grid") or key not in raw:
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is tuple:  # a grid axis: a value or a list of them
            values[key] = _axis(path, key, raw[key], (args[0],))
        else:
            kind = args[0] if args else hint
            if not _fits(raw[key], kind):
                raise ConfigError(f"{path}: key {key!r} must be {_WORDS[kind]}, got {raw[key]!r}")
            values[key] = raw[key]
        if "check" in item.metadata:
            try:
                item.metadata["check"](values[key])
            except ConfigError as exc:
                raise ConfigError(f"{path}: key {key!r}: {exc}") from None
    methods = values["methods"]
    grid = raw.get("grid", {})
    if not isinstance(grid, dict) or not all(
            isinstance(t, dict) or (isinstance(t, list) and t and all(isinstance(i, dict) for i in t))
            for t in grid.values()):
        raise ConfigError(f"{path}: key 'grid' must hold tables [grid.<method>] (or arrays of "
                          f"tables [[grid.<method>]]) of hyperparameter = [values]")
    for method in grid:
        if method not in methods:
            raise ConfigError(f"{path}: [grid.{method}]: {method!r} is not in 'methods' "
                              f"({', '.join(methods)})")
    checked = {
        method: tuple(
            {key: _axis(path, f"grid.{method}.{key}", axis, (str, float, bool))
             for key, axis in table.items()}
            for table in (tables if isinstance(tables, list) else [tables]))
        for method, tables in grid.items()
    }
    sweep = Sweep(path, grid=checked, **values)
    sweep.units()  # every hyperparameter of every point is checked before anything runs
    return sweep


# --- the driver --------------------------------------------------------------------------------


class Progress:
    """One bar over units (finished / running / failed) and one live line per running unit.

    On a terminal only; elsewhere (CI logs, files) it prints just failures and retries.
    """

    def __init__(self, total: int, done: int, lines: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=done, desc="units", unit="unit",
                        disable=not enabled, dynamic_ncols=True)
        self.lines = [tqdm(bar_format="{desc}", position=i + 1, leave=False,
                           disable=not enabled) for i in range(min(lines, MAX_LIVE_LINES))]
        self.started: dict[str, float] = {}

    def refresh(self, running: list[tuple[SweepUnit, int]], finished: int, failed: int,
                sweep_dir: Path) -> None:
        if not self.enabled:
            return
        self.bar.set_postfix_str(f"finished={finished} running={len(running)} failed={failed}")
        now = time.monotonic()
        for i, line in enumerate(self.lines):
            if i >= len(running):
                line.set_description_str("")
                continue
            unit, attempt = running[i]
            start = self.started.setdefault(f"{unit.id}#{attempt}", now)
            records = sweep_dir / "units" / unit.id / "records.csv"
            epochs = max(len(records.read_text().splitlines()) - 1, 0) if records.is_file() else 0
            line.set_description_str(f"  {unit.id}  epoch {epochs}/{unit.epochs}  "
                                     f"attempt {attempt}  {now - start:.0f}s")

    def event(self, message: str, advance: bool, failure: bool = False) -> None:
        if advance:
            self.bar.update(1)
        if self.enabled:
            self.bar.write(message, file=sys.stderr)
        elif failure:
            print(f"bpfree: {message}", file=sys.stderr)

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.bar.close()


def failure(unit: SweepUnit, ctx: Context, error: str) -> dict[str, Any]:
    """failed.json: the harness's failure record plus the budget and config, which a report
    needs to place a unit that died before the harness wrote its unit.json."""
    return {"unit": unit.id, "method": unit.method, "dataset": unit.dataset, "seed": unit.seed,
            "preset": unit.preset, "config": json.dumps(asdict(unit.config()), sort_keys=True),
            "epochs": unit.epochs, "batch_size": ctx.batch_size, "device": ctx.device,
            "status": "failed", "error": error}


def _history(unit_dir: Path) -> list[dict[str, Any]]:
    path = unit_dir / "attempts.json"
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordsError(f"{path}: corrupt ({exc}); delete it (the unit's attempt history "
                           f"is then lost, its records are not)") from None
    if not isinstance(history, list):
        raise RecordsError(f"{path}: corrupt, expected a JSON list; delete it")
    return history


def begin_attempt(unit_dir: Path) -> int:
    """Record an attempt as `running` before it is handed out, and return its number (one
    more than the unit's attempts so far, over every invocation): an attempt whose driver
    dies stays in attempts.json, and the next driver marks it `interrupted`."""
    history = _history(unit_dir)
    attempt = len(history) + 1
    history.append({"attempt": attempt, "status": "running",
                    "submitted": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
    write_json(unit_dir / "attempts.json", history)
    return attempt


def _who(unit_dir: Path, attempt: int) -> dict[str, Any]:
    """worker.json if the process running `attempt` got as far as writing it."""
    worker = unit_dir / "worker.json"
    try:
        who = json.loads(worker.read_text()) if worker.is_file() else {}
    except (OSError, ValueError):
        who = {}
    return who if isinstance(who, dict) and who.get("attempt") == attempt else {}


def record_attempt(unit_dir: Path, attempt: int, outcome: dict[str, Any], seconds: float) -> None:
    """Write the outcome of `attempt` into the unit's attempts.json, with the worker that
    ran it (in place of its `running` entry)."""
    history = [h for h in _history(unit_dir) if h.get("attempt") != attempt]
    history.append({**_who(unit_dir, attempt), "attempt": attempt, "seconds": round(seconds, 3),
                    **{k: v for k, v in outcome.items() if k != "retry"}})
    write_json(unit_dir / "attempts.json", sorted(history, key=lambda h: h.get("attempt", 0)))


def close_interrupted(unit_dir: Path) -> int:
    """Close the attempts a dead driver left `running`; returns how many there were. Such an
    attempt is `interrupted` (its unit resumes from its checkpoint), or, if its worker got to
    finish the unit before it noticed, the unit's own status. Only the one driver of a sweep
    folder (its driver lock) calls this."""
    history = _history(unit_dir)
    stale = [h for h in history if h.get("status") == "running"]
    if not stale:
        return 0
    done = read_unit(unit_dir)
    done = done if done is not None and done["status"] in COMPLETE else None
    last = max(h.get("attempt", 0) for h in stale)
    closed = []
    for h in history:
        if h.get("status") == "running":
            h = {**_who(unit_dir, h.get("attempt")), **h, "status": "interrupted",
                 "error": "the sweep driver stopped (killed?) before this attempt ended; its "
                          "finished epochs were kept in the checkpoint"}
            if done is not None and h["attempt"] == last:
                h.update(status=str(done["status"]), error=None,
                         note="finished after its driver stopped; outcome read from summary.json")
        closed.append(h)
    write_json(unit_dir / "attempts.json", closed)
    return len(stale)


@dataclass
class SweepResult:
    sweep_dir: Path
    total: int
    skipped: int  # done before this invocation
    finished: int
    failed: int


def drive(units: list[SweepUnit], pool: Pool, ctx: Context, max_retries: int,
          progress: Progress) -> tuple[int, int]:
    """Run every unit to success or to 1 + max_retries failed attempts in this invocation.
    Returns (finished, failed)."""
    queue: deque[tuple[SweepUnit, int]] = deque((u, 1) for u in units)  # (unit, try here)
    running: dict[str, tuple[SweepUnit, int, int, float]] = {}
    finished = failed = 0
    sweep_dir = Path(ctx.sweep_dir)
    last_merge = time.monotonic()
    while queue or running:
        while queue and len(running) < pool.capacity:
            unit, tries = queue.popleft()
            attempt = begin_attempt(sweep_dir / "units" / unit.id)
            pool.submit(unit, attempt)
            running[unit.id] = (unit, attempt, tries, time.monotonic())
        for unit, attempt, outcome in pool.wait(timeout=0.5):
            _, _, tries, started = running.pop(unit.id)
            unit_dir = sweep_dir / "units" / unit.id
            record_attempt(unit_dir, attempt, outcome, time.monotonic() - started)
            if outcome["status"] != "failed":
                finished += 1
                progress.event(f"{unit.id}: {outcome['status']}", advance=True)
            elif outcome["retry"] and tries <= max_retries:
                queue.append((unit, tries + 1))
                progress.event(f"{unit.id}: attempt {attempt} failed ({outcome['error']}); "
                               f"retrying", advance=False, failure=True)
            else:
                failed += 1
                write_json(unit_dir / "failed.json", failure(unit, ctx, outcome["error"]))
                progress.event(f"{unit.id}: failed after {tries} attempt(s): "
                               f"{outcome['error']}", advance=True, failure=True)
        progress.refresh([(u, a) for u, a, _, _ in running.values()], finished, failed,
                         sweep_dir)
        if time.monotonic() - last_merge > MERGE_EVERY_S:
            merge_run(sweep_dir)
            last_merge = time.monotonic()
    return finished, failed


def driver_environment(device: torch.device) -> dict[str, Any]:
    """meta.json's provenance. On Ray the units' GPUs may be on other machines than the
    driver; each unit's worker.json then names the device it ran on."""
    from bpfree.provenance import environment

    if device.type == "cuda" and not torch.cuda.is_available():
        return {**environment(torch.device("cpu")), "device": "cuda",
                "device_name": "GPUs of the Ray cluster (per unit: units/*/worker.json)"}
    return environment(device)


# The budget every unit of a sweep folder shares: it may not change under finished units.
# Grid axes may grow between invocations (new seeds, methods, values: new units).
BUDGET_KEYS = ("batch_size", "device", "data_dir", "val_fraction", "target_acc", "inference_runs")


def run_sweep(sweep: Sweep, sweep_dir: Path, executor: str = "local",
              address: str | None = None, max_parallel: int | None = None,
              max_retries: int | None = None, progress: bool = False,
              gpu_resource: str = "GPU") -> SweepResult:
    """Run (or resume) a sweep into `sweep_dir`; see the module docstring.

    `gpu_resource` names the Ray resource a unit's GPU share is taken from: "GPU", or in
    tests a custom resource that stands in for a GPU on a machine without one."""

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, got {executor!r}")
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {max_parallel}")
    if max_retries is not None and max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    units = sweep.units()
    sweep_dir = sweep_dir.resolve()
    retries = sweep.max_retries if max_retries is None else max_retries
    prepare_out(sweep_dir)  # someone else's folder, or an unwritable one: refused first
    try:
        with exclusive(sweep_dir / DRIVER_LOCK_NAME, wait_s=0):
            return _run_sweep(sweep, sweep_dir, units, executor, address, max_parallel,
                              retries, progress, gpu_resource)
    except LockHeld as exc:
        raise RecordsError(f"another bpfree sweep ({exc.holder}) is running in {sweep_dir}; "
                           f"wait for it to end, or pass another --out DIR") from None


def _run_sweep(sweep: Sweep, sweep_dir: Path, units: list[SweepUnit], executor: str,
               address: str | None, max_parallel: int | None, retries: int, progress: bool,
               gpu_resource: str) -> SweepResult:
    """run_sweep's work, under the sweep folder's driver lock."""
    from bpfree.harness import resolve_device

    owns_ray = start_ray(address) if executor == "ray" else False
    try:
        if executor == "ray":
            import ray

            resources = ray.cluster_resources()
            cuda = sweep.device == "cuda" or (sweep.device == "auto" and resources.get("GPU", 0) > 0)
            shares = cuda or gpu_resource != "GPU"
            threads = sweep.cpus_per_unit or 1
            cpu_fits = int(resources.get("CPU", 1) // threads)
            gpu_fits = int(resources.get(gpu_resource, 0) * sweep.units_per_gpu)
            fits = min(gpu_fits, cpu_fits) if shares else cpu_fits
            capacity = max_parallel or max(fits, 1)
            device = torch.device("cuda" if cuda else "cpu")
            fraction = 1 / sweep.units_per_gpu if shares else 0.0
        else:
            device = resolve_device(sweep.device)
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            capacity = max_parallel or max(1, gpus * sweep.units_per_gpu)
            threads = sweep.cpus_per_unit or max(1, (os.cpu_count() or 1) // capacity)
            fraction = 0.0
        ctx = Context(str(sweep_dir), sweep.batch_size, device.type,
                      str(Path(sweep.data_dir).resolve()) if sweep.data_dir else None,
                      sweep.val_fraction, sweep.target_acc, threads, executor,
                      sweep.inference_runs, sweep.keep_model, fraction, gpu_resource)

        # torch_threads: of each unit (the driver's own count means nothing: it never trains)
        start_run(sweep_dir, sweep.spec(), "bpfree " + " ".join(sys.argv[1:]),
                  driver_environment(device), BUDGET_KEYS,
                  defaults={f.name: f.default for f in fields(Sweep)},
                  invocation={"executor": executor, "address": address,
                              "max_parallel": capacity, "max_retries": retries,
                              "torch_threads": threads})

        interrupted = sum(close_interrupted(sweep_dir / "units" / u.id) for u in units)
        todo = [u for u in units if not unit_is_done(sweep_dir / "units" / u.id)]
        if interrupted:
            print(f"bpfree: {interrupted} attempt(s) of a previous driver were interrupted "
                  f"(attempts.json); their units resume from their checkpoints",
                  file=sys.stderr)
        bar = Progress(len(units), len(units) - len(todo), capacity, progress)
        pool: Pool = RayPool(ctx, capacity) if executor == "ray" else LocalPool(ctx, capacity)
        try:
            finished, failed = drive(todo, pool, ctx, retries, bar)
        finally:
            pool.close()
            bar.close()
            merge_run(sweep_dir)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return SweepResult(sweep_dir, len(units), len(units) - len(todo), finished, failed)
