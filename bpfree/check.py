"""`bpfree check`: the CI regression gate, on metrics that do not depend on the machine's speed.

Wall-clock time cannot be gated on shared CI runners (they vary by up to 2x), so the gate
compares what is deterministic on CPU with fixed seeds: FLOPs per training step and per
prediction, parameter count, bytes held for backward, and the test error after a small fixed
training budget. Counts must match the committed baseline exactly (a change means the model
or the update rule changed, which must be acknowledged with `--update`, whose diff is the
review record); the error may rise by a small margin, for float rounding differences between
CPUs, before it counts as a regression.

Every registered method is measured, through the same harness as `bpfree run`, so a new
method is gated as soon as it is registered (after its baseline row is added with `--update`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bpfree.data import Dataset, load_dataset
from bpfree.harness import Budget, Unit, run_unit
from bpfree.methods import ConfigError, all_methods, broken_modules
from bpfree.records import write_csv
from bpfree.version import source_checkout

# The baseline shipped with the package (bpfree.results); in a clone, the repository's file.
BASELINE = Path(str(files("bpfree.results") / "baseline" / "ci.csv"))


def default_baseline(update: bool) -> Path:
    """The baseline to compare with, or with `update` to rewrite: the shipped one, which in
    a clone (an editable install) is the repository's results/baseline/ci.csv. An installed
    wheel's copy lives in site-packages and is not to be rewritten: pass --baseline."""
    if update and source_checkout() is None:
        raise ConfigError("bpfree check --update rewrites a baseline file: pass --baseline PATH "
                          "(this bpfree is installed, not a clone, so its own copy is read-only)")
    return BASELINE


@dataclass(frozen=True)
class GateBudget:
    """The fixed small training budget behind the gate's `test_error`.

    Sized for a few minutes for all methods on 2 CPU cores: every method's `quick` preset,
    one epoch over `train_images` images of mnist-5k (a seeded random subset, since mnist-5k
    is sorted by label) in batches of `batch_size`, then the error on all 1,000 test images.
    FLOPs and activation bytes are those of one step on a batch of `batch_size`.
    """

    dataset: str = "mnist-5k"
    train_images: int = 512
    batch_size: int = 64
    epochs: int = 1
    seed: int = 0
    preset: str = "quick"


BUDGET = GateBudget()


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move from the baseline before the gate fails.

    `margin` is an absolute allowance; `only_higher_fails` makes a decrease an improvement
    (error) rather than a change that must be acknowledged (counts).
    """

    margin: float = 0.0
    only_higher_fails: bool = False


METRICS: dict[str, Tolerance] = {
    "params": Tolerance(),
    "flops_train_step": Tolerance(),
    "flops_predict": Tolerance(),
    "act_bytes_peak": Tolerance(),
    "act_bytes_total": Tolerance(),
    "test_error": Tolerance(margin=0.01, only_higher_fails=True),  # 10 of the 1,000 test images
}


def gate_data(budget: GateBudget = BUDGET) -> Dataset:
    """mnist-5k with its training set cut to a seeded random `train_images` subset."""
    data = load_dataset(budget.dataset)
    gen = torch.Generator().manual_seed(budget.seed)
    keep = torch.randperm(len(data.train_x), generator=gen)[: budget.train_images]
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    return data


def measure_method(name: str, data: Dataset, budget: GateBudget = BUDGET) -> dict[str, Any]:
    """The gate's metrics of one method, trained by the harness on CPU into a throwaway folder."""
    unit = Unit(name, data.name, budget.seed, budget.preset)
    run_budget = Budget(epochs=budget.epochs, batch_size=budget.batch_size, device="cpu",
                        warmup_steps=0)
    with tempfile.TemporaryDirectory(prefix="bpfree-check-") as tmp:
        summary = run_unit(unit, data, run_budget, Path(tmp)).summary
    if summary["status"] != "finished":
        raise RuntimeError(f"{name} {summary['status']} within the gate's budget")
    row = {"method": name, **{m: summary[m] for m in METRICS if m != "test_error"}}
    # Rounded so that the CSV holds k/1000 exactly rather than 1 - 0.877 = 0.12299999999999998.
    row["test_error"] = round(1.0 - summary["final_test_acc"], 6)
    return row


