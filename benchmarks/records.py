"""Where measurements live on disk, written so that nothing measured is ever lost.

A run folder (`results/runs/<name>/`) holds:

    meta.json              provenance: command, configuration, git commit, versions, device
    records.csv            one row per method x dataset x seed x epoch (merged from units/)
    summary.csv            one row per method x dataset x seed (merged from units/)
    units/<unit>/          one folder per (method, dataset, seed, hyperparameters) unit:
        records.csv        its epochs so far, rewritten after every epoch
        checkpoint.pt      method state + RNG state after the last finished epoch (resume point)
        summary.json       written last: its presence means the unit is done
        failed.json        the error of a unit that raised; a re-run retries it

Every file is written to a temporary name and renamed into place (atomic on POSIX), so an
interrupted run leaves either the old or the new version, never half a file. Units write only
into their own folder, so several processes (a sweep's workers) can share one run folder.
The columns are documented in docs/records.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

SCHEMA_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result onto `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def unit_dirs(run_dir: Path) -> list[Path]:
    units = run_dir / "units"
    return sorted(p for p in units.iterdir() if p.is_dir()) if units.is_dir() else []


def unit_is_done(unit_dir: Path) -> bool:
    return (unit_dir / "summary.json").is_file()


def collect(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, summary) of every unit in a run folder, finished or not.

    Units still running (or interrupted) contribute their finished epochs to the records and
    a summary row with status `running`, so a report can show partial runs as such.
    """
    records, summaries = [], []
    for unit in unit_dirs(run_dir):
        rec_path = unit / "records.csv"
        if rec_path.is_file():
            records.append(pd.read_csv(rec_path))
        if unit_is_done(unit):
            summaries.append(json.loads((unit / "summary.json").read_text()))
        elif (unit / "failed.json").is_file():
            summaries.append(json.loads((unit / "failed.json").read_text()))
        elif (unit / "unit.json").is_file():
            summaries.append({**json.loads((unit / "unit.json").read_text()), "status": "running"})
    rec = pd.concat(records, ignore_index=True) if records else pd.DataFrame()
    return rec, pd.DataFrame(summaries)


def merge_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rewrite the run-level records.csv and summary.csv from the unit folders."""
    rec, summary = collect(run_dir)
    write_csv(run_dir / "records.csv", rec)
    write_csv(run_dir / "summary.csv", summary)
    return rec, summary
