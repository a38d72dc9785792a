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
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.data import DATASETS
from benchmarks.harness import Unit
from benchmarks.records import merge_run, unit_is_done, write_json
from benchmarks.workers import Context, LocalPool, Pool, RayPool, start_ray
from methods import ConfigError, get_method

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport has the same API
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")
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

    path: Path
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: tuple[int, ...]
    preset: str = "default"
    batch_size: int = 128
    device: str = "auto"
    data_dir: str | None = None
    val_fraction: float = 0.0
    target_acc: float | None = None
    max_retries: int = 1
    cpus_per_unit: int | None = None
    units_per_gpu: int = 1
    inference_runs: int = 1
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
        from benchmarks.tune import resolve_preset

        units: dict[str, SweepUnit] = {}
        for dataset, epochs, method in itertools.product(self.datasets, self.epochs, self.methods):
            tables = self.grid.get(method, ({},))
            points = [dict(zip(table, values)) for table in tables
                      for values in itertools.product(*table.values())]
            grid = self.grid.get(method)
            for point in points:
                point = {key: str(value) for key, value in point.items()}
                try:
                    overrides = resolve_preset(method, dataset, self.preset, point)
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

_REQUIRED = ("methods", "datasets", "seeds", "epochs")


_KINDS = {"a string": (str,), "an integer": (int,), "a number": (int, float), "a boolean": (bool,),
          "a string, number or boolean": (str, int, float, bool)}


def _is(value: Any, what: str) -> bool:
    kinds = _KINDS[what]
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _axis(path: Path, key: str, raw: Any, what: str) -> tuple[Any, ...]:
    """A scalar or a non-empty list, as a tuple without duplicates."""
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(_is(v, what) for v in values):
        raise ConfigError(f"{path}: key {key!r} must be {what} or a non-empty list of them, "
                          f"got {raw!r}")
    return tuple(dict.fromkeys(values))


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every mistake is one ConfigError naming the file and key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    known = {f for f in Sweep.__dataclass_fields__ if f != "path"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    for key in _REQUIRED:
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r} (every sweep names "
                              f"{', '.join(_REQUIRED)})")
    methods = _axis(path, "methods", raw["methods"], "a string")
    datasets = _axis(path, "datasets", raw["datasets"], "a string")
    for name in methods:
        try:
            get_method(name)
        except ConfigError as exc:
            raise ConfigError(f"{path}: key 'methods': {exc}") from None
    for name in datasets:
        if name not in DATASETS:
            raise ConfigError(f"{path}: key 'datasets': unknown dataset {name!r}; "
                              f"known: {', '.join(DATASETS)}")
    seeds = _axis(path, "seeds", raw["seeds"], "an integer")
    epochs = _axis(path, "epochs", raw["epochs"], "an integer")
    if min(epochs) < 1:
        raise ConfigError(f"{path}: key 'epochs' must be >= 1, got {raw['epochs']!r}")
    options: dict[str, Any] = {}
    for key, what in [("preset", "a string"), ("batch_size", "an integer"),
                      ("device", "a string"), ("data_dir", "a string"),
                      ("val_fraction", "a number"), ("target_acc", "a number"),
                      ("max_retries", "an integer"), ("cpus_per_unit", "an integer"),
                      ("units_per_gpu", "an integer"), ("inference_runs", "an integer"),
                      ("keep_model", "a boolean"), ("description", "a string")]:
        if key in raw:
            if not _is(raw[key], what):
                raise ConfigError(f"{path}: key {key!r} must be {what}, got {raw[key]!r}")
            options[key] = raw[key]
    for key in ("batch_size", "cpus_per_unit", "units_per_gpu", "inference_runs"):
        if options.get(key, 1) < 1:
            raise ConfigError(f"{path}: key {key!r} must be >= 1, got {options[key]}")
    if options.get("max_retries", 0) < 0:
        raise ConfigError(f"{path}: key 'max_retries' must be >= 0, got {options['max_retries']}")
    if options.get("device", "auto") not in DEVICES:
        raise ConfigError(f"{path}: key 'device' must be one of {', '.join(DEVICES)}, "
                          f"got {options['device']!r}")
    if not 0.0 <= options.get("val_fraction", 0.0) < 1.0:
        raise ConfigError(f"{path}: key 'val_fraction' must be in [0, 1), "
                          f"got {options['val_fraction']}")
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
            {key: _axis(path, f"grid.{method}.{key}", values, "a string, number or boolean")
             for key, values in table.items()}
            for table in (tables if isinstance(tables, list) else [tables]))
        for method, tables in grid.items()
    }
    sweep = Sweep(path, methods, datasets, seeds, epochs, grid=checked, **options)
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


