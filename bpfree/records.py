"""Where measurements live on disk, written so that nothing measured is ever lost.

A run folder (`results/runs/<name>/`) holds:

    meta.json              provenance: command, configuration, git commit, versions, device
    records.csv            one row per method x dataset x seed x epoch (merged from units/)
    summary.csv            one row per method x dataset x seed (merged from units/)
    units/<unit>/          one folder per (method, dataset, seed, hyperparameters) unit:
        unit.json          its identity and budget, written when it starts
        records.csv        its epochs so far, rewritten after every epoch
        checkpoint.pt      method state + RNG state after the last finished epoch (resume point)
        summary.json       written last: its presence means the unit is done
        failed.json        the error of a unit that raised; a re-run retries it

Every file is written to a temporary name, flushed to disk and renamed into place (atomic
on POSIX), so an interrupted run leaves either the old or the new version, never half a
file; files get the permissions of the user's umask, like any other file they write. Units
write only into their own folder, so several processes (a sweep's workers) can share one
run folder. The columns are documented in docs/records.md.

This module is the one reader of a unit's status (`read_unit`), for the harness, sweeps and
reports alike, and it imports no torch, so that reports can be made without it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 1


class Status(str, Enum):
    """A unit's state, as written in its files (the values are the strings on disk)."""

    FINISHED = "finished"  # summary.json: every epoch trained
    DIVERGED = "diverged"  # summary.json: training blew up and stopped; a result, not an error
    FAILED = "failed"  # failed.json: an exception; a re-run retries it
    RUNNING = "running"  # unit.json only: in progress, or interrupted (a re-run resumes it)

    def __str__(self) -> str:
        return self.value

    # Hash like the string on disk, so that "finished" finds Status.FINISHED in a dict or a
    # pandas isin, as it already compares equal to it.
    __hash__ = str.__hash__


# Statuses whose numbers are results (a diverged unit's epochs count up to where it stopped).
COMPLETE = (Status.FINISHED, Status.DIVERGED)


class RecordsError(ValueError):
    """A record file that cannot be used (corrupt, another schema): one line naming it."""


# --- writing -------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, flush the file to disk and rename it onto `path` in one step.

    The temporary file is made with mkstemp (mode 0600) and then given the mode a plain
    `open` would have, 0666 minus the umask, so reports and records can be shared.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda p: frame.to_csv(p, index=False))


# --- reading -------------------------------------------------------------------------------

IDENTITY_FIELDS = ("unit", "method", "dataset", "seed", "config", "epochs", "batch_size", "device")
SUMMARY_FIELDS = (*IDENTITY_FIELDS, "status", "epochs_done", "final_test_acc", "best_test_acc",
                  "final_train_acc", "time_per_epoch_s", "throughput_img_s", "params",
                  "flops_train_step", "flops_predict", "act_bytes_peak", "peak_mem_bytes",
                  "peak_mem_kind")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; RecordsError names the file if it is not one."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise RecordsError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise RecordsError(f"{path}: corrupt, expected a JSON object")
    return obj


def _require(path: Path, obj: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Check the schema version first: an older schema explains missing fields best."""
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION:
        found = "has no schema field (an older bpfree)" if schema is None else f"has schema {schema}"
        raise RecordsError(f"{path} {found}, but this bpfree reads records schema {SCHEMA_VERSION}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise RecordsError(f"{path}: corrupt, missing {', '.join(missing)}")


def unit_dirs(run_dir: Path) -> list[Path]:
    units = run_dir / "units"
    return sorted(p for p in units.iterdir() if p.is_dir()) if units.is_dir() else []


def unit_is_done(unit_dir: Path) -> bool:
    """Whether the unit wrote its summary (finished or diverged); checked, not just present."""
    row = read_unit(unit_dir)
    return row is not None and row["status"] in COMPLETE


def read_unit(unit: Path, run_defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The unit's row with its `status` (a `Status` value), or None for a folder that holds
    none of its files yet. The one place that decides a unit's status:

    - summary.json: its status (finished or diverged), every summary field checked;
    - failed.json: failed, with the error (a unit that failed before writing unit.json, say
      because its method no longer imports, takes its budget from `run_defaults`);
    - unit.json alone: running (in progress or interrupted).
    """
    if (unit / "summary.json").is_file():
        row = read_json(unit / "summary.json")
        _require(unit / "summary.json", row, SUMMARY_FIELDS)
        if row["status"] not in (Status.FINISHED, Status.DIVERGED):
            raise RecordsError(f"{unit / 'summary.json'}: unknown status {row['status']!r}")
        return row
    failed = read_json(unit / "failed.json") if (unit / "failed.json").is_file() else None
    if (unit / "unit.json").is_file():
        row = read_json(unit / "unit.json")
        _require(unit / "unit.json", row, IDENTITY_FIELDS)
    elif failed is not None:
        row = {**(run_defaults or {}), **failed, "schema": SCHEMA_VERSION}
        _require(unit / "failed.json", row, IDENTITY_FIELDS)
    else:
        return None
    if failed is not None:
        return {**row, "status": Status.FAILED.value,
                "error": str(failed.get("error", "unknown error"))}
    return {**row, "status": Status.RUNNING.value}


def collect(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, summary) of every unit in a run folder, finished or not: unfinished units
    contribute their finished epochs and a summary row with their status."""
    records, summaries = [], []
    for unit in unit_dirs(run_dir):
        rec_path = unit / "records.csv"
        if rec_path.is_file():
            records.append(pd.read_csv(rec_path))
        row = read_unit(unit)
        if row is not None:
            summaries.append(row)
    rec = pd.concat(records, ignore_index=True) if records else pd.DataFrame()
    return rec, pd.DataFrame(summaries)


def start_run(run_dir: Path, spec: dict[str, Any], command: str, environment: dict[str, Any],
              budget_keys: tuple[str, ...], defaults: dict[str, Any] | None = None,
              invocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create a run folder's meta.json, or check it and record the resume: the one writer of
    meta.json, for runs and sweeps alike.

    - A folder that exists, holds files and has no meta.json is not a bpfree run: refused, so
      a user's own files are never overwritten.
    - On resume, every key of `budget_keys` must be what the folder was made with: a unit
      trained with one budget and resumed with another would be neither. The other keys of
      the spec may change (more methods or seeds are more units) and are updated. A key the
      recorded spec lacks (an older bpfree) counts as its value in `defaults`.
    - `invocation` holds what may differ on every invocation (a sweep's executor), recorded
      as the latest.
    """
    meta_path = run_dir / "meta.json"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if meta_path.is_file():
        meta = read_json(meta_path)
        old = meta.get("spec", {})
        for key in budget_keys:
            before = old.get(key, (defaults or {}).get(key))
            if before != spec.get(key):
                raise RecordsError(
                    f"{run_dir} was made with {key}={before!r}, this command says "
                    f"{spec.get(key)!r}; pass another --out DIR (a folder holds one budget)")
        meta["spec"] = spec
        meta.setdefault("resumed", []).append(now)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise RecordsError(f"{run_dir} holds files but is not a bpfree run (no meta.json); "
                           f"pass an empty or new --out DIR")
    else:
        meta = {"command": command, "spec": spec, "started": now, "resumed": [], **environment}
    meta.update(invocation or {})
    write_json(meta_path, meta)
    return meta


def merge_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rewrite the run-level records.csv and summary.csv from the unit folders."""
    rec, summary = collect(run_dir)
    write_csv(run_dir / "records.csv", rec)
    write_csv(run_dir / "summary.csv", summary)
    return rec, summary
