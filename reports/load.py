"""Read run folders for a report, checking every file so a bad one is named, not guessed at.

`benchmarks.records.collect` is the harness's own merge; a report needs more: it must say
which file is corrupt or from an older schema, keep the configuration of failed and running
units (their `unit.json`), and remember which run folder each unit came from. So this module
reads the unit folders itself, with the same rules `collect` uses to decide a unit's status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.records import SCHEMA_VERSION, unit_dirs, unit_is_done
from methods import ConfigError

RECORD_COLUMNS = ("unit", "method", "dataset", "seed", "epoch", "test_acc", "cum_time_s",
                  "cum_train_flops")
IDENTITY_FIELDS = ("unit", "method", "dataset", "seed", "config", "epochs", "batch_size", "device")
SUMMARY_FIELDS = (*IDENTITY_FIELDS, "status", "epochs_done", "final_test_acc", "best_test_acc",
                  "final_train_acc", "time_per_epoch_s", "throughput_img_s", "params",
                  "flops_train_step", "flops_predict", "act_bytes_peak", "peak_mem_bytes",
                  "peak_mem_kind")
STATUSES = ("finished", "diverged", "failed", "running")


@dataclass
class Runs:
    """Everything a report reads: per-epoch records, per-unit summaries, per-run provenance."""

    records: pd.DataFrame  # one row per unit x epoch, with a `run` column
    summary: pd.DataFrame  # one row per unit (every status), with a `run` column
    metas: dict[str, dict[str, Any]]  # run folder -> its meta.json


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: corrupt, expected a JSON object")
    return obj


def _require(path: Path, obj: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Check the schema version first: an older schema explains missing fields best."""
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        found = "has no schema field (an older bpfree)" if schema is None else f"has schema {schema}"
        raise ConfigError(f"{path} {found}, but this bpfree reads records schema {SCHEMA_VERSION}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise ConfigError(f"{path}: corrupt, missing {', '.join(missing)}")


def _read_records(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"{path}: corrupt CSV ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}: corrupt, or written "
                          f"by an older bpfree")
    for column in ("epoch", "test_acc", "cum_time_s", "cum_train_flops"):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ConfigError(f"{path}: column {column} holds non-numbers: corrupt")
    return frame


def _read_unit(unit: Path, run_defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The unit's summary row (status included), or None for a folder not yet written to.

    A unit that failed before writing unit.json (say, its method no longer imports) has only
    failed.json: its budget then comes from the run's spec (`run_defaults`) and its config is
    unknown, so that it is still listed as failed rather than lost.
    """
    if unit_is_done(unit):
        row = _read_json(unit / "summary.json")
        _require(unit / "summary.json", row, SUMMARY_FIELDS)
        if row["status"] not in STATUSES:
            raise ConfigError(f"{unit / 'summary.json'}: unknown status {row['status']!r}")
        return row
    failed = _read_json(unit / "failed.json") if (unit / "failed.json").is_file() else None
    if (unit / "unit.json").is_file():
        row = _read_json(unit / "unit.json")
        _require(unit / "unit.json", row, IDENTITY_FIELDS)
    elif failed is not None:
        row = {**run_defaults, **failed, "schema": SCHEMA_VERSION}
        _require(unit / "failed.json", row, IDENTITY_FIELDS)
    else:
        return None
    if failed is not None:
        return {**row, "status": "failed", "error": str(failed.get("error", "unknown error"))}
    return {**row, "status": "running"}


def _progress(rec: pd.DataFrame | None) -> dict[str, Any]:
    """What an unfinished unit has so far, from its epochs: the same fields a summary has."""
    if rec is None or rec.empty:
        return {"epochs_done": 0}
    last = rec.sort_values("epoch").iloc[-1]
    return {"epochs_done": len(rec), "final_test_acc": last["test_acc"],
            "best_test_acc": rec["test_acc"].max(), "final_train_acc": last.get("train_acc"),
            "final_val_acc": last.get("val_acc")}


def read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(records, summary, meta) of one run folder; a ConfigError names any bad file."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} does not exist; pass a folder written by `bpfree run`")
    if not (run_dir / "units").is_dir():
        raise ConfigError(f"{run_dir} is not a bpfree run folder (no units/ inside); "
                          f"pass a folder written by `bpfree run`")
    if not (run_dir / "meta.json").is_file():
        raise ConfigError(f"{run_dir / 'meta.json'} is missing: not a complete bpfree run folder")
    meta = _read_json(run_dir / "meta.json")
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    run_defaults = {"config": "{}", "epochs": spec.get("epochs"),
                    "batch_size": spec.get("batch_size"), "device": meta.get("device")}
    rows, records = [], []
    for unit in unit_dirs(run_dir):
        try:
            row = _read_unit(unit, run_defaults)
            rec = _read_records(unit / "records.csv") if (unit / "records.csv").is_file() else None
        except ConfigError as exc:
            raise ConfigError(f"{exc}; to redo the unit, delete {unit} and re-run the "
                              f"`bpfree run` command that made it") from None
        if row is None:
            continue
        if row["status"] in ("running", "failed"):
            row.update(_progress(rec))
        rows.append(row)
        if rec is not None:
            records.append(rec)
    if not rows:
        raise ConfigError(f"{run_dir} has no units yet: nothing to report")
    summary = pd.DataFrame(rows).assign(run=str(run_dir))
    rec = pd.concat(records, ignore_index=True).assign(run=str(run_dir)) if records else pd.DataFrame()
    return rec, summary, meta


def load_runs(run_dirs: list[Path]) -> Runs:
    """Merge several run folders; the same unit in two of them is refused, not counted twice."""
    if not run_dirs:
        raise ConfigError("no run folder given")
    records, summaries, metas = [], [], {}
    seen: dict[tuple[Any, ...], Path] = {}
    for run_dir in run_dirs:
        rec, summary, meta = read_run(run_dir)
        for _, row in summary.iterrows():
            key = tuple(row[f] for f in ("unit", "config", "epochs", "batch_size", "device"))
            if key in seen:
                raise ConfigError(f"unit {row['unit']} is in both {seen[key]} and {run_dir}: "
                                  f"pass each run folder once")
            seen[key] = run_dir
        records.append(rec)
        summaries.append(summary)
        metas[str(run_dir)] = meta
    summary = pd.concat(summaries, ignore_index=True)
    # Units that never finished (all failed, say) lack the measured fields: add them empty.
    for column in (*SUMMARY_FIELDS, "time_to_target_s", "target_acc", "final_val_acc"):
        if column not in summary:
            summary[column] = float("nan")
    if "error" not in summary:
        summary["error"] = ""
    return Runs(pd.concat(records, ignore_index=True), summary, metas)
