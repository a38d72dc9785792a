"""Aggregate per-unit summaries over seeds into the report's tables, as plain numbers.

A row of every table is one *variant* on one dataset: a method with one configuration, epoch
budget, batch size and device. Runs merged into one report may hold several variants of a
method (say noprop-dt with one-hot and with prototype embeddings); they get separate rows,
labelled by what differs between them, because averaging them would mix two experiments.

Every variant trained one *network* (its records' `network`, `Method.network_of`). A method is
compared with backprop only on its own network: its *backprop twin* is a `backprop` (or
`backprop-blocks`) variant of the same network, dataset and budget (epochs, batch size,
device). Accuracy differences and cost ratios are taken against the twin alone; a variant
without one gets none, never a ratio to a backprop run on another network. Rows are ordered
by dataset, network and budget, the twin first, so that rows compared with each other sit
together.

The frames here carry raw numbers (accuracies as fractions, times in seconds, bytes); they
are what the CSV files hold. `reports.display` formats them for reading.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd

from bpfree.records import COMPLETE, Status

# How reports name a status. A unit without a summary is recorded as `running`, but it may as
# well have been interrupted: the report cannot tell which, so it says neither.
STATUS_LABELS = {Status.FINISHED: "finished", Status.DIVERGED: "diverged",
                 Status.FAILED: "failed", Status.RUNNING: "unfinished"}
IDENTITY = ("epochs", "batch_size", "device")  # besides the config, what makes a variant
BASELINES = ("backprop", "backprop-blocks")  # the methods a backprop twin can be
NO_TWIN = "no backprop twin"  # what a cell says where a comparison with the twin would go
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
    # Records written before networks were recorded have none: such a unit has no twin.
    for column in ("network", "schedule"):
        summary[column] = summary.get(column, pd.Series("", index=summary.index)
                                      ).fillna("").astype(str)
    return summary.sort_values(["dataset", "method", "variant", "seed"], kind="stable")


def fill_networks(summary: pd.DataFrame, describe: Callable[[str, str], dict[str, str]]
                  ) -> tuple[pd.DataFrame, int]:
    """(summary, count): units whose records name no network (written before bpfree recorded
    them) get the network and schedule that `describe(method, config JSON)` derives from
    their configuration; `count` of them did. `describe` comes from the application
    (`bpfree.suites.describe_recorded`, which knows the methods); it returns {} for a method
    or configuration it cannot read, and such a unit keeps no network (and so no twin)."""
    summary = summary.copy()
    for column in ("network", "schedule"):
        if column not in summary:
            summary[column] = None
    missing = summary["network"].isna() | (summary["network"].astype(str) == "")
    count = 0
    for i in summary.index[missing]:
        found = describe(str(summary.at[i, "method"]), summary.at[i, "config"])
        if found.get("network"):
            summary.at[i, "network"] = found["network"]
            summary.at[i, "schedule"] = found.get("schedule", "")
            count += 1
    return summary, count


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
            **_identity(dataset, variant, group),
            "n": len(counted), "seeds": " ".join(str(s) for s in sorted(counted["seed"])),
            "partial": partial, "status": _status(group), "config": group["config"].iloc[0],
        }
        for metric in ACCURACY_METRICS:
            values = pd.to_numeric(counted[metric], errors="coerce").dropna()
            row[f"{metric}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        runs = pd.to_numeric(counted.get("inference_runs", pd.Series(dtype=float)),
                             errors="coerce").dropna()
        row["runs"] = int(runs.min()) if len(runs) and (runs == runs.iloc[0]).all() else 1
        for metric in ("final_test_acc", "final_val_acc"):
            row[f"{metric}_se"] = (pooled_se(counted[metric], counted.get(f"{metric}_se"),
                                             row["runs"]) if row["runs"] > 1 else float("nan"))
        for metric in ACCURACY_METRICS:
            # Train and best-epoch accuracy have no standard error: always the std.
            sampled = f"{metric}_se" in row
            row[f"{metric}_spread"] = spread(counted[metric], counted.get(f"{metric}_se"),
                                             row["runs"] if sampled else 1)
        rows.append(row)
    table = _with_twins(pd.DataFrame(rows))
    # Only finished results are compared: a row or twin still running has fewer epochs than
    # the budget its group is named for, so its difference would not be like for like.
    unfinished = table["partial"].astype(bool) | _of_twin(table, "partial").eq(True)
    table["vs_twin_final_test_acc"] = (table["final_test_acc_mean"]
                                       - _of_twin(table, "final_test_acc_mean")).where(~unfinished)
    table["vs_twin_unfinished"] = unfinished & (table["twin"] != "")
    return _grouped(table)


def pooled_se(means: pd.Series, ses: pd.Series | None, runs: int) -> float:
    """The standard error of the mean accuracy over all runs x seeds, from each seed's mean
    and standard error over its `runs` inference runs: the same number as from the runs'
    accuracies themselves (a seed's sample variance is se^2 * runs). This is the paper's
    protocol for a sampling method (NoProp: 5 inference runs x 3 seeds). NaN where a seed's
    standard error is missing."""
    means = pd.to_numeric(means, errors="coerce")
    ses = pd.to_numeric(ses, errors="coerce") if ses is not None else means * float("nan")
    if means.isna().any() or ses.isna().any() or not len(means):
        return float("nan")
    total = runs * len(means)
    within = (ses**2 * runs * (runs - 1)).sum()
    between = (runs * (means - means.mean()) ** 2).sum()
    return float(((within + between) / (total - 1) / total) ** 0.5)


def spread(means: pd.Series, ses: pd.Series | None, runs: int) -> float:
    """The one rule for the "±" every table shows: the standard error over runs x seeds where
    predictions were sampled `runs` > 1 times (NoProp's protocol, `pooled_se`), else the
    sample standard deviation over seeds (NaN for one seed)."""
    if runs > 1:
        return pooled_se(means, ses, runs)
    values = pd.to_numeric(means, errors="coerce").dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


EVALUATION_METRICS = ("val_acc", "test_acc")


def evaluation_table(evaluations: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per variant x dataset x inference setting x number of runs (`bpfree evaluate` on kept
    models): mean and "±" (`spread`) over the seeds evaluated, validation and test.

    Rows are grouped and ordered as the accuracy table's (dataset, network, budget), the
    settings of one variant together. An evaluation of a unit no report folder holds is
    dropped: its variant and network would be unknown."""
    identity = ["method", "network", "schedule", "epochs", "batch_size", "device"]
    if evaluations.empty:
        return pd.DataFrame(columns=["dataset", "variant", *identity, "setting", "runs", "n"])
    units = summary[["run", "unit", "dataset", "variant", *identity]]
    merged = evaluations.drop(columns=[c for c in ("method", "dataset", "epochs")
                                       if c in evaluations]).merge(units, on=["run", "unit"])
    rows = []
    for (dataset, variant, setting, runs), group in merged.groupby(
            ["dataset", "variant", "setting", "inference_runs"], sort=False):
        row: dict[str, Any] = {**_identity(dataset, variant, group), "setting": setting,
                               "runs": int(runs), "n": len(group),
                               "seeds": " ".join(str(s) for s in sorted(group["seed"]))}
        for metric in EVALUATION_METRICS:
            values = pd.to_numeric(group[metric], errors="coerce")
            row[f"{metric}_mean"] = values.mean() if values.notna().any() else float("nan")
            row[f"{metric}_spread"] = spread(group[metric], group[f"{metric}_se"], int(runs))
        rows.append(row)
    table = pd.DataFrame(rows)
    order = table.assign(_setting=table["setting"].map(_setting_order)).sort_values(
        [*TWIN_KEYS, "variant", "_setting", "runs"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


def setting_values(setting: str) -> dict[str, Any] | None:
    """An `evaluations.csv` setting (`{"sampler": "mean"}`) as a dict; None if it is not
    one (then shown and sorted as its text)."""
    try:
        values = json.loads(setting)
    except (TypeError, ValueError):
        return None
    return values if isinstance(values, dict) else None


def _setting_order(setting: str) -> str:
    """A sort key under which `inference_steps=20` comes before `inference_steps=100`: each
    number is zero-padded, everything else kept as text."""
    values = setting_values(setting)
    if values is None:
        return str(setting)

    def text(v: Any) -> str:  # `bpfree evaluate` records values as typed: "20" or 20
        try:
            return f"{float(v):020.6f}"
        except (TypeError, ValueError):
            return str(v)
    return " ".join(f"{k}={text(v)}" for k, v in sorted(values.items()))


def _identity(dataset: str, variant: str, group: pd.DataFrame) -> dict[str, Any]:
    """What a row is: its dataset, variant, method and network, and the budget a twin must
    share (a variant has one of each, since the budget is part of what defines it)."""
    return {"dataset": dataset, "variant": variant, "method": group["method"].iloc[0],
            "network": group["network"].iloc[0], "schedule": group["schedule"].iloc[0],
            "epochs": pd.to_numeric(group["epochs"]).max(),
            "batch_size": group["batch_size"].iloc[0], "device": group["device"].iloc[0]}


TWIN_KEYS = ("dataset", "network", "epochs", "batch_size", "device")


def _with_twins(table: pd.DataFrame) -> pd.DataFrame:
    """Add `twin`: the variant label of each row's backprop twin on its dataset, or "" where
    none ran: a `backprop`/`backprop-blocks` variant with results (n > 0) on the same network
    (recorded, not empty), dataset, epochs, batch size and device. A twin is its own twin. Of
    several candidates (two backprop learning rates, say) the first by label is taken."""
    table = table.copy()
    table["twin"] = ""
    if table.empty:
        return table
    candidates = table[table["method"].isin(BASELINES) & (table["n"] > 0)
                       & (table["network"] != "")].sort_values("variant", kind="stable")
    first = candidates.groupby(list(TWIN_KEYS), dropna=False)["variant"].first()
    for i, row in table.iterrows():
        key = tuple(row[k] for k in TWIN_KEYS)
        if row["network"] and key in first.index:
            table.at[i, "twin"] = first[key]
    return table


def _of_twin(table: pd.DataFrame, column: str) -> pd.Series:
    """Each row's twin's value of `column` (NaN without a twin)."""
    values = table.set_index(["dataset", "variant"])[column]
    return pd.Series([values.get((d, t), float("nan")) if t else float("nan")
                      for d, t in zip(table["dataset"], table["twin"])], index=table.index)


def _grouped(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by dataset, network and budget, each group's twin first."""
    if table.empty:
        return table
    is_twin = table["twin"] == table["variant"]
    order = table.assign(_twin=~is_twin).sort_values(
        [*TWIN_KEYS, "_twin", "variant"], kind="stable").index
    return table.loc[order].reset_index(drop=True)


def failures(summary: pd.DataFrame) -> pd.DataFrame:
    """Failed units with their errors, listed under the tables (too long for a cell)."""
    failed = summary[summary["status"] == Status.FAILED]
    return failed[["dataset", "variant", "seed", "error", "run"]].reset_index(drop=True)


def _mean(values: pd.Series, harmonic: bool = False) -> float:
    """The mean over seeds; harmonic for a rate (images per second), so that the mean
    throughput and the mean time per epoch describe the same speed when seeds' times vary."""
    if values.empty:
        return float("nan")
    return 1 / (1 / values).mean() if harmonic else values.mean()


def cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per variant x dataset: mean cost over the measured units, and each cost as a ratio to
    the variant's backprop twin (see the module docstring; NaN without one).

    Peak memory ratios need the same measurement kind: a CUDA allocator peak and a CPU
    live-tensor peak are different quantities, so a mixed pair gets no ratio.
    """
    rows = []
    for (dataset, variant), group in summary.groupby(["dataset", "variant"], sort=False):
        measured = group[group["status"].isin(COMPLETE)]
        reached = pd.to_numeric(measured["time_to_target_s"], errors="coerce").dropna()
        row: dict[str, Any] = {
            **_identity(dataset, variant, group), "n": len(measured),
            "target_acc": pd.to_numeric(measured["target_acc"], errors="coerce").max(),
            "target_reached": len(reached),
            "peak_mem_kind": ", ".join(sorted(set(measured["peak_mem_kind"].dropna()))),
        }
        for metric in COST_METRICS:
            values = pd.to_numeric(measured[metric], errors="coerce").dropna()
            row[metric] = _mean(values, harmonic=metric == "throughput_img_s")
        rows.append(row)
    table = _with_twins(pd.DataFrame(rows))
    for metric in COST_METRICS:
        table[f"{metric}_ratio"] = table[metric] / _of_twin(table, metric)
    same_kind = _of_twin(table, "peak_mem_kind") == table["peak_mem_kind"]
    table.loc[~same_kind, "peak_mem_bytes_ratio"] = float("nan")
    return _grouped(table)
