"""Aggregate per-seed summaries into comparison tables, and render them as Markdown."""

from __future__ import annotations

import math

import pandas as pd


def mean_std(values: pd.Series) -> str:
    """`mean ± std` in percent over seeds; the std is left out for a single seed."""
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{100 * values.iloc[0]:.2f}"
    return f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}"


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes), NaN -> '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per method x dataset: accuracy over seeds and the cost of the first seed's unit."""
    rows = []
    for (method, dataset), group in summary.groupby(["method", "dataset"], sort=True):
        done = group[group["status"].isin(["finished", "diverged"])] if "status" in group else group
        statuses = ", ".join(sorted(set(group.get("status", pd.Series(["?"])))))
        rows.append(
            {
                "method": method,
                "dataset": dataset,
                "n": len(done),
                "test acc % (final)": mean_std(done.get("final_test_acc", pd.Series(dtype=float))),
                "train acc %": mean_std(done.get("final_train_acc", pd.Series(dtype=float))),
                "s/epoch": human(done["time_per_epoch_s"].mean()) if "time_per_epoch_s" in done else "-",
                "img/s": human(done["throughput_img_s"].mean()) if "throughput_img_s" in done else "-",
                "params": human(done["params"].mean()) if "params" in done else "-",
                "FLOPs/step": human(done["flops_train_step"].mean()) if "flops_train_step" in done else "-",
                "act. bytes": human(done["act_bytes_peak"].mean(), "B") if "act_bytes_peak" in done else "-",
                "status": statuses,
            }
        )
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-renderable pipe table (no optional dependency needed)."""
    if frame.empty:
        return "_no rows_\n"
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"
