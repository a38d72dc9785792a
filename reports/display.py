"""Format the aggregated frames as tables for reading: units in headers, best values marked.

A `Table` is format-neutral (plain cell text plus a `best` flag); `reports.render` writes it
as Markdown, HTML or LaTeX, so the three formats cannot disagree on a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from .tables import TWIN_KEYS, setting_values

# A group of rows: the same dataset, network and budget, what a backprop twin shares.
GROUP_KEYS = TWIN_KEYS

MIB = 2**20
MEMORY_KINDS = {"cuda-allocator": "CUDA allocator", "cpu-live-tensors": "CPU live tensors"}
SHORT_KINDS = {"cuda-allocator": "CUDA", "cpu-live-tensors": "CPU"}  # for a narrow table column


@dataclass
class Cell:
    text: str
    best: bool = False


@dataclass
class Table:
    key: str  # stable name: the CSV file stem and the HTML/LaTeX anchor
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices
    # One label per row, or none: consecutive rows with one label form a group, which the
    # writers set apart under that label (a sub-table per network, say).
    groups: list[str] = field(default_factory=list)


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def percent(mean: float, std: float = float("nan")) -> str:
    """Accuracy fraction -> `98.66 ± 0.12` in percent; no `±` for a single seed."""
    if not finite(mean):
        return "-"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if finite(std) else "")


def human(value: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes), NaN -> '-'."""
    if not finite(value):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def plain(value: float) -> str:
    """Three significant digits without an exponent: 1234 -> '1234', 0.01234 -> '0.0123'."""
    if not finite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def ratio(value: float) -> str:
    return f"{value:.2f}×" if finite(value) else "-"


def _best_flags(frame: pd.DataFrame, column: str, higher: bool, eligible: pd.Series) -> pd.Series:
    """True where a row holds the best value of `column` among eligible rows of its group
    (dataset, network and budget: like is compared with like)."""
    flags = pd.Series(False, index=frame.index)
    for _, group in frame[eligible].groupby(list(GROUP_KEYS), dropna=False):
        values = pd.to_numeric(group[column], errors="coerce").dropna()
        if len(values) > 1:  # a lone row is not "best" of anything
            best = values.max() if higher else values.min()
            flags[values.index[values == best]] = True
    return flags


NO_TWIN = "no backprop twin"


def group_labels(frame: pd.DataFrame) -> list[str]:
    """The label of each row's group: its dataset and network, and its budget (epochs, batch
    size, device) where runs of that network on that dataset had several budgets, since rows
    of different budgets are never compared either."""
    budgets = frame.groupby(["dataset", "network"])[list(GROUP_KEYS[2:])].apply(
        lambda g: len(g.drop_duplicates())) if len(frame) else pd.Series(dtype=int)
    labels = []
    for _, r in frame.iterrows():
        label = f"{r['dataset']}, network {r['network'] or '(not recorded)'}"
        if budgets.get((r["dataset"], r["network"]), 1) > 1:
            epochs = f"{r['epochs']:.0f}" if finite(r["epochs"]) else "?"
            label += f", epochs {epochs}, batch {r['batch_size']}, {r['device']}"
        labels.append(label)
    return labels


def _versus_twin(r: pd.Series) -> str:
    """Final test accuracy minus the twin's, in points; what to say where there is none."""
    if not r["twin"]:
        return NO_TWIN
    if r["twin"] == r["variant"]:
        return "twin"
    if r["vs_twin_unfinished"]:
        return "unfinished: no difference"
    diff = 100 * r["vs_twin_final_test_acc"]
    return f"{diff:+.2f}" if finite(diff) else "-"


