"""Aggregate per-unit summaries over seeds into the report's tables, as plain numbers.

A row of every table is one *variant* on one dataset: a method with one configuration, epoch
budget, batch size and device. Runs merged into one report may hold several variants of a
method (say noprop-dt with one-hot and with prototype embeddings); they get separate rows,
labelled by what differs between them, because averaging them would mix two experiments.

The frames here carry raw numbers (accuracies as fractions, times in seconds, bytes); they
are what the CSV files hold. `reports.display` formats them for reading.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bpfree.records import COMPLETE, Status

# How reports name a status. A unit without a summary is recorded as `running`, but it may as
# well have been interrupted: the report cannot tell which, so it says neither.
STATUS_LABELS = {Status.FINISHED: "finished", Status.DIVERGED: "diverged",
                 Status.FAILED: "failed", Status.RUNNING: "unfinished"}
IDENTITY = ("epochs", "batch_size", "device")  # besides the config, what makes a variant
BASELINES = ("backprop", "backprop-blocks")  # the ratio baseline, first one present
ACCURACY_METRICS = ("final_test_acc", "best_test_acc", "final_train_acc", "final_val_acc")
COST_METRICS = ("time_per_epoch_s", "throughput_img_s", "time_to_target_s", "peak_mem_bytes",
                "act_bytes_peak", "flops_train_step", "flops_predict", "params")


def _settings(row: pd.Series) -> dict[str, Any]:
    """The variant-defining settings of one unit: its config plus the run's budget."""
    config = json.loads(row["config"]) if isinstance(row["config"], str) else {}
    return {**config, **{k: row[k] for k in IDENTITY}}


def assign_variants(summary: pd.DataFrame) -> pd.DataFrame:
    """Add `variant`: the method name, plus `(key=value, ...)` for the settings in which the
    method's units on the same dataset differ, so one configuration reads as just the name
    (rows are per dataset already: a different epoch budget on another dataset is no news)."""
    summary = summary.copy()
    settings = summary.apply(_settings, axis=1)
    labels = pd.Series(summary["method"], index=summary.index, dtype=object)
    for _, idx in summary.groupby(["method", "dataset"]).groups.items():
        dicts = [settings[i] for i in idx]
        keys = sorted({k for d in dicts for k in d})
        differing = [k for k in keys if len({json.dumps(d.get(k), default=str) for d in dicts}) > 1]
        if differing:
            for i, d in zip(idx, dicts):
                labels[i] += " (" + ", ".join(f"{k}={d.get(k, '-')}" for k in differing) + ")"
    summary["variant"] = labels
    return summary.sort_values(["dataset", "method", "variant", "seed"], kind="stable")


def _status(group: pd.DataFrame) -> str:
    """`2 finished, 1 diverged (seed 2, epoch 3)`: every unit accounted for."""
    parts = []
    for status in (Status.FINISHED, Status.DIVERGED, Status.RUNNING, Status.FAILED):
        units = group[group["status"] == status]
        if units.empty:
            continue
        text = f"{len(units)} {STATUS_LABELS[status]}"
        if status == Status.DIVERGED:
            text += " (" + "; ".join(f"seed {r.seed}, epoch {int(r.epochs_done)}"
                                     for r in units.itertuples()) + ")"
        elif status == Status.RUNNING:
            text += " (" + "; ".join(f"seed {r.seed}: {int(r.epochs_done)}/{int(r.epochs)} epochs"
                                     for r in units.itertuples()) + ")"
        parts.append(text)
    return ", ".join(parts)


def _counted(group: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The units whose numbers a row shows, and whether they are partial (unfinished)."""
    done = group[group["status"].isin(COMPLETE)]
    if not done.empty:
        return done, False
    running = group[(group["status"] == Status.RUNNING) & (group["epochs_done"] > 0)]
    return running, not running.empty


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per variant x dataset: mean and sample std over seeds of each accuracy, with n.

    Finished and diverged units count (a diverged seed is an outcome of the method, not
    noise to drop); running units count only in a row with nothing finished, marked partial.
    """
    rows = []
    for (dataset, variant), group in summary.groupby(["dataset", "variant"], sort=False):
        counted, partial = _counted(group)
        row: dict[str, Any] = {
            "dataset": dataset, "variant": variant, "method": group["method"].iloc[0],
            "n": len(counted), "seeds": " ".join(str(s) for s in sorted(counted["seed"])),
            "partial": partial, "epochs": pd.to_numeric(group["epochs"]).max(),
            "status": _status(group), "config": group["config"].iloc[0],
        }
        for metric in ACCURACY_METRICS:
            values = pd.to_numeric(counted[metric], errors="coerce").dropna()
            row[f"{metric}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def failures(summary: pd.DataFrame) -> pd.DataFrame:
    """Failed units with their errors, listed under the tables (too long for a cell)."""
    failed = summary[summary["status"] == Status.FAILED]
    return failed[["dataset", "variant", "seed", "error", "run"]].reset_index(drop=True)


def _baseline(rows: pd.DataFrame) -> pd.Series | None:
    for name in BASELINES:
        found = rows[rows["method"] == name]
        if not found.empty:
            return found.iloc[0]
    return None


def _mean(values: pd.Series, harmonic: bool = False) -> float:
    """The mean over seeds; harmonic for a rate (images per second), so that the mean
    throughput and the mean time per epoch describe the same speed when seeds' times vary."""
    if values.empty:
        return float("nan")
    return 1 / (1 / values).mean() if harmonic else values.mean()


def cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per variant x dataset: mean cost over the measured units, and each cost as a ratio to
    the baseline (`backprop`, else `backprop-blocks`) on the same dataset and device.

    Peak memory ratios need the same measurement kind: a CUDA allocator peak and a CPU
    live-tensor peak are different quantities, so a mixed pair gets no ratio.
    """
    rows = []
    for (dataset, variant), group in summary.groupby(["dataset", "variant"], sort=False):
        measured = group[group["status"].isin(COMPLETE)]
        reached = pd.to_numeric(measured["time_to_target_s"], errors="coerce").dropna()
        row: dict[str, Any] = {
            "dataset": dataset, "variant": variant, "method": group["method"].iloc[0],
            "device": group["device"].iloc[0], "n": len(measured),
            "target_acc": pd.to_numeric(measured["target_acc"], errors="coerce").max(),
            "target_reached": len(reached),
            "peak_mem_kind": ", ".join(sorted(set(measured["peak_mem_kind"].dropna()))),
        }
        for metric in COST_METRICS:
            values = pd.to_numeric(measured[metric], errors="coerce").dropna()
            row[metric] = _mean(values, harmonic=metric == "throughput_img_s")
        rows.append(row)
    table = pd.DataFrame(rows)
    table["baseline"] = ""
    for metric in COST_METRICS:
        table[f"{metric}_ratio"] = float("nan")
    for _, idx in table.groupby(["dataset", "device"]).groups.items():
        rows_ = table.loc[idx]
        base = _baseline(rows_[rows_["n"] > 0])
        if base is None:
            continue
        table.loc[idx, "baseline"] = base["variant"]
        for metric in COST_METRICS:
            if metric == "peak_mem_bytes":
                same = rows_["peak_mem_kind"] == base["peak_mem_kind"]
                table.loc[same[same].index, f"{metric}_ratio"] = rows_[metric] / base[metric]
            else:
                table.loc[idx, f"{metric}_ratio"] = rows_[metric] / base[metric]
    return table
