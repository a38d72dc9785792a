"""Where the numbers came from: one row per run from its meta.json, and warnings when the
runs merged into one report were made under conditions that change what a number means."""

from __future__ import annotations

from typing import Any

from .display import Cell, Table

# (meta.json field, what a difference means); device and versions change timings, numerics.
COMPARED = ((("device", "device_name"), "device"), (("torch",), "torch version"),
            (("cuda",), "CUDA version"), (("python",), "Python version"))


def table(metas: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for run, meta in metas.items():
        dates = meta.get("started", "?")
        if meta.get("resumed"):
            dates += f" (resumed {', '.join(meta['resumed'])})"
        versions = f"Python {meta.get('python', '?')}, torch {meta.get('torch', '?')}"
        if meta.get("cuda"):
            versions += f", CUDA {meta['cuda']}"
        device = f"{meta.get('device', '?')} ({meta.get('device_name', '?')}, " \
                 f"{meta.get('torch_threads', '?')} threads of {meta.get('cpu_count', '?')} CPUs)"
        commit = str(meta.get("git_commit", "?"))
        if meta.get("code_digest"):
            commit += f" (code {meta['code_digest']})"
        rows.append([Cell(run), Cell(meta.get("command", "?")), Cell(dates),
                     Cell(commit), Cell(device), Cell(versions)])
    columns = ["run folder", "command", "started (UTC)", "commit", "device", "versions"]
    dirty = any(str(meta.get("git_commit", "")).endswith("-dirty") for meta in metas.values())
    notes = (["A commit ending in -dirty was run from a tree with uncommitted changes; the code "
              "digest in brackets names the code itself: `python -m bpfree.version DIR` prints "
              "that of the checkout at DIR, to find the commit it matches."] if dirty else [])
    return Table("runs", "Runs", columns, rows, notes)


def warnings(metas: dict[str, dict[str, Any]]) -> list[str]:
    """One line per setting that differs between the merged runs."""
    lines = []
    for fields, meaning in COMPARED:
        values = {run: " ".join(str(meta.get(f)) for f in fields) for run, meta in metas.items()}
        if len(set(values.values())) > 1:
            found = "; ".join(f"{v} ({run})" for run, v in values.items())
            lines.append(f"The merged runs differ in {meaning}: {found}. Timings and memory "
                         f"are not comparable across them.")
    commits = {meta.get("git_commit") for meta in metas.values()}
    if len(commits) > 1:
        lines.append(f"The merged runs come from different commits ({', '.join(sorted(map(str, commits)))}): "
                     f"methods may have changed between them.")
    return lines