def accuracy(acc: pd.DataFrame, derived: int = 0) -> Table:
    """The accuracy table; `derived`: how many units' networks were not in their records but
    derived from their configuration (`tables.fill_networks`), said in a note."""
    metrics = [("final_test_acc", "test acc % (final)"),
               ("best_test_acc", "test acc % (best epoch: reference)"),
               ("final_train_acc", "train acc % (final)")]
    if acc["final_val_acc_mean"].notna().any():
        metrics.append(("final_val_acc", "val acc % (final)"))
    eligible = ~acc["partial"]
    flags = {m: _best_flags(acc, f"{m}_mean", True, eligible) for m, _ in metrics}
    rows = []
    sampled = acc.get("runs", pd.Series(1, index=acc.index)) > 1
    for i, r in acc.iterrows():
        n = f"{r['n']} × {r['runs']} runs" if sampled[i] else str(r["n"])
        cells = [Cell(r["variant"]), Cell(n)]
        cells += [Cell(percent(r[f"{m}_mean"], r[f"{m}_spread"]), bool(flags[m][i]))
                  for m, _ in metrics]
        cells.insert(3, Cell(_versus_twin(r)))
        cells += [Cell(f"{r['epochs']:.0f}" if finite(r["epochs"]) else "-"), Cell(r["status"])]
        rows.append(cells)
    labels = [label for _, label in metrics]
    columns = ["method", "n", labels[0], "vs backprop twin (points)", *labels[1:], "epochs",
               "status"]
    notes = [
        "Grouped by dataset, network and budget (`docs/records.md`): each group compares "
        "methods that trained the same network on the same data for the same epochs, batch "
        "size and device. Its backprop twin (`backprop`, or `backprop-blocks` for "
        "NoProp-DT's blocks, on the same network, dataset, epochs, batch size and device) comes "
        f"first; 'vs backprop twin' is the final test accuracy minus the twin's, '{NO_TWIN}' "
        "where none ran: a method is never compared with backprop on another network, and "
        "never while it or its twin is unfinished.",
        "Mean ± sample standard deviation over the n seeds (no ± for one seed); "
        "**bold**: the best of its column within its group.",
        *(["Where n reads 'seeds × R runs' (`--inference-runs R`, for methods whose "
           "prediction samples), the final test and validation accuracies are the mean ± "
           "standard error over all R inference runs of all seeds, the paper's protocol for "
           "NoProp; the other columns stay over seeds."] if sampled.any() else []),
        "'final' is the last epoch: the number to report. 'best epoch' is the highest test "
        "accuracy of any epoch, selected on the test set: for reference only, never for claims.",
        "Finished and diverged seeds count (a diverged seed keeps the accuracy it had when it "
        "stopped); a row whose seeds are all unfinished (running or interrupted) shows their "
        "epochs so far and is never marked best; failed seeds are listed below the tables.",
    ]
    if derived:
        notes.append(f"The network of {derived} unit(s) is not in their records (written "
                     "before bpfree recorded networks): `bpfree report` derived it from each "
                     "unit's configuration with its method's `network_of`.")
    return Table("accuracy", "Accuracy", columns, rows, notes, set(range(1, len(columns) - 1)),
                 group_labels(acc))


def setting_text(setting: str) -> str:
    """`{"sampler": "mean"}` -> 'sampler=mean'; `{}` -> 'as trained'."""
    values = setting_values(setting)
    if values is None:
        return str(setting)
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "as trained"


def evaluations(table: pd.DataFrame) -> Table:
    """Kept models evaluated again under inference settings (`bpfree evaluate`); the best
    validation accuracy of each method is marked: the setting to choose."""
    best = pd.Series(False, index=table.index)
    for _, group in table.groupby([*GROUP_KEYS, "variant"], dropna=False):
        values = pd.to_numeric(group["val_acc_mean"], errors="coerce").dropna()
        if len(values) > 1:
            best[values.index[values == values.max()]] = True
    rows = []
    for i, r in table.iterrows():
        n = f"{r['n']} × {r['runs']} runs" if r["runs"] > 1 else str(r["n"])
        rows.append([Cell(r["variant"]), Cell(setting_text(r["setting"])), Cell(n),
                     Cell(percent(r["val_acc_mean"], r["val_acc_spread"]), bool(best[i])),
                     Cell(percent(r["test_acc_mean"], r["test_acc_spread"]))])
    columns = ["method", "inference setting", "n", "val acc %", "test acc %"]
    notes = [
        "The models a run kept (`--save-model`), evaluated again without retraining under "
        "other inference settings (`bpfree evaluate RUN_DIR --set KEY=V1,V2`); 'as trained' is "
        "the setting the run trained and recorded with. Grouped as the accuracy table.",
        "Where n reads 'seeds × R runs' (predictions sampled R times), mean ± standard error "
        "over all runs of all seeds; else mean ± sample standard deviation over the seeds.",
        "**bold**: each method's best validation accuracy, the setting to choose; its test "
        "accuracy is the number to report. A setting is never chosen on test accuracy.",
    ]
    return Table("inference_settings", "Inference settings on kept models", columns, rows,
                 notes, {2, 3, 4}, group_labels(table))


