"""Published numbers next to ours: read results/published/published.csv (shipped as package
data of `bpfree.results`) and join on it, only where the setups match.

The CSV holds what the papers printed, unconverted (accuracy or error in %, memory in GB), one
row per number, with columns source, table, method, dataset, metric, value, std, network,
epochs, schedule, note. `method` is a bpfree method name, optionally followed by
space-separated `key=value` settings the configuration must have, e.g.
`noprop-dt embedding=learned embed_dim=20` (the paper's "dim20"). Methods bpfree does not
implement keep the paper's name (`adjoint`, `sdtp`); they are listed, not joined.

`network` is the network the number was measured on, in bpfree's ids where bpfree can train
it (`mlp-2x256-relu`, `cnn`, `noprop-dt-T10-one-hot`, see `Method.network_of`) and in the
paper's terms otherwise (`localmixer-S/1/1`, `mlp-5x256-tanh`), or `unknown`; `epochs` the
training epochs the paper states (empty if it does not); `schedule` how the method
interleaved its losses where that varies (`parallel`, `alternating`), else empty.

A published row is *joined* to one of our variants, and a difference computed, only when the
setups match: same dataset, method and settings, same network (never `unknown`), the same
schedule where the paper names one, and, for accuracies, the same number of epochs (a memory
peak does not depend on them). Every other published row of a method we ran on that dataset
goes to the "other setups" table with the reason, never next to a difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from .load import ReportError
from .tables import STATUS_LABELS

# Shipped with the package (bpfree.results), so a wheel has it too.
PUBLISHED_CSV = Path(str(files("bpfree.results") / "published" / "published.csv"))
COLUMNS = ("source", "table", "method", "dataset", "metric", "value", "std", "network", "epochs",
           "schedule", "note")
UNKNOWN = "unknown"  # a network the paper does not state, or that could not be traced


@dataclass(frozen=True)
class Metric:
    """How a published metric compares with ours: which of our columns, and in what unit."""

    label: str
    ours: Callable[[pd.Series], tuple[float, float]]  # our row -> (mean, std) in that unit
    published: Callable[[float], float]  # the printed value -> the same unit
    per_training: bool = True  # depends on how long it trained: epochs must match


def _percent(column: str) -> Callable[[pd.Series], tuple[float, float]]:
    """Our mean and spread in percent, the spread as every table shows it
    (`tables.accuracy_table`: s.e. over runs x seeds for sampled predictions, else std)."""
    def ours(row: pd.Series) -> tuple[float, float]:
        return 100 * row[f"{column}_mean"], 100 * row[f"{column}_spread"]
    return ours


def _gpu_gb(row: pd.Series) -> tuple[float, float]:
    """Our peak memory in GB (1e9 bytes), only when measured by the CUDA allocator: a CPU
    live-tensor peak is a different quantity."""
    gb = row["peak_mem_bytes"] / 1e9 if row["peak_mem_kind"] == "cuda-allocator" else float("nan")
    return gb, float("nan")


METRICS: dict[str, Metric] = {
    "test_acc": Metric("test acc %", _percent("final_test_acc"), lambda v: v),
    "train_acc": Metric("train acc %", _percent("final_train_acc"), lambda v: v),
    "test_err": Metric("test acc % (100 - error)", _percent("final_test_acc"), lambda v: 100 - v),
    "peak_gpu_mem_gb": Metric("peak GPU memory GB", _gpu_gb, lambda v: v, per_training=False),
}


def read_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The published numbers, checked: a bad file is named with its problem."""
    try:
        table = pd.read_csv(path, dtype={"table": str, "note": str, "network": str,
                                         "schedule": str},
                            keep_default_na=False,
                            na_values={"value": [""], "std": [""], "epochs": [""]})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReportError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(table["metric"]) - set(METRICS))
    if unknown:
        raise ReportError(f"{path}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    for column in ("value", "std", "epochs"):
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise ReportError(f"{path}: column {column} holds non-numbers")
    if (table["network"] == "").any():
        rows = ", ".join(str(i + 2) for i in table.index[table["network"] == ""])
        raise ReportError(f"{path}: empty network on line(s) {rows}; write `{UNKNOWN}` where "
                          f"the paper does not state it")
    return table


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """`noprop-dt embedding=learned embed_dim=20` -> ('noprop-dt', {'embedding': 'learned',
    'embed_dim': 20}); values are read as JSON where they parse, else kept as strings."""
    name, *settings = spec.split()
    wanted = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        try:
            wanted[key] = json.loads(value)
        except json.JSONDecodeError:
            wanted[key] = value
    return name, wanted


def _matches(config: str, wanted: dict[str, Any]) -> bool:
    settings = json.loads(config) if isinstance(config, str) else {}
    return all(key in settings and settings[key] == value for key, value in wanted.items())


def mismatch(pub: Any, wanted: dict[str, Any], row: pd.Series) -> str:
    """Why published row `pub` does not describe our variant `row`, or "" if the setups match
    (see the module docstring)."""
    if pub.network == UNKNOWN:
        return "network not stated by the source"
    if row["network"] != pub.network:
        return f"network {pub.network} (ours: {row['network'] or 'not recorded'})"
    if pub.schedule and pub.schedule != row.get("schedule", ""):
        return f"schedule {pub.schedule} (ours: {row.get('schedule') or 'none'})"
    if METRICS[pub.metric].per_training:
        if pd.isna(pub.epochs):
            return "epochs not stated by the source"
        if pub.epochs != row["epochs"]:
            return f"{pub.epochs:g} epochs (ours: {row['epochs']:g})"
    if not _matches(row["config"], wanted):
        return "not run with " + " ".join(f"{k}={v}" for k, v in wanted.items())
    return ""


JOINED = ["dataset", "variant", "method", "network", "metric", "ours", "ours_std", "n", "epochs",
          "published", "published_std", "difference", "source", "table", "note"]
OTHER = ["dataset", "method", "network", "epochs", "schedule", "metric", "published",
         "published_std", "reason", "source", "table", "note"]


def compare(ours: pd.DataFrame, published: pd.DataFrame
            ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(joined, other setups, absent): our variants next to the published numbers of the
    same setup; the published numbers of methods we ran whose setup none of our variants
    shares, with the reason; and the published methods this report has no run of.

    `ours` is the accuracy table joined with the cost table (one row per dataset x variant,
    with `config`, `network`, `schedule` and `epochs`). Only datasets we ran appear; the
    difference is ours minus published.
    """
    joined, other, absent = [], [], set()
    for pub in published[published["dataset"].isin(set(ours["dataset"]))].itertuples():
        name, wanted = parse_method(pub.method)
        candidates = ours[(ours["dataset"] == pub.dataset) & (ours["method"] == name)]
        if candidates.empty:
            absent.add(name)
            continue
        metric = METRICS[pub.metric]
        published_value = metric.published(pub.value)
        base = {"dataset": pub.dataset, "method": name, "metric": metric.label,
                "published": published_value, "published_std": pub.std,
                "source": pub.source, "table": pub.table, "note": pub.note}
        reasons = {i: mismatch(pub, wanted, row) for i, row in candidates.iterrows()}
        matched = [i for i, reason in reasons.items() if not reason]
        if not matched:
            why = "; ".join(dict.fromkeys(reasons.values()))
            other.append({**base, "network": pub.network, "epochs": pub.epochs,
                          "schedule": pub.schedule, "reason": why})
        for i in matched:
            row = candidates.loc[i]
            value, std = metric.ours(row)
            variant = row["variant"] + (f" ({STATUS_LABELS['running']})" if row["partial"] else "")
            joined.append({**base, "variant": variant, "network": row["network"], "ours": value,
                           "ours_std": std, "n": row["n"], "epochs": row["epochs"],
                           # an unfinished run has not trained the epochs the source did
                           "difference": float("nan") if row["partial"]
                           else value - published_value})
    return (pd.DataFrame(joined, columns=JOINED), pd.DataFrame(other, columns=OTHER),
            sorted(absent))
