"""Read run folders for a report, checking every file so a bad one is named, not guessed at.

A unit's status comes from `bpfree.records.read_unit`, the harness's own reader; this module
adds what a report needs on top: every record file checked, the configuration of failed and
running units kept (their `unit.json`), and the run folder each unit came from.
Nothing here imports torch or the methods: a report is made from CSV and JSON files alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bpfree.records import (
    SUMMARY_FIELDS,
    RecordsError,
    Status,
    latest_evaluations,
    read_json,
    read_unit,
    unit_dirs,
)

RECORD_COLUMNS = ("unit", "method", "dataset", "seed", "epoch", "test_acc", "cum_time_s",
                  "cum_train_flops")
# What a report reads of `bpfree evaluate`'s RUN_DIR/evaluations.csv.
EVALUATION_COLUMNS = ("unit", "setting", "val_acc", "val_acc_se", "test_acc", "test_acc_se",
                      "inference_runs")


class ReportError(ValueError):
    """A report that cannot be made as asked: one line naming the problem and the fix."""


@dataclass
class Runs:
    """Everything a report reads: per-epoch records, per-unit summaries, per-run provenance."""

    records: pd.DataFrame  # one row per unit x epoch, with a `run` column
    summary: pd.DataFrame  # one row per unit (every status), with a `run` column
    metas: dict[str, dict[str, Any]]  # run folder -> its meta.json
    # one row per unit x inference setting (`bpfree evaluate`), with a `run` column; may be empty
    evaluations: pd.DataFrame = field(default_factory=pd.DataFrame)


def _read_records(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecordsError(f"{path}: corrupt CSV ({str(exc).strip().splitlines()[0]})") from None
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise RecordsError(f"{path}: missing column(s) {', '.join(missing)}: corrupt, or written "
                          f"by an older bpfree")
    for column in ("epoch", "test_acc", "cum_time_s", "cum_train_flops"):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise RecordsError(f"{path}: column {column} holds non-numbers: corrupt")
    return frame


def read_evaluations(run_dir: Path) -> pd.DataFrame:
    """RUN_DIR/evaluations.csv (`bpfree evaluate`), checked; empty where there is none.
    A unit evaluated twice under one setting and number of runs keeps its last row, the
    rule `bpfree evaluate` writes by (older files may hold both)."""
    path = run_dir / "evaluations.csv"
    if not path.is_file():
        return pd.DataFrame()
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecordsError(f"{path}: corrupt CSV ({str(exc).strip().splitlines()[0]}); delete "
                           f"it and run `bpfree evaluate` again") from None
    missing = [c for c in EVALUATION_COLUMNS if c not in frame.columns]
    if missing:
        raise RecordsError(f"{path}: missing column(s) {', '.join(missing)}: corrupt, or written "
                           f"by an older bpfree; delete it and run `bpfree evaluate` again")
    for column in EVALUATION_COLUMNS[2:]:
        if not pd.api.types.is_numeric_dtype(frame[column]) and frame[column].notna().any():
            raise RecordsError(f"{path}: column {column} holds non-numbers: corrupt; delete it "
                               f"and run `bpfree evaluate` again")
    return latest_evaluations(frame).assign(run=str(run_dir))


def _progress(rec: pd.DataFrame | None) -> dict[str, Any]:
    """What an unfinished unit has so far, from its epochs: the same fields a summary has."""
    if rec is None or rec.empty:
        return {"epochs_done": 0}
    last = rec.sort_values("epoch").iloc[-1]
    return {"epochs_done": len(rec), "final_test_acc": last["test_acc"],
            "best_test_acc": rec["test_acc"].max(), "final_train_acc": last.get("train_acc"),
            "final_val_acc": last.get("val_acc")}


def read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(records, summary, meta) of one run folder; a ReportError names any bad file."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} does not exist; pass a folder written by `bpfree run`")
    if not (run_dir / "units").is_dir():
        raise ReportError(f"{run_dir} is not a bpfree run folder (no units/ inside); "
                          f"pass a folder written by `bpfree run`")
    if not (run_dir / "meta.json").is_file():
        raise ReportError(f"{run_dir / 'meta.json'} is missing: not a complete bpfree run folder")
    meta = read_json(run_dir / "meta.json")
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    run_defaults = {"config": "{}", "epochs": spec.get("epochs"),
                    "batch_size": spec.get("batch_size"), "device": meta.get("device")}
    rows, records = [], []
    for unit in unit_dirs(run_dir):
        try:
            row = read_unit(unit, run_defaults)
            rec = _read_records(unit / "records.csv") if (unit / "records.csv").is_file() else None
        except RecordsError as exc:
            raise RecordsError(f"{exc}; to redo the unit, delete {unit} and re-run the "
                               f"`bpfree run` command that made it") from None
        if row is None:
            continue
        if row["status"] in (Status.RUNNING, Status.FAILED):
            row.update(_progress(rec))
        rows.append(row)
        if rec is not None:
            records.append(rec)
    if not rows:
        raise ReportError(f"{run_dir} has no units yet: nothing to report")
    summary = pd.DataFrame(rows).assign(run=str(run_dir))
    rec = pd.concat(records, ignore_index=True).assign(run=str(run_dir)) if records else pd.DataFrame()
    return rec, summary, meta


def load_runs(run_dirs: list[Path]) -> Runs:
    """Merge several run folders; the same unit in two of them is refused, not counted twice."""
    if not run_dirs:
        raise ReportError("no run folder given")
    records, summaries, metas, evaluations = [], [], {}, []
    seen: dict[tuple[Any, ...], Path] = {}
    for run_dir in run_dirs:
        rec, summary, meta = read_run(run_dir)
        for _, row in summary.iterrows():
            key = tuple(row[f] for f in ("unit", "config", "epochs", "batch_size", "device"))
            if key in seen:
                raise ReportError(f"unit {row['unit']} is in both {seen[key]} and {run_dir}: "
                                  f"pass each run folder once")
            seen[key] = run_dir
        records.append(rec)
        summaries.append(summary)
        metas[str(run_dir)] = meta
        evaluations.append(read_evaluations(run_dir))
    summary = pd.concat(summaries, ignore_index=True)
    # Units that never finished (all failed, say) lack the measured fields: add them empty.
    for column in (*SUMMARY_FIELDS, "time_to_target_s", "target_acc", "final_val_acc"):
        if column not in summary:
            summary[column] = float("nan")
    if "error" not in summary:
        summary["error"] = ""
    return Runs(pd.concat(records, ignore_index=True), summary, metas,
                pd.concat(evaluations, ignore_index=True))