def _time_to_target(r: pd.Series) -> str:
    if not finite(r["target_acc"]) or r["n"] == 0:
        return "-"
    if r["target_reached"] == 0:
        return "not reached"
    text = plain(r["time_to_target_s"])
    return text if r["target_reached"] == r["n"] else f"{text} ({r['target_reached']}/{r['n']} seeds)"


COSTS = [  # (column, header, formatter, higher is better)
    ("time_per_epoch_s", "time / epoch (s)", plain, False),
    ("throughput_img_s", "throughput (img/s)", human, True),
    ("time_to_target_s", "time to target (s)", None, False),
    ("peak_mem_bytes", "peak memory (MiB)", lambda v: plain(v / MIB), False),
    ("act_bytes_peak", "activations held (MiB)", lambda v: plain(v / MIB), False),
    ("flops_train_step", "FLOPs / step", human, False),
    ("flops_predict", "FLOPs / prediction", human, False),
    ("params", "params", human, None),
]


def _targets(cost: pd.DataFrame) -> str:
    per_dataset = cost.groupby("dataset")["target_acc"].max().dropna()
    return ", ".join(f"{100 * t:.0f}% on {d}" for d, t in per_dataset.items()) or "none"


def cost(cost: pd.DataFrame) -> Table:
    measured = cost["n"] > 0
    flags = {c: _best_flags(cost, c, hi, measured) if hi is not None else None
             for c, _, _, hi in COSTS}
    rows = []
    for i, r in cost.iterrows():
        cells = [Cell(r["variant"]), Cell(str(r["n"]))]
        for column, _, fmt, _ in COSTS:
            text = _time_to_target(r) if fmt is None else fmt(r[column])
            cells.append(Cell(text, bool(flags[column] is not None and flags[column][i])))
            if column == "peak_mem_bytes":
                cells.append(Cell(SHORT_KINDS.get(r["peak_mem_kind"], r["peak_mem_kind"] or "-")))
        rows.append(cells)
    headers = [h for c, h, _, _ in COSTS]
    headers.insert(4, "kind")
    columns = ["method", "n", *headers]
    notes = [
        "Grouped by dataset, network and budget, as the accuracy table. Means over the n measured "
        "seeds (finished or diverged; throughput as the harmonic mean, so that it matches "
        "time / epoch); **bold**: the cheapest in its group (the fastest for throughput). "
        "Times are training only, device synchronised, evaluation excluded.",
        f"Time to target: training time until the test accuracy first reached the target "
        f"({_targets(cost)}), averaged over the seeds that reached it.",
        "Peak memory is of one training step: the CUDA allocator peak on a GPU (kind CUDA), or "
        "on CPU the peak of live tensor bytes plus parameters, buffers and optimiser state "
        "(kind CPU); the two kinds are not comparable. Activations held: the most bytes autograd keeps for backward at "
        "once. FLOPs are for one minibatch of the run's batch size.",
    ]
    numeric = set(range(1, len(columns))) - {columns.index("kind")}
    return Table("cost", "Cost", columns, rows, notes, numeric,
                 group_labels(cost))