def measure_all(budget: GateBudget = BUDGET,
                progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per registered method, in registry order. A method that raises gets a row with
    its `error` and no metrics, so it is reported next to the others instead of ending the run;
    a method module that does not import at all gets one too."""
    data = gate_data(budget)
    rows = [{"method": f"<module {module}>", "error": error}
            for module, error in broken_modules().items()]
    names = list(all_methods())
    for i, name in enumerate(names, 1):
        if progress:
            progress(f"[{i}/{len(names)}] {name}")
        try:
            rows.append({**measure_method(name, data, budget), "error": ""})
        except Exception as exc:  # a failing row of the gate, with its cause
            rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
    return pd.DataFrame(rows, columns=["method", *METRICS, "error"])


@dataclass(frozen=True)
class Change:
    method: str
    metric: str
    baseline: float | None
    current: float | None
    verdict: str
    fails: bool


def _compare_value(method: str, metric: str, old: float, new: float) -> Change | None:
    tol = METRICS[metric]
    diff = new - old
    if diff == 0:
        return None
    if abs(diff) <= tol.margin:
        return Change(method, metric, old, new, f"within tolerance ({tol.margin:g})", False)
    if tol.only_higher_fails:
        if diff > 0:
            return Change(method, metric, old, new, "REGRESSION", True)
        return Change(method, metric, old, new, "improved", False)
    return Change(method, metric, old, new, "CHANGED (must match exactly)", True)


def measurement_failures(current: pd.DataFrame) -> list[Change]:
    """The methods of a `measure_all` table that raised instead of being measured."""
    return [Change(m, "*", None, None, f"FAILED TO MEASURE: {err}", True)
            for m, err in zip(current["method"], current["error"].fillna("")) if err]


def compare(current: pd.DataFrame, baseline: pd.DataFrame) -> list[Change]:
    """Every difference between the measured table and the baseline, each with whether it
    fails the gate: a metric beyond its tolerance, a method that failed to measure, one that
    has no baseline row, a baseline row whose method is no longer registered."""
    missing_cols = [m for m in METRICS if m not in baseline.columns]
    if missing_cols:
        raise ConfigError(f"the baseline lacks the columns {', '.join(missing_cols)}; "
                          f"regenerate it with `bpfree check --update`")
    old = baseline.set_index("method")
    new = current.set_index("method")
    errors = new["error"].fillna("")
    changes = measurement_failures(current)
    changes += [Change(m, "*", None, None, "NOT IN BASELINE (run `bpfree check --update`)", True)
                for m in new.index if m not in old.index and not errors[m]]
    changes += [Change(m, "*", None, None, "NO LONGER REGISTERED (run `bpfree check --update`)",
                       True) for m in old.index if m not in new.index]
    for method in new.index.intersection(old.index):
        if errors[method]:
            continue
        for metric in METRICS:
            change = _compare_value(method, metric, float(old.at[method, metric]),
                                    float(new.at[method, metric]))
            if change is not None:
                changes.append(change)
    return changes


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value != int(value) else f"{int(value):,}"


def _difference(change: Change) -> str:
    """Absolute, and relative for counts: a change of a few bytes reads as -0.0% alone."""
    if change.baseline is None or change.current is None:
        return "-"
    diff = change.current - change.baseline
    if METRICS[change.metric].only_higher_fails:
        return f"{diff:+.4f}"
    relative = f" ({diff / abs(change.baseline):+.1%})" if change.baseline else ""
    return f"{int(diff):+,}{relative}"


def format_changes(changes: list[Change]) -> str:
    """A plain-text table of what changed, failures first."""
    rows = [("method", "metric", "baseline", "current", "change", "verdict")]
    for c in sorted(changes, key=lambda c: (not c.fails, c.method, c.metric)):
        rows.append((c.method, c.metric, _fmt(c.baseline), _fmt(c.current), _difference(c), c.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def read_baseline(path: Path) -> pd.DataFrame:
    """The baseline table, checked: one ConfigError naming the file and what is wrong."""
    try:
        table = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"{path}: not a baseline CSV ({str(exc).strip().splitlines()[0]}); "
                          f"regenerate it with `bpfree check --update --baseline {path}`") from None
    missing = [c for c in ("method", *METRICS) if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: the baseline lacks the column(s) {', '.join(missing)}; "
                          f"regenerate it with `bpfree check --update --baseline {path}`")
    bad = [c for c in METRICS
           if (pd.to_numeric(table[c], errors="coerce").isna() & table[c].notna()).any()]
    if bad:
        raise ConfigError(f"{path}: column(s) {', '.join(bad)} hold non-numbers; regenerate it "
                          f"with `bpfree check --update --baseline {path}`")
    return table


def run_check(baseline_path: Path = BASELINE, update: bool = False) -> int:
    """Measure, compare with the baseline and print what changed; 0 passes, 1 fails the gate.
    With `update`, write the measurements as the new baseline (unless a method failed)."""
    if not update and not baseline_path.is_file():
        raise ConfigError(f"baseline {baseline_path} not found; create it with "
                          f"`bpfree check --update --baseline {baseline_path}`")
    # Read before the minutes of measuring: a bad file is reported at once.
    baseline = read_baseline(baseline_path) if baseline_path.is_file() else None
    if update:
        try:
            baseline_path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(baseline_path.parent, os.W_OK):
                raise PermissionError
        except OSError:
            raise ConfigError(f"cannot write the baseline to {baseline_path}; pass a writable "
                              f"--baseline PATH") from None
    print(f"bpfree check: measuring {len(all_methods())} method(s) on CPU, {asdict(BUDGET)}",
          flush=True)
    current = measure_all(progress=lambda line: print(f"bpfree check: {line}", flush=True))
    if baseline is not None:
        changes = compare(current, baseline)
    else:  # the first --update: nothing to compare with
        changes = measurement_failures(current)
    if changes:
        print(format_changes(changes))
    failed = [c for c in changes if c.fails]
    if update and not measurement_failures(current):
        write_csv(baseline_path, current.drop(columns="error"))
        print(f"bpfree check: wrote {len(current)} method(s) to {baseline_path}; commit it "
              f"with the change that explains its diff")
        return 0
    if failed:
        print(f"bpfree check: FAILED, {len(failed)} problem(s) against {baseline_path}"
              + ("; baseline NOT updated" if update else ""))
        return 1
    print(f"bpfree check: passed, {len(current)} method(s) x {len(METRICS)} metrics "
          f"against {baseline_path}")
    return 0