def record_attempt(unit_dir: Path, attempt: int, outcome: dict[str, Any], seconds: float) -> None:
    """Append this attempt to the unit's attempts.json, with the worker that ran it."""
    path = unit_dir / "attempts.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    worker = unit_dir / "worker.json"
    who = json.loads(worker.read_text()) if worker.is_file() else {}
    if who.get("attempt") != attempt:
        who = {}  # the process died before saying who it was
    history.append({**who, "attempt": attempt, "seconds": round(seconds, 3),
                    **{k: v for k, v in outcome.items() if k != "retry"}})
    write_json(path, history)


@dataclass
class SweepResult:
    sweep_dir: Path
    total: int
    skipped: int  # done before this invocation
    finished: int
    failed: int


def drive(units: list[SweepUnit], pool: Pool, ctx: Context, max_retries: int,
          progress: Progress) -> tuple[int, int]:
    """Run every unit to success or to 1 + max_retries failed attempts. (finished, failed)."""
    queue: deque[tuple[SweepUnit, int]] = deque((u, 1) for u in units)
    running: dict[str, tuple[SweepUnit, int, float]] = {}
    finished = failed = 0
    sweep_dir = Path(ctx.sweep_dir)
    last_merge = time.monotonic()
    while queue or running:
        while queue and len(running) < pool.capacity:
            unit, attempt = queue.popleft()
            pool.submit(unit, attempt)
            running[unit.id] = (unit, attempt, time.monotonic())
        for unit, attempt, outcome in pool.wait(timeout=0.5):
            _, _, started = running.pop(unit.id)
            unit_dir = sweep_dir / "units" / unit.id
            record_attempt(unit_dir, attempt, outcome, time.monotonic() - started)
            if outcome["status"] != "failed":
                finished += 1
                progress.event(f"{unit.id}: {outcome['status']}", advance=True)
            elif outcome["retry"] and attempt <= max_retries:
                queue.append((unit, attempt + 1))
                progress.event(f"{unit.id}: attempt {attempt} failed ({outcome['error']}); "
                               f"retrying", advance=False, failure=True)
            else:
                failed += 1
                write_json(unit_dir / "failed.json", failure(unit, ctx, outcome["error"]))
                progress.event(f"{unit.id}: failed after {attempt} attempt(s): "
                               f"{outcome['error']}", advance=True, failure=True)
        progress.refresh([(u, a) for u, a, _ in running.values()], finished, failed, sweep_dir)
        if time.monotonic() - last_merge > MERGE_EVERY_S:
            merge_run(sweep_dir)
            last_merge = time.monotonic()
    return finished, failed


def driver_environment(device: torch.device) -> dict[str, Any]:
    """meta.json's provenance. On Ray the units' GPUs may be on other machines than the
    driver; each unit's worker.json then names the device it ran on."""
    from benchmarks.cli import environment

    if device.type == "cuda" and not torch.cuda.is_available():
        return {**environment(torch.device("cpu")), "device": "cuda",
                "device_name": "GPUs of the Ray cluster (per unit: units/*/worker.json)"}
    return environment(device)


def _check_resumable(meta_path: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The existing meta.json, if the sweep folder was made with the same budget.

    Grid axes may grow between invocations (new seeds, methods, values: new units), but the
    budget all units share may not change under finished units.
    """
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    for key in ("batch_size", "device", "data_dir", "val_fraction", "target_acc",
                "inference_runs"):
        if meta["spec"].get(key, Sweep.__dataclass_fields__[key].default) != spec[key]:
            raise ConfigError(f"{meta_path.parent} was swept with {key}={meta['spec'].get(key)!r}, "
                              f"this file says {spec[key]!r}; pass another --out DIR")
    return meta


def run_sweep(sweep: Sweep, sweep_dir: Path, executor: str = "local",
              address: str | None = None, max_parallel: int | None = None,
              max_retries: int | None = None, progress: bool = False,
              gpu_resource: str = "GPU") -> SweepResult:
    """Run (or resume) a sweep into `sweep_dir`; see the module docstring.

    `gpu_resource` names the Ray resource a unit's GPU share is taken from: "GPU", or in
    tests a custom resource that stands in for a GPU on a machine without one."""
    from benchmarks.harness import resolve_device

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor must be local or ray, got {executor!r}")
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {max_parallel}")
    if max_retries is not None and max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    units = sweep.units()
    sweep_dir = sweep_dir.resolve()
    retries = sweep.max_retries if max_retries is None else max_retries
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

        spec = sweep.spec()
        meta_path = sweep_dir / "meta.json"
        meta = _check_resumable(meta_path, spec)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if meta is None:
            meta = {"command": "bpfree " + " ".join(sys.argv[1:]), "spec": spec, "started": now,
                    "resumed": [], **driver_environment(device)}
        else:
            meta["resumed"].append(now)
            meta["spec"] = spec  # grid axes may have grown
        # torch_threads: of each unit (the driver's own count means nothing: it never trains)
        meta.update(executor=executor, address=address, max_parallel=capacity,
                    max_retries=retries, torch_threads=threads)
        write_json(meta_path, meta)

        todo = [u for u in units if not unit_is_done(sweep_dir / "units" / u.id)]
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
