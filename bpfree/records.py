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
        .lock              held (flock) by the process training the unit

Every file is written to a temporary name, flushed to disk and renamed into place (atomic
on POSIX), so an interrupted run leaves either the old or the new version, never half a
file; files get the permissions of the user's umask, like any other file they write. A
temporary left by a kill between write and rename is removed when its unit next starts.
Units write only into their own folder, and a process trains a unit only while it holds the
unit's lock, so several processes (a sweep's workers, two `bpfree run`s) can share one run
folder without training a unit twice; meta.json is rewritten under the run folder's lock.
The columns are documented in docs/records.md; locks and safe loading in its last sections.

This module is the one reader of a unit's status (`read_unit`), for the harness, sweeps and
reports alike, and it imports no torch, so that reports can be made without it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """A record file that cannot be used (corrupt, another schema, unwritable): one line
    naming it and what to do."""


class LockHeld(Exception):
    """Another process holds a lock: `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


# --- writing -------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, flush the file to disk and rename it onto `path` in one step.

    The temporary file is made with mkstemp (mode 0600) and then given the mode a plain
    `open` would have, 0666 minus the umask, so reports and records can be shared.
    A failure to write (disk full, read-only or vanished folder) is a RecordsError naming
    the file: nothing was replaced, and the same command resumes once it is fixed.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise RecordsError(f"cannot write {path} ({_reason(exc)}); {_fix(exc)}, then run "
                               f"the same command again (what was written is kept)") from None
        raise


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _fix(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    return "make the folder writable or pass a writable --out DIR"


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


# What identifies a row of RUN_DIR/evaluations.csv (`bpfree evaluate`): a unit evaluated again
# under the same setting and number of runs is the same (seeded) measurement.
EVALUATION_KEY = ("unit", "setting", "inference_runs")


def latest_evaluations(frame: pd.DataFrame) -> pd.DataFrame:
    """evaluations.csv's rows with each evaluation once: its last row."""
    return frame.drop_duplicates(list(EVALUATION_KEY), keep="last", ignore_index=True)


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


# --- locks, temporaries and output folders -----------------------------------------------

LOCK_NAME = ".lock"  # in a unit folder: its trainer; in a run folder: meta.json's writer
DRIVER_LOCK_NAME = ".driver.lock"  # in a sweep folder: the one driver running it
# The files the harness writes into a unit folder: their stale temporaries are removed when
# the unit starts (only the holder of the unit's lock writes them, so none is in use).
UNIT_FILES = ("unit.json", "records.csv", "checkpoint.pt", "summary.json", "model.pt")
# Names bpfree itself may leave in an output folder before its meta.json exists.
_OWN_NAMES = re.compile(r"\.(lock|driver\.lock|write-test\.\d+|meta\.json\..+\.tmp)")


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextmanager
def exclusive(path: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block.

    `wait_s`: None waits as long as it takes; 0 tries once; otherwise polls that long. A lock
    still held then raises LockHeld. The lock is `flock` on an open file description, so it
    is released when the holder exits or is killed, whatever the way, and it excludes other
    processes, and other opens in the same process, alike. It works on local filesystems and
    on NFSv4 (where Linux maps it to a POSIX byte-range lock); docs/records.md says more.
    The holder writes its pid and host into the file, for the messages of those who wait.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RecordsError(f"cannot write {path} ({_reason(exc)}); {_fix(exc)}") from None
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait_s is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    raise LockHeld(path, _holder(path)) from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the note
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(unit_dir: Path) -> list[Path]:
    """Delete the temporaries a kill between write and rename left in a unit folder (call it
    only while holding the unit's lock); returns what was removed."""
    removed = []
    for name in UNIT_FILES:
        for tmp in unit_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _foreign(run_dir: Path) -> list[str]:
    """The entries of a folder that bpfree did not put there (empty for a bpfree run)."""
    if (run_dir / "meta.json").is_file() or not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if not _OWN_NAMES.fullmatch(p.name))


def prepare_out(run_dir: Path) -> None:
    """Make sure `run_dir` can become (or is) a run folder: not a folder of someone else's
    files, and writable. Checked before anything is written, so a refused folder is left as
    it was."""
    foreign = _foreign(run_dir)
    if foreign:
        raise RecordsError(f"{run_dir} holds files but is not a bpfree run (no meta.json; "
                           f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                           f"pass an empty or new --out DIR")
    probe = run_dir / f".write-test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecordsError(f"cannot write to {run_dir} ({_reason(exc)}); pass a writable "
                           f"--out DIR") from None


def _differ(key: str, before: Any, now: Any) -> str:
    if key == "data":
        return (f"was made on other data (fingerprint {before}, now {now}: other files, or "
                f"another split of them)")
    return f"was made with {key}={before!r}, this command says {now!r}"


def start_run(run_dir: Path, spec: dict[str, Any], command: str, environment: dict[str, Any],
              budget_keys: tuple[str, ...], defaults: dict[str, Any] | None = None,
              invocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create a run folder's meta.json, or check it and record the resume: the one writer of
    meta.json, for runs and sweeps alike, under the run folder's lock (two processes starting
    on one folder at once make one meta.json, and the second resumes it).

    - A folder that exists, holds files and has no meta.json is not a bpfree run: refused, so
      a user's own files are never overwritten.
    - On resume, every key of `budget_keys` must be what the folder was made with: a unit
      trained with one budget and resumed with another would be neither. The other keys of
      the spec may change (more methods or seeds are more units) and are updated. A key the
      recorded spec lacks (an older bpfree) counts as its value in `defaults`.
    - `invocation` holds what may differ on every invocation (a sweep's executor), recorded
      as the latest.
    """
    prepare_out(run_dir)
    meta_path = run_dir / "meta.json"
    with exclusive(run_dir / LOCK_NAME):
        prepare_out(run_dir)  # again, now that no other bpfree can be writing here
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if meta_path.is_file():
            meta = read_json(meta_path)
            old = meta.get("spec", {})
            for key in budget_keys:
                before = old.get(key, (defaults or {}).get(key))
                if before != spec.get(key):
                    raise RecordsError(
                        f"{run_dir} {_differ(key, before, spec.get(key))}; pass another --out "
                        f"DIR (a folder holds one budget: docs/records.md)")
            meta["spec"] = spec
            meta.setdefault("resumed", []).append(now)
        else:
            meta = {"command": command, "spec": spec, "started": now, "resumed": [],
                    **environment}
        meta.update(invocation or {})
        write_json(meta_path, meta)
    return meta


def merge_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rewrite the run-level records.csv and summary.csv from the unit folders."""
    rec, summary = collect(run_dir)
    write_csv(run_dir / "records.csv", rec)
    write_csv(run_dir / "summary.csv", summary)
    return rec, summary
