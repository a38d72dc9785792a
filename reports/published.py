"""Published numbers next to ours: read results/published/published.csv (shipped as package
data of `bpfree.results`) and join on it.

The CSV holds what the papers printed, unconverted (accuracy or error in %, memory in GB), one
row per number, with columns source, table, method, dataset, metric, value, std, note.
`method` is a bpfree method name, optionally followed by space-separated `key=value` settings
the configuration must have, e.g. `noprop-dt embedding=learned embed_dim=20` (the paper's
"dim20"). Methods bpfree does not implement keep the paper's name (`adjoint`, `fa`); they are
listed, not joined. A published row joins our rows of the same dataset and method whose
config matches every setting; a row whose setting we never ran is shown with ours empty.
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
COLUMNS = ("source", "table", "method", "dataset", "metric", "value", "std", "note")


@dataclass(frozen=True)
class Metric:
    """How a published metric compares with ours: which of our columns, and in what unit."""

    label: str
    ours: Callable[[pd.Series], tuple[float, float]]  # our row -> (mean, std) in that unit
    published: Callable[[float], float]  # the printed value -> the same unit


def _percent(column: str) -> Callable[[pd.Series], tuple[float, float]]:
    return lambda row: (100 * row[f"{column}_mean"], 100 * row[f"{column}_std"])


def _gpu_gb(row: pd.Series) -> tuple[float, float]:
    """Our peak memory in GB (1e9 bytes), only when measured by the CUDA allocator: a CPU
    live-tensor peak is a different quantity."""
    gb = row["peak_mem_bytes"] / 1e9 if row["peak_mem_kind"] == "cuda-allocator" else float("nan")
    return gb, float("nan")


METRICS: dict[str, Metric] = {
    "test_acc": Metric("test acc %", _percent("final_test_acc"), lambda v: v),
    "train_acc": Metric("train acc %", _percent("final_train_acc"), lambda v: v),
    "test_err": Metric("test acc % (100 - error)", _percent("final_test_acc"), lambda v: 100 - v),
    "peak_gpu_mem_gb": Metric("peak GPU memory GB", _gpu_gb, lambda v: v),
}


def read_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The published numbers, checked: a bad file is named with its problem."""
    try:
        table = pd.read_csv(path, dtype={"table": str, "note": str}, keep_default_na=False,
                            na_values={"value": [""], "std": [""]})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ReportError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(table["metric"]) - set(METRICS))
    if unknown:
        raise ReportError(f"{path}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    for column in ("value", "std"):
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise ReportError(f"{path}: column {column} holds non-numbers")
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


def compare(ours: pd.DataFrame, published: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Our rows next to the published ones, and the published methods bpfree lacks.

    `ours` is the accuracy table joined with the cost table (one row per dataset x variant,
    with `config`). Only datasets we ran appear; the difference is ours minus published.
    """
    rows, absent = [], set()
    for pub in published[published["dataset"].isin(set(ours["dataset"]))].itertuples():
        name, wanted = parse_method(pub.method)
        candidates = ours[(ours["dataset"] == pub.dataset) & (ours["method"] == name)]
        if candidates.empty:
            absent.add(name)
            continue
        metric = METRICS[pub.metric]
        matched = candidates[[_matches(c, wanted) for c in candidates["config"]]]
        published_value = metric.published(pub.value)
        base = {"dataset": pub.dataset, "method": name, "metric": metric.label,
                "published": published_value, "published_std": pub.std,
                "source": pub.source, "table": pub.table, "note": pub.note}
        if matched.empty:
            missing = " ".join(f"{k}={v}" for k, v in wanted.items())
            rows.append({**base, "variant": f"not run with {missing}", "ours": float("nan"),
                         "ours_std": float("nan"), "n": 0, "epochs": float("nan"),
                         "difference": float("nan")})
        for _, row in matched.iterrows():
            value, std = metric.ours(row)
            variant = row["variant"] + (f" ({STATUS_LABELS['running']})" if row["partial"] else "")
            rows.append({**base, "variant": variant, "ours": value, "ours_std": std,
                         "n": row["n"], "epochs": row["epochs"],
                         "difference": value - published_value})
    columns = ["dataset", "variant", "method", "metric", "ours", "ours_std", "n", "epochs",
               "published", "published_std", "difference", "source", "table", "note"]
    return pd.DataFrame(rows, columns=columns), sorted(absent)
