"""`bpfree report`: read one or more run folders and write the comparison report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.records import collect
from methods import ConfigError
from reports.tables import summary_table, to_markdown


def load_runs(run_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merged (records, summary) of several run folders; a clear error for a bad folder."""
    records, summaries = [], []
    for run_dir in run_dirs:
        if not (run_dir / "units").is_dir():
            raise ConfigError(f"{run_dir} is not a bpfree run folder (no units/ inside); "
                              f"pass a folder written by `bpfree run`")
        rec, summary = collect(run_dir)
        records.append(rec)
        summaries.append(summary)
    return pd.concat(records, ignore_index=True), pd.concat(summaries, ignore_index=True)


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> tuple[Path, str]:
    """Write report.md; returns its path and its text."""
    _, summary = load_runs(run_dirs)
    out_dir = out_dir or run_dirs[0] / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "# bpfree report\n\n" + to_markdown(summary_table(summary))
    path = out_dir / "report.md"
    path.write_text(text)
    return path, text
