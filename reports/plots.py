"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are built as `matplotlib.figure.Figure` and saved directly, so making a
report neither switches the caller's backend nor leaves global state behind. Every figure uses
one style (`STYLE`) and one colour per method (`method_colours`), derived from the sorted
method registry so a method has the same colour in every plot of every report; variants of
one method share its colour and differ in line style.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from bpfree.records import Status

from .display import MEMORY_KINDS, MIB
from .tables import COMPLETE, STATUS_LABELS

DPI = 150  # PNG resolution; the HTML page shows figures at 100 dpi, sharp on HiDPI screens
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h", "p", "d", "H", "8")  # no x (divergence), no arrows
PANEL = (5.0, 3.6)  # inches per subplot
LEGEND_INCH_PER_CHAR = 0.07  # a legend label's width per character, at the style's font size


@dataclass(frozen=True)
class Plot:
    key: str  # file stem
    title: str
    draw: Callable[[pd.DataFrame, pd.DataFrame], Figure]
    # Whether the records hold what the plot shows; None: always drawn.
    when: Callable[[pd.DataFrame], bool] | None = None

    def applies(self, records: pd.DataFrame) -> bool:
        return self.when is None or self.when(records)


def _slots(methods: list[str], size: int) -> dict[str, int]:
    """A slot per method, from a hash of its name: the same method gets the same slot in
    every report (reports read records only, so they cannot ask the registry for an order).
    Two methods of one report never share a slot: on a clash the later name, in sorted
    order, takes the next free one."""
    taken: dict[int, str] = {}
    slots: dict[str, int] = {}
    for name in sorted(set(methods)):
        slot = int(hashlib.sha1(name.encode()).hexdigest(), 16) % size
        while slot in taken and len(taken) < size:
            slot = (slot + 1) % size
        taken[slot] = name
        slots[name] = slot
    return slots


def method_colours(methods: list[str]) -> dict[str, str]:
    """A fixed colour per method name: tab10, then tab20's lighter half."""
    palette = list(matplotlib.colormaps["tab10"].colors)
    palette += list(matplotlib.colormaps["tab20"].colors)[1::2]
    return {name: matplotlib.colors.to_hex(palette[slot])
            for name, slot in _slots(methods, len(palette)).items()}


def method_markers(methods: list[str]) -> dict[str, str]:
    """A fixed marker per method as well, so plots still read in black and white."""
    return {name: MARKERS[slot] for name, slot in _slots(methods, len(MARKERS)).items()}


class Styler:
    """Colour, marker and line style of each variant, the same in every figure of a report;
    the legend label says when a variant's units are unfinished (running or interrupted)."""

    def __init__(self, summary: pd.DataFrame) -> None:
        methods = sorted(set(summary["method"]))
        self.colours, self.markers = method_colours(methods), method_markers(methods)
        variants = summary.drop_duplicates("variant")
        self.method = dict(zip(variants["variant"], variants["method"]))
        self.style: dict[str, str] = {}
        for _, group in variants.groupby("method"):
            for i, variant in enumerate(group["variant"]):
                self.style[variant] = LINESTYLES[i % len(LINESTYLES)]
        self.running = set(summary.loc[summary["status"] == Status.RUNNING, "variant"])

    def colour(self, variant: str) -> str:
        return self.colours[self.method[variant]]

    def marker(self, variant: str) -> str:
        return self.markers[self.method[variant]]

    def label(self, variant: str) -> str:
        return variant + (f" ({STATUS_LABELS['running']})" if variant in self.running else "")