def cost_ratio(cost: pd.DataFrame) -> Table:
    rows = []
    for _, r in cost.iterrows():
        twin = NO_TWIN if not r["twin"] else ("(itself)" if r["twin"] == r["variant"]
                                               else r["twin"])
        cells = [Cell(r["variant"]), Cell(twin)]
        cells += [Cell(ratio(r[f"{c}_ratio"])) for c, _, _, _ in COSTS]
        rows.append(cells)
    columns = ["method", "backprop twin", *(h.split(" (")[0] for _, h, _, _ in COSTS)]
    notes = [
        "Each cost divided by that of the row's backprop twin: `backprop` (or `backprop-blocks` "
        "for NoProp-DT's blocks) on the same network, dataset, epochs, batch size and device. "
        f"'{NO_TWIN}': no such run is in the report, so no ratio is shown; a ratio to backprop "
        "on another network would mix the cost of the network with that of the learning rule. "
        "Above 1× costs more than the twin, except throughput, where above 1× is faster. Peak "
        "memory is divided only by a peak of the same kind.",
    ]
    return Table("cost_ratio", "Cost relative to the backprop twin", columns, rows, notes,
                 set(range(2, len(columns))), group_labels(cost))


def _plus_minus(value: float, std: float) -> str:
    return f"{value:.2f}" + (f" ± {std:.2f}" if finite(std) else "")


def _source(r: pd.Series) -> str:
    return r["source"] + (f", {r['table']}" if r["table"] else "")


def published(comp: pd.DataFrame, absent: list[str], datasets: list[str], others: int = 0
              ) -> Table:
    rows = []
    for _, r in comp.iterrows():
        ours = "-" if not finite(r["ours"]) else _plus_minus(r["ours"], r["ours_std"])
        epochs = str(int(r["epochs"])) if finite(r["epochs"]) else "-"
        diff = f"{r['difference']:+.2f}" if finite(r["difference"]) else "-"
        rows.append([Cell(r["variant"]), Cell(r["metric"]), Cell(ours), Cell(epochs),
                     Cell(_plus_minus(r["published"], r["published_std"])), Cell(diff),
                     Cell(_source(r)), Cell(r["note"])])
    columns = ["ours", "metric", "ours (final)", "epochs", "published", "difference", "source",
               "paper's setting"]
    notes = [
        "Published numbers of the same setup as ours: dataset, method and settings, network, "
        "schedule (where the paper names one) and, for accuracies, epochs. Difference: ours "
        "minus published, in the metric's unit (percentage points, GB). Other published "
        "numbers are in the next table, without a difference. Published numbers: "
        "results/published/published.csv.",
        "Published GPU memory is compared only with our CUDA allocator peaks; CPU runs show '-'.",
    ]
    if comp.empty:
        notes = ["No published number shares a setup (network, schedule, epochs) with these "
                 "runs; those of the methods run here are in the next table."]
        if not others and not absent:
            notes = [f"No published numbers for {', '.join(datasets)}: the papers report full "
                     f"MNIST, Fashion-MNIST, CIFAR-10/100 and Tiny ImageNet; run one of those "
                     f"to compare."]
    if absent:
        notes.append("Also published on these datasets, for methods this report has no run "
                     "of there: " + ", ".join(absent) + ".")
    groups = [f"{r['dataset']}, network {r['network']}" for _, r in comp.iterrows()]
    return Table("published", "Published results, same setup", columns, rows, notes,
                 {2, 3, 4, 5}, groups)


def published_other(other: pd.DataFrame) -> Table:
    rows = []
    for _, r in other.iterrows():
        epochs = str(int(r["epochs"])) if finite(r["epochs"]) else "-"
        rows.append([Cell(r["method"]), Cell(r["network"]), Cell(epochs),
                     Cell(r["schedule"] or "-"), Cell(r["metric"]),
                     Cell(_plus_minus(r["published"], r["published_std"])), Cell(r["reason"]),
                     Cell(_source(r)), Cell(r["note"])])
    columns = ["method", "network", "epochs", "schedule", "metric", "published",
               "not compared because", "source", "paper's setting"]
    notes = [
        "Published numbers of the methods run here, measured on a setup none of these runs "
        "shares (another network, schedule or number of epochs, or one the source does not "
        "state): context, not a target, so no difference is computed.",
    ]
    if other.empty:
        notes = ["None: no published number of the methods run here, on these datasets, was "
                 "measured on another setup."]
    return Table("published_other", "Published results, other setups", columns, rows, notes,
                 {5}, [str(d) for d in other["dataset"]])


def failures(failed: pd.DataFrame) -> list[str]:
    return [f"{r.variant} on {r.dataset}, seed {r.seed}: {r.error} ({r.run})"
            for r in failed.itertuples()]
