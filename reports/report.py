"""`bpfree report`: read one or more run folders and write the comparison report.

Output (in `out_dir`, by default `RUN_DIR/report/` for a single run):
    report.md      GitHub-renderable, with the plots beside it as <plot>.png
    index.html     one self-contained page (style and plots inline, no network)
    tables.tex     booktabs tables for a paper
    accuracy.csv, cost.csv, published_comparison.csv, published_other_setups.csv
                   the aggregated tables as numbers (and inference_settings.csv where a
                   run folder holds `bpfree evaluate`'s evaluations.csv)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from bpfree.records import atomic_write, write_csv, write_text
from bpfree.version import code_version

from . import display, plots, provenance, render
from .load import ReportError, load_runs
from .published import compare, read_published
from .tables import (
    accuracy_table,
    assign_variants,
    cost_table,
    evaluation_table,
    failures,
    fill_networks,
)

FORMATS = ("md", "html", "tex", "csv")
Describe = Callable[[str, str], dict[str, str]]


def parse_formats(text: str) -> tuple[str, ...]:
    """`md,html` -> ('md', 'html'); unknown names are a user mistake."""
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ReportError(f"--formats {text!r}: choose from {','.join(FORMATS)} (comma-separated)")
    return formats


def build(run_dirs: list[Path], describe: Describe | None = None
          ) -> tuple[render.Document, dict[str, pd.DataFrame], pd.DataFrame, pd.DataFrame]:
    """The report's document, its CSV frames, and the records and summary the plots draw.

    `describe(method, config JSON) -> {"network", "schedule"}` derives what records written
    before bpfree recorded networks lack (`tables.fill_networks`); the CLI passes one that
    knows the methods, so that this module needs neither them nor torch. Without it, such
    units have no network and no backprop twin."""
    runs = load_runs(run_dirs)
    summary, derived = (fill_networks(runs.summary, describe) if describe is not None
                        else (runs.summary, 0))
    summary = assign_variants(summary)
    records = runs.records
    if len(records):
        records = records.merge(summary[["run", "unit", "variant"]], on=["run", "unit"], how="inner")
        records = records.sort_values(["dataset", "method", "variant", "seed", "epoch"], kind="stable")
    acc, cost = accuracy_table(summary), cost_table(summary)
    settings = evaluation_table(runs.evaluations, summary)
    ours = acc.merge(cost[[c for c in cost.columns if c not in acc or c in ("dataset", "variant")]],
                     on=["dataset", "variant"])
    comparison, other, absent = compare(ours, read_published())
    datasets = sorted(set(summary["dataset"]))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"Generated {now} by bpfree {code_version()} from {len(run_dirs)} run "
             f"folder(s): {len(summary)} unit(s), {summary['variant'].nunique()} method "
             f"configuration(s), dataset(s) {', '.join(datasets)}.")
    doc = render.Document(
        title="bpfree report",
        intro=intro,
        warnings=provenance.warnings(runs.metas),
        runs=provenance.table(runs.metas),
        tables=[display.accuracy(acc, derived),
                *([display.evaluations(settings)] if len(settings) else []),
                display.cost_ratio(cost), display.cost(cost),
                display.published(comparison, absent, datasets, len(other)),
                display.published_other(other)],
        failures=display.failures(failures(summary)),
        figures=[],
    )
    frames = {"accuracy": acc, "cost": cost, "published_comparison": comparison,
              "published_other_setups": other,
              **({"inference_settings": settings} if len(settings) else {})}
    return doc, frames, records, summary


def write_report(run_dirs: list[Path], out_dir: Path | None = None,
                 formats: tuple[str, ...] = FORMATS, describe: Describe | None = None
                 ) -> tuple[Path, str]:
    """Write the report in `formats`; returns the main file's path and the Markdown text.
    `describe`: as for `build`."""
    if out_dir is None:
        if len(run_dirs) != 1:
            raise ReportError("several run folders are merged into one report: pass --out DIR")
        out_dir = run_dirs[0] / "report"
    doc, frames, records, summary = build(run_dirs, describe)
    if "md" in formats or "html" in formats:
        doc.figures = [(p.key, p.title, plots.render(p, records, summary))
                       for p in plots.PLOTS if p.applies(records)]
    text = render.markdown(doc)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot write to {out_dir} ({exc.strerror}); pass a writable --out DIR") from None
    written = []
    if "md" in formats:
        for key, _, png in doc.figures:
            atomic_write(out_dir / f"{key}.png", lambda path, png=png: path.write_bytes(png))
        write_text(out_dir / "report.md", text)
        written.append(out_dir / "report.md")
    if "html" in formats:
        write_text(out_dir / "index.html", render.html_page(doc))
        written.append(out_dir / "index.html")
    if "tex" in formats:
        write_text(out_dir / "tables.tex", render.latex(doc))
        written.append(out_dir / "tables.tex")
    if "csv" in formats:
        for name, frame in frames.items():
            write_csv(out_dir / f"{name}.csv", frame)
            written.append(out_dir / f"{name}.csv")
    return written[0], text