def _figure(rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _panels(datasets: list[str]) -> tuple[Figure, list[Axes]]:
    """One panel per dataset, side by side, three to a row; unused panels hidden."""
    cols = min(len(datasets), 3)
    fig, axes = _figure(-(-len(datasets) // cols), cols)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:len(datasets)])


def _legend(fig: Figure) -> None:
    """One legend for the whole figure, right of the panels, each label once."""
    handles, labels = {}, []
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        fig.legend([handles[x] for x in labels], labels, loc="outside right upper")
        # The legend takes its width from the panels; widen the figure by about that much
        # so that long variant labels do not squeeze the axes to nothing.
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + LEGEND_INCH_PER_CHAR * max(map(len, labels)) + 0.5, height)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _clamp_percent(ax: Axes) -> None:
    """Keep an accuracy axis inside [0, 100] (plus room for markers): matplotlib's padding
    around a single point would otherwise show 104%."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -1), min(high, 101))


def _scale_axis(ax: Axes, values: pd.Series, axis: str = "x") -> None:
    """Scale and tick labels for a cost axis. Log when the values span more than 30x (methods
    differ by orders of magnitude): below a million (seconds, MiB) ticks at 1, 2, 5 x 10^k as
    plain numbers, above (FLOPs) at powers of ten, minor ticks unlabelled (matplotlib's minor
    labels collide). Linear axes of large numbers read 3.2T rather than 3.2 with a 1e12 offset."""
    values = values[values > 0]
    if values.empty:
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    if values.max() / values.min() > 30:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target.set_minor_formatter(NullFormatter())
        if values.max() < 1e6:
            target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    elif values.max() >= 1e6:
        target.set_major_formatter(EngFormatter(sep=""))


def accuracy_curves(x: str, xlabel: str) -> Callable[[pd.DataFrame, pd.DataFrame], Figure]:
    """Test accuracy against `x` (a records column): per-epoch mean over seeds as a line, the
    seeds' min-max as a band; x is the seeds' mean too (time differs slightly per seed)."""

    def draw(records: pd.DataFrame, summary: pd.DataFrame) -> Figure:
        styler = Styler(summary)
        datasets = sorted(set(summary["dataset"]))
        fig, axes = _panels(datasets)
        for ax, dataset in zip(axes, datasets):
            ax.set_title(dataset)
            data = records[records["dataset"] == dataset] if len(records) else records
            if data.empty:
                _empty(ax, "no epoch finished yet")
                continue
            for variant, group in data.groupby("variant", sort=False):
                per_epoch = group.groupby("epoch").agg(
                    x=(x, "mean"), y=("test_acc", "mean"), lo=("test_acc", "min"),
                    hi=("test_acc", "max"), seeds=("seed", "nunique"))
                colour = styler.colour(variant)
                ax.plot(per_epoch["x"], 100 * per_epoch["y"], styler.style[variant], color=colour,
                        marker=styler.marker(variant), markersize=4, label=styler.label(variant))
                if per_epoch["seeds"].max() > 1:
                    ax.fill_between(per_epoch["x"], 100 * per_epoch["lo"], 100 * per_epoch["hi"],
                                    color=colour, alpha=0.18, linewidth=0)
                ends = group[group["unit"].isin(summary.loc[summary["status"] == Status.DIVERGED, "unit"])]
                ends = ends.sort_values("epoch").groupby("unit").tail(1)
                ax.plot(ends[x], 100 * ends["test_acc"], "x", color="black", markersize=8,
                        markeredgewidth=2, label="diverged seed (last epoch)" if len(ends) else None)
            if x != "epoch":
                _scale_axis(ax, data[x])
            elif data["epoch"].nunique() <= 12:
                ax.set_xticks(sorted(data["epoch"].unique()))
            else:
                ax.xaxis.get_major_locator().set_params(integer=True)
            _clamp_percent(ax)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (%)")
        _legend(fig)
        return fig

    return draw


def _complete(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["status"].isin(COMPLETE)]


def memory_bars(records: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Peak memory of one training step per variant, min-max over seeds as error bars."""
    styler = Styler(summary)
    datasets = sorted(set(summary["dataset"]))
    fig, axes = _panels(datasets)
    for ax, dataset in zip(axes, datasets):
        ax.set_title(dataset)
        data = _complete(summary[summary["dataset"] == dataset])
        if data.empty:
            _empty(ax, "no finished unit yet")
            continue
        stats = data.groupby("variant", sort=False).agg(
            mean=("peak_mem_bytes", "mean"), lo=("peak_mem_bytes", "min"),
            hi=("peak_mem_bytes", "max"), kind=("peak_mem_kind", "first"))
        mean, lo, hi = (stats[c].astype(float) / MIB for c in ("mean", "lo", "hi"))
        positions = np.arange(len(stats))
        kinds = sorted(set(stats["kind"]))
        hatches = {kind: ("" if i == 0 else "//") for i, kind in enumerate(kinds)}
        for pos, variant in zip(positions, stats.index):
            kind = stats.loc[variant, "kind"]
            ax.bar(pos, mean[variant], color=styler.colour(variant), hatch=hatches[kind],
                   edgecolor="white", label=variant)
            ax.text(pos, hi[variant], f"{mean[variant]:.3g}", ha="center", va="bottom", fontsize=7)
        errors = np.vstack([mean - lo, hi - mean])
        if (errors > 0).any():
            ax.errorbar(positions, mean, yerr=errors, fmt="none", ecolor="black", capsize=3)
        # a variant's settings on a line of their own: "noprop-ct\n(schedule_...=False)"
        ax.set_xticks(positions, [v.replace(" (", "\n(") for v in stats.index], rotation=35,
                      ha="right")
        pad = 0.6 + max(0, 3 - len(stats)) / 2  # a lone bar is not the panel's full width
        ax.set_xlim(-pad, len(stats) - 1 + pad)
        ax.grid(False, axis="x")
        _scale_axis(ax, mean, "y")
        ax.margins(y=0.15)
        kind_text = " / ".join(MEMORY_KINDS.get(k, k) + (" (hatched)" if hatches[k] else "")
                               for k in kinds)
        ax.set_ylabel(f"peak memory of one step (MiB)\n{kind_text}")
    _legend(fig)
    return fig


def _pareto_front(points: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Points no other point beats on both cost (lower) and accuracy (higher)."""
    ordered = points.sort_values([cost, "acc"], ascending=[True, False])
    front, best = [], -np.inf
    for idx, row in ordered.iterrows():
        if row["acc"] > best:
            front.append(idx)
            best = row["acc"]
    return ordered.loc[front]


def pareto(records: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Final test accuracy against training time and against peak memory; the dashed line
    joins the Pareto-optimal variants (nothing else is both cheaper and more accurate)."""
    styler = Styler(summary)
    datasets = sorted(set(summary["dataset"]))
    costs = [("train_time_s", "training time (s)", 1.0),
             ("peak_mem_bytes", "peak memory of one step (MiB)", MIB)]
    fig, axes = _figure(len(datasets), len(costs))
    for row, dataset in enumerate(datasets):
        data = _complete(summary[summary["dataset"] == dataset])
        for col, (cost, label, scale) in enumerate(costs):
            ax = axes[row, col]
            ax.set_title(f"{dataset}: accuracy vs {label.split(' (')[0]}")
            if data.empty:
                _empty(ax, "no finished unit yet")
                continue
            values = data.assign(c=data[cost].astype(float) / scale,
                                 acc=100 * data["final_test_acc"].astype(float))
            points = values.groupby("variant", sort=False).agg(
                c=("c", "mean"), c_lo=("c", "min"), c_hi=("c", "max"),
                acc=("acc", "mean"), acc_lo=("acc", "min"), acc_hi=("acc", "max"))
            for variant, p in points.iterrows():
                ax.errorbar(p["c"], p["acc"], xerr=[[p["c"] - p["c_lo"]], [p["c_hi"] - p["c"]]],
                            yerr=[[p["acc"] - p["acc_lo"]], [p["acc_hi"] - p["acc"]]],
                            fmt=styler.marker(variant), color=styler.colour(variant), markersize=7,
                            capsize=2, label=variant)
            front = _pareto_front(points.rename(columns={"c": cost}), cost)
            ax.plot(front[cost], front["acc"], "--", color="grey", linewidth=1,
                    drawstyle="steps-post", label="Pareto front", zorder=0)
            _scale_axis(ax, points["c"])
            ax.set_xlabel(label + (" (mixed kinds)" if data["peak_mem_kind"].nunique() > 1
                                   and cost == "peak_mem_bytes" else ""))
            ax.set_ylabel("final test accuracy (%)")
            _clamp_percent(ax)
    _legend(fig)
    return fig


ANGLE_PREFIX = "diag_angle_update/"  # records columns of `Method.diagnostics` angles


def _angle_columns(records: pd.DataFrame) -> list[str]:
    return [c for c in records.columns if c.startswith(ANGLE_PREFIX)]


def has_alignment_angles(records: pd.DataFrame) -> bool:
    """Whether any unit recorded `angle_update` diagnostics (see `methods.base.Method`)."""
    columns = _angle_columns(records)
    return bool(columns) and bool(records[columns].notna().any().any())


def alignment_angles(records: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Angle between each layer's update and backprop's gradient against epoch: one panel per
    method configuration (and dataset), one line per layer in forward order (the mean over
    seeds; the band is their min-max). The dashed line at 90 degrees is no alignment at all;
    below it an update still descends the loss."""
    columns = _angle_columns(records)
    groups = [(key, group) for key, group in records.groupby(["variant", "dataset"], sort=False)
              if group[columns].notna().any().any()]
    several_datasets = records["dataset"].nunique() > 1
    cols = min(len(groups), 3)
    fig, axes = _figure(-(-len(groups) // cols), cols)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((variant, dataset), group) in zip(axes.flat, groups):
        ax.set_title(f"{variant} ({dataset})" if several_datasets else variant)
        layers = [c for c in columns if group[c].notna().any()]
        palette = matplotlib.colormaps["viridis"]
        for i, column in enumerate(layers):
            stats = group.groupby("epoch")[column].agg(["mean", "min", "max"]).dropna()
            colour = palette(i / max(len(layers) - 1, 1) * 0.9)
            ax.plot(stats.index, stats["mean"], color=colour, marker=MARKERS[i % len(MARKERS)],
                    markersize=3, label=column.removeprefix(ANGLE_PREFIX))
            if group["seed"].nunique() > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.15,
                                linewidth=0)
        ax.axhline(90, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(-3, max(95.0, float(group[layers].max().max()) + 5))  # 0 stays visible
        if group["epoch"].nunique() <= 12:
            ax.set_xticks(sorted(group["epoch"].unique()))
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle to backprop gradient (degrees)")
        ax.legend(title="layer", fontsize=7, title_fontsize=7, loc="best")
    return fig


PLOTS = (
    Plot("accuracy_vs_epoch", "Test accuracy vs epoch", accuracy_curves("epoch", "epoch")),
    Plot("accuracy_vs_time", "Test accuracy vs training time",
         accuracy_curves("cum_time_s", "cumulative training time (s)")),
    Plot("accuracy_vs_flops", "Test accuracy vs training compute",
         accuracy_curves("cum_train_flops", "cumulative training FLOPs")),
    Plot("peak_memory", "Peak memory per method", memory_bars),
    Plot("pareto", "Accuracy vs cost", pareto),
    Plot("alignment_angles", "Alignment of each layer's update with the backprop gradient",
         alignment_angles, when=has_alignment_angles),
)


def render(plot: Plot, records: pd.DataFrame, summary: pd.DataFrame) -> bytes:
    """The figure as PNG bytes, drawn under the report's style."""
    with matplotlib.rc_context(STYLE):
        fig = plot.draw(records, summary)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
