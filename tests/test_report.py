"""The report generator on synthetic run folders written in the real on-disk format.

No training happens here: each test writes units/<id>/{unit.json, records.csv, summary.json or
failed.json} and meta.json exactly as the harness does, with numbers chosen so the expected
means, stds, joins and statuses are known.
"""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from bpfree.reports import plots, render
from bpfree.reports.published import compare, parse_method, read_published
from bpfree.reports.report import build
from bpfree.reports.tables import COST_METRICS
from PIL import Image

from bpfree.cli import main
from bpfree.records import SCHEMA_VERSION

META = {"command": "bpfree run --suite quick", "started": "2026-01-01T00:00:00+00:00",
        "resumed": [], "git_commit": "abc123", "python": "3.11.7", "torch": "2.14.1",
        "cuda": None, "device": "cpu", "device_name": "x86_64", "cpu_count": 2,
        "torch_threads": 2, "platform": "Linux", "spec": {"epochs": 2, "batch_size": 128}}


MLP = "mlp-2x256-relu"


def unit(method: str, seed: int, accs: list[float], status: str = "finished",
         dataset: str = "mnist-5k", epochs: int | None = None, network: str | None = MLP,
         schedule: str = "", **config: Any) -> dict[str, Any]:
    """One unit's description: its per-epoch test accuracies, final status and the network it
    trained (None: written by a bpfree that did not record networks)."""
    return {"method": method, "seed": seed, "accs": accs, "status": status, "dataset": dataset,
            "epochs": epochs or len(accs), "config": config or {"lr": 0.001},
            "network": network, "schedule": schedule}


def write_run(run: Path, units: list[dict[str, Any]], **meta: Any) -> Path:
    """A run folder as `bpfree run` leaves it (summary.json only for finished/diverged)."""
    (run / "units").mkdir(parents=True)
    (run / "meta.json").write_text(json.dumps({**META, **meta}))
    for u in units:
        config = json.dumps(u["config"], sort_keys=True)
        uid = f"{u['method']}__{u['dataset']}__quick__s{u['seed']}"
        if len(u["config"]) > 1 or "lr" not in u["config"]:
            uid += "__" + "-".join(str(v) for v in u["config"].values())
        folder = run / "units" / uid
        folder.mkdir()
        identity = {"schema": SCHEMA_VERSION, "unit": uid, "method": u["method"],
                    "family": "x", "dataset": u["dataset"], "seed": u["seed"], "preset": "quick",
                    "config": config, "epochs": u["epochs"], "batch_size": 128, "device": "cpu"}
        if u["network"] is not None:
            identity.update(network=u["network"], schedule=u["schedule"])
        if u["status"] != "failed-early":  # failed before the harness wrote unit.json
            (folder / "unit.json").write_text(json.dumps(identity))
        rows = [{"unit": uid, "method": u["method"], "dataset": u["dataset"], "seed": u["seed"],
                 "epoch": e + 1, "train_acc": acc + 0.01, "test_acc": acc, "val_acc": float("nan"),
                 "epoch_time_s": 2.0, "cum_time_s": 2.0 * (e + 1),
                 "cum_train_flops": 1e9 * (e + 1), "train_loss": 0.5}
                for e, acc in enumerate(u["accs"])]
        if rows:
            pd.DataFrame(rows).to_csv(folder / "records.csv", index=False)
        if u["status"] in ("failed", "failed-early"):
            (folder / "failed.json").write_text(json.dumps({
                "unit": uid, "method": u["method"], "dataset": u["dataset"], "seed": u["seed"],
                "preset": "quick", "status": "failed", "error": "RuntimeError: boom"}))
        elif u["status"] in ("finished", "diverged"):
            summary = {**identity, "status": u["status"], "epochs_done": len(rows),
                       "final_test_acc": u["accs"][-1], "best_test_acc": max(u["accs"]),
                       "final_train_acc": u["accs"][-1] + 0.01, "final_val_acc": float("nan"),
                       "train_time_s": 2.0 * len(rows), "time_per_epoch_s": 2.0,
                       "throughput_img_s": 1000.0 * (u["seed"] + 1), "target_acc": 0.95,
                       "time_to_target_s": 2.0 if max(u["accs"]) >= 0.95 else float("nan"),
                       "params": 1000,
                       "flops_train_step": 3e9 if u["method"].startswith("backprop") else 6e9,
                       "flops_predict": 1e9, "act_bytes_peak": 2**20, "act_bytes_total": 2**21,
                       "peak_mem_bytes": (10 if u["method"].startswith("backprop") else 5) * 2**20,
                       "peak_mem_kind": "cpu-live-tensors", "process_peak_rss_bytes": 2**30}
            (folder / "summary.json").write_text(json.dumps(summary))
    return run


def test_aggregation_gives_known_mean_std_and_n(tmp_path):
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.50, 0.90]), unit("backprop", 1, [0.60, 0.92]),
        unit("backprop", 2, [0.95, 0.94]), unit("fg-a", 0, [0.40, 0.80]),
    ])
    doc, frames, _, _ = build([run])
    acc = frames["accuracy"].set_index("variant")
    assert acc.loc["backprop", "n"] == 3 and acc.loc["backprop", "seeds"] == "0 1 2"
    assert acc.loc["backprop", "final_test_acc_mean"] == pytest.approx(0.92)
    assert acc.loc["backprop", "final_test_acc_std"] == pytest.approx(0.02)
    assert acc.loc["backprop", "best_test_acc_mean"] == pytest.approx((0.90 + 0.92 + 0.95) / 3)
    assert acc.loc["fg-a", "n"] == 1 and math.isnan(acc.loc["fg-a", "final_test_acc_std"])
    assert acc.loc["fg-a", "vs_twin_final_test_acc"] == pytest.approx(0.80 - 0.92)
    text = render.markdown(doc)
    assert "**mnist-5k, network mlp-2x256-relu**" in text
    assert "| backprop | 3 | **92.00 ± 2.00** | twin |" in text
    assert "| fg-a | 1 | 80.00 | -12.00 |" in text  # one seed: no std shown
    cost = frames["cost"].set_index("variant")
    assert cost.loc["fg-a", "twin"] == "backprop"
    assert cost.loc["fg-a", "flops_train_step_ratio"] == pytest.approx(2.0)
    assert cost.loc["fg-a", "peak_mem_bytes_ratio"] == pytest.approx(0.5)
    assert cost.loc["backprop", "target_reached"] == 1  # only seed 2 reached 95%
    # a rate averages harmonically over seeds, to agree with the mean time per epoch
    assert cost.loc["backprop", "throughput_img_s"] == pytest.approx(3 / (1 / 1000 + 1 / 2000 + 1 / 3000))


def test_sampling_methods_report_mean_and_standard_error_over_runs_and_seeds(tmp_path):
    """NoProp's protocol: R inference runs per seed, the mean ± standard error over all runs of
    all seeds. Seeds' summaries hold their runs' mean and standard error; the report's pooled
    standard error must equal the one computed from the six runs' accuracies themselves."""
    runs = {0: [0.90, 0.92, 0.94], 1: [0.95, 0.96, 0.97]}
    run = write_run(tmp_path / "run", [unit("noprop-dt", seed, [0.5, sum(r) / 3])
                                       for seed, r in runs.items()] + [unit("backprop", 0, [0.9, 0.95])])
    for seed, accs in runs.items():
        path = run / "units" / f"noprop-dt__mnist-5k__quick__s{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        se = pd.Series(accs).std(ddof=1) / math.sqrt(len(accs))
        path.write_text(json.dumps({**summary, "inference_runs": 3, "final_test_acc_se": se}))
    doc, frames, _, _ = build([run])
    acc = frames["accuracy"].set_index("variant")
    every_run = pd.Series(runs[0] + runs[1])
    assert acc.loc["noprop-dt", "runs"] == 3 and acc.loc["backprop", "runs"] == 1
    assert acc.loc["noprop-dt", "final_test_acc_mean"] == pytest.approx(every_run.mean())
    assert acc.loc["noprop-dt", "final_test_acc_se"] == pytest.approx(
        every_run.std(ddof=1) / math.sqrt(len(every_run)))
    assert math.isnan(acc.loc["backprop", "final_test_acc_se"])
    # the one "±" rule every table (accuracy, published comparison) reads: s.e. when sampled
    assert acc.loc["noprop-dt", "final_test_acc_spread"] == acc.loc["noprop-dt",
                                                                     "final_test_acc_se"]
    assert math.isnan(acc.loc["backprop", "final_test_acc_spread"])  # one seed: no std
    text = render.markdown(doc)
    se = 100 * every_run.std(ddof=1) / math.sqrt(6)
    assert f"| noprop-dt | 2 × 3 runs | {100 * every_run.mean():.2f} ± {se:.2f} |" in text
    assert "mean ± standard error over all R inference runs of all seeds" in text


def write_evaluations(run: Path, rows: list[tuple[str, int, str, list[float], list[float]]]
                      ) -> None:
    """RUN_DIR/evaluations.csv as `bpfree evaluate` writes it: one row per (method, seed,
    setting) with the runs' mean and standard error on validation and test."""
    def mean_se(values: list[float]) -> tuple[float, float]:
        series = pd.Series(values)
        return series.mean(), (series.std(ddof=1) / math.sqrt(len(series))
                               if len(series) > 1 else float("nan"))
    out = []
    for method, seed, setting, val, test in rows:
        (val_mean, val_se), (test_mean, test_se) = mean_se(val), mean_se(test)
        out.append({"unit": f"{method}__mnist-5k__quick__s{seed}", "method": method,
                    "dataset": "mnist-5k", "seed": seed, "epochs": 2, "setting": setting,
                    "sampler": json.loads(setting).get("sampler"), "val_acc": val_mean,
                    "val_acc_se": val_se, "test_acc": test_mean, "test_acc_se": test_se,
                    "inference_runs": len(test), "eval_time_s": 0.5})
    pd.DataFrame(out).to_csv(run / "evaluations.csv", index=False)


def test_inference_settings_of_kept_models_are_pooled_over_runs_and_seeds(tmp_path):
    """`bpfree evaluate`'s rows become one row per method and setting: mean ± s.e. over all
    runs of all seeds when sampled, ± std over seeds when not; the best validation accuracy
    of each method is marked (never the best test); a row evaluated twice counts once."""
    run = write_run(tmp_path / "run", [unit("noprop-dt", s, [0.5, 0.9]) for s in (0, 1)]
                    + [unit("backprop", s, [0.5, 0.95]) for s in (0, 1)])
    anc = {0: ([0.90, 0.92, 0.94], [0.91, 0.93, 0.99]), 1: ([0.88, 0.90, 0.92], [0.89, 0.91, 0.99])}
    mean = {0: ([0.95] * 3, [0.94] * 3), 1: ([0.97] * 3, [0.96] * 3)}
    ancestral, noise_free = '{"sampler": "ancestral"}', '{"sampler": "mean"}'
    write_evaluations(run, [("noprop-dt", s, ancestral, *anc[s]) for s in (0, 1)]
                      + [("noprop-dt", s, noise_free, *mean[s]) for s in (0, 1)]
                      + [("backprop", 0, "{}", [0.93], [0.95]),
                         ("backprop", 1, "{}", [0.95], [0.96])])
    # an older file may hold one evaluation twice: it must not count twice
    rows = pd.read_csv(run / "evaluations.csv")
    pd.concat([rows, rows.iloc[[0]]]).to_csv(run / "evaluations.csv", index=False)

    doc, frames, _, _ = build([run])
    table = frames["inference_settings"].set_index(["variant", "setting"])
    every_test = pd.Series(anc[0][1] + anc[1][1])
    row = table.loc[("noprop-dt", ancestral)]
    assert row["n"] == 2 and row["runs"] == 3
    assert row["test_acc_mean"] == pytest.approx(every_test.mean())
    assert row["test_acc_spread"] == pytest.approx(every_test.std(ddof=1) / math.sqrt(6))
    deterministic = table.loc[("backprop", "{}")]
    assert deterministic["runs"] == 1 and deterministic["test_acc_spread"] == pytest.approx(
        pd.Series([0.95, 0.96]).std(ddof=1))
    text = render.markdown(doc)
    # ancestral has the higher test accuracy (95.33) but the lower validation: not marked
    assert f"| noprop-dt | sampler=ancestral | 2 × 3 runs | 91.00 ± {100 * pd.Series(anc[0][0] + anc[1][0]).std(ddof=1) / math.sqrt(6):.2f} |" in text
    assert "| noprop-dt | sampler=mean | 2 × 3 runs | **96.00 ± 0.45** | 95.00 ± 0.45 |" in text
    assert "| backprop | as trained | 2 | 94.00 ± 1.41 | 95.50 ± 0.71 |" in text
    # settings in numeric order, as typed on the command line ("100" after "20")
    steps = [json.dumps({"inference_steps": n}) for n in ("100", "20", "10")]
    write_evaluations(run, [("noprop-dt", 0, st, [0.9], [0.9]) for st in steps])
    order = build([run])[1]["inference_settings"]["setting"].tolist()
    assert order == [steps[2], steps[1], steps[0]]
    # without evaluations there is no such section or file
    plain_run = write_run(tmp_path / "plain", [unit("backprop", 0, [0.9])])
    doc, frames, _, _ = build([plain_run])
    assert "inference_settings" not in frames
    assert "Inference settings" not in render.markdown(doc)


def test_a_method_is_compared_only_with_backprop_on_its_own_network(tmp_path):
    """The twin is backprop on the same network, dataset and budget: a method on another
    network, another budget, or with no network recorded gets no ratio and no accuracy
    difference, and says so; each network and budget's rows form one group, the twin first,
    and a value is marked best only within its group."""
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.9], network="cnn", arch="cnn"),
        unit("backprop", 0, [0.8], arch="mlp"),
        unit("fg-a", 0, [0.7]),
        unit("pepita", 0, [0.6], network="mlp-1x256-relu-nobias"),
        unit("dtp", 0, [0.5, 0.95], epochs=2),  # mlp-2x256-relu, but another epoch budget
        unit("ff", 0, [0.4], network=None),  # an older record: no network
    ])
    doc, frames, _, _ = build([run])
    cost = frames["cost"].set_index("variant")
    assert cost.loc["fg-a", "twin"] == "backprop (arch=mlp)"
    assert cost.loc["fg-a", "flops_train_step_ratio"] == pytest.approx(2.0)
    for lonely in ("pepita", "dtp", "ff"):
        assert cost.loc[lonely, "twin"] == ""
        assert cost.loc[lonely, [f"{m}_ratio" for m in COST_METRICS]].isna().all(), lonely
    acc = frames["accuracy"]
    assert math.isnan(acc.set_index("variant").loc["pepita", "vs_twin_final_test_acc"])
    # grouped: dataset, then network, then budget, the twin first in its group
    assert list(zip(acc["network"], acc["variant"])) == [
        ("", "ff"), ("cnn", "backprop (arch=cnn)"), ("mlp-1x256-relu-nobias", "pepita"),
        ("mlp-2x256-relu", "backprop (arch=mlp)"), ("mlp-2x256-relu", "fg-a"),
        ("mlp-2x256-relu", "dtp")]
    text = render.markdown(doc)
    ratios = text.split("## Cost relative to the backprop twin")[1].split("## ")[0]
    assert "| fg-a | backprop (arch=mlp) | 1.00× | 1.00× | - | 0.50× |" in ratios
    assert "| pepita | no backprop twin | - | - | - | - |" in ratios
    assert "| backprop (arch=cnn) | (itself) | 1.00× |" in ratios
    assert "**mnist-5k, network (not recorded)**" in ratios
    section = text.split("## Accuracy")[1].split("## ")[0]
    assert "| pepita | 1 | 60.00 | no backprop twin |" in section
    assert "| fg-a | 1 | 70.00 | -10.00 |" in section
    # best values are marked within a network's group, never across networks
    assert "| pepita | 1 | 60.00 |" in section and "| backprop (arch=cnn) | 1 | 90.00 |" in section
    assert "| backprop (arch=mlp) | 2 |" not in section
    assert "| backprop (arch=mlp) | 1 | **80.00** | twin |" in section
    # dtp's 95% (2 epochs) is the highest on its network, but not of the same budget: its own
    # group, under a label naming the budget, not better than anything
    one, two = (f"mnist-5k, network mlp-2x256-relu, epochs {e}, batch 128, cpu" for e in (1, 2))
    assert section.index(f"**{one}**") < section.index("| fg-a |") < section.index(f"**{two}**")
    assert "| dtp | 1 | 95.00 | no backprop twin |" in section
    assert "**95.00**" not in text
    html = render.html_page(doc)
    assert html.count(f'<p class="group">{one}</p>') == 3
    assert html.count(f'<p class="group">{two}</p>') == 3
    tex = render.latex(doc)
    assert rf"\multicolumn{{8}}{{@{{}}l}}{{\textit{{{one}}}}}" in tex


def test_variants_of_one_method_get_separate_labelled_rows(tmp_path):
    run = write_run(tmp_path / "run", [
        unit("noprop-dt", 0, [0.8], embedding="one-hot", network="noprop-dt-T3-one-hot"),
        unit("noprop-dt", 0, [0.7], embedding="prototype", network="noprop-dt-T3-prototype"),
        unit("backprop-blocks", 0, [0.9], network="noprop-dt-T3-one-hot"),
    ])
    _, frames, _, _ = build([run])
    assert set(frames["accuracy"]["variant"]) == {
        "noprop-dt (embedding=one-hot)", "noprop-dt (embedding=prototype)", "backprop-blocks"}
    twins = frames["cost"].set_index("variant")["twin"]
    assert twins["noprop-dt (embedding=one-hot)"] == "backprop-blocks"  # the blocks' twin
    assert twins["noprop-dt (embedding=prototype)"] == ""  # other blocks: no twin ran
    other = write_run(tmp_path / "other", [unit("noprop-dt", 0, [0.9, 0.9], dataset="mnist",
                                                embedding="one-hot")])
    labels = build([run, other])[1]["accuracy"].set_index("dataset")["variant"]
    assert labels["mnist"] == "noprop-dt"  # its only configuration on that dataset


NOPROP_SOURCE = "Li, Teh, Pascanu 2025"


def test_published_numbers_join_only_runs_of_the_same_setup(tmp_path):
    run = write_run(tmp_path / "run", [
        unit("noprop-dt", 0, [0.99] * 100, dataset="mnist", embedding="one-hot", embed_dim=20,
             network="noprop-dt-T10-one-hot"),
        unit("noprop-dt", 0, [0.98] * 100, dataset="mnist", embedding="learned", embed_dim=20,
             network="noprop-dt-T10-learned20"),
        unit("backprop-blocks", 0, [0.97] * 3, dataset="mnist", embedding="one-hot",
             network="noprop-dt-T10-one-hot"),  # the paper's network, 3 of its 100 epochs
        unit("backprop", 0, [0.97], dataset="mnist"),
        unit("dtp", 0, [0.9] * 500, dataset="mnist", network="mlp-5x256-relu",
             schedule="parallel"),
        unit("fg-w", 0, [0.90], dataset="mnist", status="running", epochs=3),
    ])
    doc, frames, _, _ = build([run])
    comp, other = frames["published_comparison"], frames["published_other_setups"]
    test = comp[(comp["metric"] == "test acc %") & comp["source"].str.startswith(NOPROP_SOURCE)]
    got = {(r.variant, r.published): (r.ours, r.difference) for r in test.itertuples()}
    assert got == {("noprop-dt (embedding=one-hot)", 99.47): (pytest.approx(99.0),
                                                               pytest.approx(99.0 - 99.47)),
                   ("noprop-dt (embedding=learned)", 99.49): (pytest.approx(98.0),
                                                              pytest.approx(98.0 - 99.49))}
    assert not comp["dataset"].isin(["cifar10", "cifar100"]).any()  # only datasets we ran
    assert (comp["network"] == "noprop-dt-T10-one-hot").sum() == 2  # train and test
    # Everything else is in "other setups", with the reason, and never with a difference.
    assert "difference" not in other
    reasons = {(r.method, r.network, r.schedule): r.reason for r in other.itertuples()
               if r.metric == "test acc % (100 - error)"}
    assert reasons[("backprop", "localmixer-S/1/1", "")] == (
        "network localmixer-S/1/1 (ours: mlp-2x256-relu)")
    assert reasons[("dtp", "mlp-5x256-tanh", "alternating")] == (
        "network mlp-5x256-tanh (ours: mlp-5x256-relu)")
    blocks = other[(other["method"] == "backprop-blocks") & (other["metric"] == "test acc %")]
    assert set(blocks["reason"]) >= {"100 epochs (ours: 3)"}
    prototype = other[other["network"] == "noprop-dt-T10-prototype"]
    assert set(prototype["method"]) == {"noprop-dt", "backprop-blocks"}
    assert not set(comp["method"]) & {"backprop", "fg-w", "dtp"}
    text = render.markdown(doc)
    assert "| noprop-dt (embedding=one-hot) | test acc % | 99.00 | 100 | 99.47 | -0.47 |" in text
    assert "## Published results, other setups" in text
    assert r"99.54 $\pm$ 0.04" in render.latex(doc)  # the paper's ± survives LaTeX escaping


def _variant(pub: Any, method: str, config: str, network: str, variant: str) -> dict[str, Any]:
    """A row of our variants for `compare`: the published row's method, settings, schedule
    and epochs (7 where it states none), on `network`."""
    return {"dataset": pub.dataset, "variant": variant, "method": method, "network": network,
            "schedule": pub.schedule, "config": config,
            "epochs": pub.epochs if math.isfinite(pub.epochs) else 7,
            "final_test_acc_mean": 0.5, "final_test_acc_spread": float("nan"),
            "final_train_acc_mean": 0.5, "final_train_acc_spread": float("nan"),
            "peak_mem_bytes": 1e9, "peak_mem_kind": "cuda-allocator", "n": 1, "partial": False}


def test_a_published_number_is_never_joined_to_a_run_on_another_network():
    """Every row of published.csv with a declared network, offered our variants of its
    method on every network bpfree has (its own network relabelled), joins none of them;
    offered its own network (and epochs and schedule) it joins exactly that one."""
    published = read_published()
    declared = published[published["network"] != "unknown"]
    assert len(declared) > 100
    joined_any = 0
    for pub in declared.itertuples():
        name, wanted = parse_method(pub.method)
        ours = partial(_variant, pub, name, json.dumps(wanted))
        frame = pd.DataFrame([ours(pub.network + "-other", "elsewhere"),
                              ours("cnn" if pub.network != "cnn" else "mlp-2x256-relu", "cnn"),
                              ours(pub.network, "same")])
        comp, other, _ = compare(frame, published.loc[[pub.Index]])
        assert set(comp["variant"]) <= {"same"}, pub
        assert (comp["network"] == pub.network).all()
        if len(comp):
            joined_any += 1
        else:  # only a source that states no epochs for an accuracy stays out
            assert other["reason"].iloc[0].endswith("; epochs not stated by the source"), pub
    assert joined_any > 50


def test_an_unfinished_run_joins_its_published_row_without_a_difference():
    """A run still short of its epochs is shown next to the published number, labelled, but
    its accuracy so far is not subtracted from one measured after all the epochs."""
    published = read_published()
    pub = next(p for p in published.itertuples()
               if p.network != "unknown" and math.isfinite(p.epochs) and p.metric == "test_acc")
    name, wanted = parse_method(pub.method)
    for unfinished in (False, True):
        row = {**_variant(pub, name, json.dumps(wanted), pub.network, "ours"),
               "partial": unfinished}
        comp, _, _ = compare(pd.DataFrame([row]), published.loc[[pub.Index]])
        assert len(comp) == 1
        assert math.isnan(comp["difference"].iloc[0]) == unfinished
        assert comp["variant"].iloc[0].endswith("(unfinished)") == unfinished, comp["variant"]


def test_published_rows_without_a_network_are_never_joined():
    published = read_published()
    unknown = published[published["network"] == "unknown"]
    assert {"dtp", "dfa", "ff-unsupervised"} <= set(unknown["method"].str.split().str[0])
    for pub in unknown.itertuples():
        name, wanted = parse_method(pub.method)
        frame = pd.DataFrame([{"dataset": pub.dataset, "variant": name, "method": name,
                               "network": "unknown", "schedule": "", "config": json.dumps(wanted),
                               "epochs": 100, "final_test_acc_mean": 0.5,
                               "final_test_acc_spread": float("nan"), "n": 1, "partial": False}])
        comp, other, _ = compare(frame, published.loc[[pub.Index]])
        assert comp.empty and other["reason"].tolist() == ["network not stated by the source"]


def test_published_csv_is_valid_data_and_method_specs_parse():
    published = read_published()
    assert {"Table 1", "Table 3"} <= set(published["table"])
    assert parse_method("noprop-dt embedding=learned embed_dim=20") == (
        "noprop-dt", {"embedding": "learned", "embed_dim": 20})
    row = published[(published["method"] == "noprop-dt embedding=prototype")
                    & (published["dataset"] == "cifar10") & (published["metric"] == "test_acc")]
    assert row["value"].tolist() == [80.54] and row["std"].tolist() == [0.20]
    assert row["network"].tolist() == ["noprop-dt-T10-prototype"] and row["epochs"].tolist() == [150]
    # the corrections of issue 14
    dtp = published[(published["method"] == "dtp") & (published["dataset"] == "mnist")]
    assert dict(zip(dtp["schedule"], dtp["value"])) == {"parallel": 2.86, "alternating": 1.83}
    ren = published[published["source"].str.startswith("Ren") & (published["dataset"] == "mnist")]
    assert set(ren["network"]) == {"localmixer-S/1/1", "localmixer-M/1/16"}
    assert "forward-forward" not in set(published["method"])
    hinton = published[published["source"].str.startswith("Hinton")]
    assert dict(zip(hinton["method"], hinton["network"])) == {
        "ff-unsupervised": "unknown",  # NoProp's 98.63: Hinton's unsupervised FF, second-hand
        "ff goodness=sum negatives=hard goodness_from=1": "mlp-4x2000-relu"}  # supervised 1.36
    biotorch = published[published["source"].str.contains("biotorch")]
    assert len(biotorch) == 12 and biotorch["note"].str.contains("SELECTED ON TEST").all()


def _ours(method: str, network: str, epochs: int, variant: str = "", **config: Any
          ) -> dict[str, Any]:
    return {"dataset": "mnist", "variant": variant or method, "method": method,
            "network": network, "schedule": "", "config": json.dumps(config), "epochs": epochs,
            "final_test_acc_mean": 0.5, "final_test_acc_spread": float("nan"),
            "final_train_acc_mean": 0.5, "final_train_acc_spread": float("nan"), "n": 1,
            "partial": False}


PEPITA_PAPER = {"lr": 0.1, "f_scale": 0.05, "dropout": 0.1, "decay_epochs": "60,90"}
FF_PAPER = {"goodness": "sum", "negatives": "hard", "goodness_from": 1}


def test_feedback_alignment_and_forward_only_numbers_join_only_their_setups():
    """PEPITA's Table 1 joins PEPITA's own recipe on its bias-free 1 x 1024 net for 100 epochs
    (and its BP row backprop on that net), Hinton's supervised FF 1.36% only FF's paper recipe
    on 4 x 2000 for 60 epochs, and biotorch's LeNet numbers (selected on test) nothing of
    bpfree's: every other pairing goes to "other setups" with its reason."""
    ours = pd.DataFrame([
        _ours("pepita", "mlp-1x1024-relu-nobias", 100, "pepita paper", **PEPITA_PAPER),
        _ours("pepita", "mlp-1x1024-relu-nobias", 100, "pepita lr", **{**PEPITA_PAPER, "lr": 0.05}),
        _ours("backprop", "mlp-1x1024-relu", 100),  # with biases: not PEPITA's BP net
        _ours("ff", "mlp-4x2000-relu", 60, "ff paper", **FF_PAPER),
        _ours("ff", "mlp-4x2000-relu", 60, "ff mean", **{**FF_PAPER, "goodness": "mean"}),
        _ours("ff", "mlp-4x2000-relu", 30, "ff 30", **FF_PAPER),
        _ours("fa", "cnn", 100), _ours("dfa", "mlp-2x256-relu", 100),
    ])
    published = read_published()
    comp, other, _ = compare(ours, published)
    joined = {(r.variant, round(r.published, 2)) for r in comp.itertuples()}
    assert joined == {("pepita paper", 98.01), ("ff paper", 98.64)}
    assert len(comp) == 2  # not the other lr, goodness or epochs
    reasons = {(r.method, r.network, r.published): r.reason for r in other.itertuples()}
    assert reasons[("backprop", "mlp-1x1024-relu-nobias", 98.63)] == (
        "network mlp-1x1024-relu-nobias (ours: mlp-1x1024-relu)")
    assert reasons[("pepita", "conv5x5x32-pool-fc", 98.29)] == (
        "network conv5x5x32-pool-fc (ours: mlp-1x1024-relu-nobias)")
    for method in ("fa", "dfa"):
        biotorch = other[(other["method"] == method) & other["source"].str.contains("biotorch")]
        assert len(biotorch) == 1 and biotorch["reason"].iloc[0].startswith(
            "network lenet-mnist-32px (ours: ")
        assert "SELECTED ON TEST" in biotorch["note"].iloc[0]
    # the bias-free twin itself does join PEPITA's BP row
    twin = pd.DataFrame([_ours("backprop", "mlp-1x1024-relu-nobias", 100, bias=False)])
    comp, _, _ = compare(twin, published)
    assert comp["published"].tolist() == [98.63]


def test_compare_lists_methods_not_in_the_report_and_checks_the_schedule():
    ours = pd.DataFrame([{"dataset": "d", "variant": "a", "method": "a", "config": "{}",
                          "network": "n", "schedule": "parallel", "final_test_acc_mean": 0.5,
                          "final_test_acc_spread": float("nan"), "n": 1, "epochs": 1,
                          "partial": False}])
    pub = pd.DataFrame([{"source": "s", "table": "T", "method": m, "dataset": "d",
                         "metric": "test_acc", "value": 40.0, "std": float("nan"),
                         "network": "n", "epochs": 1, "schedule": schedule, "note": ""}
                        for m, schedule in (("a", ""), ("a", "parallel"), ("a", "alternating"),
                                            ("b", ""))])
    comp, other, absent = compare(ours, pub)
    assert comp["variant"].tolist() == ["a", "a"] and comp["difference"].tolist() == [10.0, 10.0]
    assert other["reason"].tolist() == ["schedule alternating (ours: parallel)"]
    assert absent == ["b"]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values["src"] or "")
        self.links += [v or "" for k, v in attrs if k in ("href", "src")]


def test_every_file_is_written_pngs_decode_and_html_embeds_them(tmp_path):
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.5, 0.9]), unit("backprop", 1, [0.6, 0.91]),
        unit("noprop-dt", 0, [0.4, 0.7, 0.1], status="diverged"),
        unit("fg-w", 0, [0.3], status="running", epochs=2),
    ])
    assert main(["report", str(run)]) == 0
    out = run / "report"
    names = {p.name for p in out.iterdir()}
    pngs = {f"{p.key}.png" for p in plots.PLOTS if p.when is None}  # no diagnostics here
    assert names == {"report.md", "index.html", "tables.tex", "accuracy.csv", "cost.csv",
                     "published_comparison.csv", "published_other_setups.csv"} | pngs
    for name in pngs:
        assert Image.open(out / name).verify() is None
        assert f"]({name})" in (out / "report.md").read_text()
    parser = _Images()
    parser.feed((out / "index.html").read_text())
    assert len(parser.sources) == len(pngs)
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not any(link.startswith(("http:", "https:", "//")) for link in parser.links)
    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{table}") == 3 and tex.count(r"\bottomrule") == 3  # no published
    assert r"\label{tab:bpfree-accuracy}" in tex and r"\label{tab:bpfree-published}" not in tex
    assert pd.read_csv(out / "accuracy.csv")["variant"].tolist() == ["backprop", "fg-w", "noprop-dt"]
    assert "| backprop | 2 |" in (out / "report.md").read_text()


def test_diverged_running_and_failed_units_are_shown_not_dropped(tmp_path):
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.9, 0.95]),
        unit("noprop-dt", 0, [0.5, 0.1], status="diverged"),
        unit("noprop-dt", 1, [0.6, 0.8]),
        unit("fg-w", 0, [0.7], status="running", epochs=3),
        unit("dtp", 0, [], status="failed"),
        unit("noprop-fm", 0, [], status="failed-early"),
    ])
    text = render.markdown(build([run])[0])
    section = text.split("## Accuracy")[1].split("## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert "1 finished, 1 diverged (seed 0, epoch 2)" in rows["noprop-dt"]
    assert "| noprop-dt | 2 | 45.00 ± 49.50 |" in rows["noprop-dt"]  # diverged counts
    assert "1 unfinished (seed 0: 1/3 epochs)" in rows["fg-w"] and "**" not in rows["fg-w"]
    assert "| fg-w | 1 | 70.00 |" in rows["fg-w"]
    assert "1 failed" in rows["dtp"]
    assert "1 failed" in rows["noprop-fm"]
    assert "dtp on mnist-5k, seed 0: RuntimeError: boom" in text
    assert "noprop-fm on mnist-5k, seed 0: RuntimeError: boom" in text


def test_no_difference_is_taken_against_an_unfinished_twin_or_from_an_unfinished_row(tmp_path):
    """A twin still running has fewer epochs than its group's budget: comparing a finished
    method with it (or a running method with a finished twin) is not like for like. Both keep
    their group; neither gets a difference (a finished 10-epoch NoProp-DT once read '+1.35'
    against its backprop-blocks twin after 1 of 10 epochs)."""
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.80], status="running", epochs=3),
        unit("fg-a", 0, [0.5, 0.6, 0.9], epochs=3),
        unit("backprop", 0, [0.7, 0.8, 0.9], epochs=2, dataset="mnist"),
        unit("fg-w", 0, [0.6], status="running", epochs=2, dataset="mnist"),
        unit("dtp", 0, [0.5, 0.85], epochs=2, dataset="mnist"),
    ])
    doc, frames, _, _ = build([run])
    acc = frames["accuracy"].set_index(["dataset", "variant"])
    assert acc.loc[("mnist-5k", "fg-a"), "twin"] == "backprop"  # still its group's twin
    assert math.isnan(acc.loc[("mnist-5k", "fg-a"), "vs_twin_final_test_acc"])
    assert math.isnan(acc.loc[("mnist", "fg-w"), "vs_twin_final_test_acc"])
    assert acc.loc[("mnist", "dtp"), "vs_twin_final_test_acc"] == pytest.approx(0.85 - 0.90)
    text = render.markdown(doc)
    assert "| fg-a | 1 | 90.00 | unfinished: no difference |" in text
    assert "| fg-w | 1 | 60.00 | unfinished: no difference |" in text
    assert "| dtp | 1 | 85.00 | -5.00 |" in text


def test_long_variant_labels_leave_every_plot_room_to_draw(tmp_path):
    """Variants labelled by a long setting ('noprop-ct (schedule_weight_decay=False)') once
    squeezed the memory plot's axes to nothing beside its legend (matplotlib then warns and
    draws them collapsed): every plot must lay out without that warning."""
    run = write_run(tmp_path / "run", [
        unit("noprop-ct", 0, [0.5, 0.9], schedule_weight_decay=False, lr=0.001),
        unit("noprop-ct", 0, [0.5, 0.8], schedule_weight_decay=True, lr=0.001),
        unit("noprop-fm", 0, [0.6, 0.95])])
    _, _, records, summary = build([run])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for plot in plots.PLOTS:
            if plot.applies(records):
                Image.open(io.BytesIO(plots.render(plot, records, summary))).verify()


def test_a_dirty_commit_is_shown_with_the_code_digest_that_names_it(tmp_path):
    run = write_run(tmp_path / "run", [unit("backprop", 0, [0.9])],
                    git_commit="abc123-dirty", code_digest="0123456789abcdef")
    text = render.markdown(build([run])[0])
    assert "| abc123-dirty (code 0123456789abcdef) |" in text
    assert "`python -m bpfree.version DIR`" in text


def test_merging_runs_warns_when_device_or_versions_differ(tmp_path):
    a = write_run(tmp_path / "a", [unit("backprop", 0, [0.9])])
    b = write_run(tmp_path / "b", [unit("backprop", 1, [0.8])], torch="2.5.0",
                  device="cuda:0", device_name="NVIDIA H100")
    doc = build([a, b])[0]
    assert any("differ in device" in w for w in doc.warnings)
    assert any("differ in torch version" in w for w in doc.warnings)
    assert not any("Python" in w for w in doc.warnings)
    same = build([a, write_run(tmp_path / "c", [unit("backprop", 2, [0.8])])])[0]
    assert same.warnings == []


def test_method_colours_follow_the_name_not_the_report():
    """A method keeps its colour from report to report, and no two methods of one report
    share one (a clash moves the later name to the next free colour)."""
    both = plots.method_colours(["backprop", "noprop-dt"])
    assert plots.method_colours(["noprop-dt"])["noprop-dt"] == both["noprop-dt"]
    assert plots.method_colours(["backprop"])["backprop"] == both["backprop"]
    colours = plots.method_colours([f"m{i}" for i in range(20)])  # as many as colours
    assert len(set(colours.values())) == len(colours) == 20


def _corrupt_summary(run: Path) -> str:
    path = next((run / "units").glob("*/summary.json"))
    path.write_text('{"schema": 1, "unit": ')
    return str(path)


def _old_schema(run: Path) -> str:
    path = next((run / "units").glob("*/summary.json"))
    summary = json.loads(path.read_text())
    del summary["schema"]
    path.write_text(json.dumps(summary))
    return str(path)


def _bad_records(run: Path) -> str:
    path = next((run / "units").glob("*/records.csv"))
    path.write_text("unit,epoch\nx,1\n")
    return str(path)


def _bad_evaluations(run: Path) -> str:
    path = run / "evaluations.csv"
    path.write_text("unit,setting,val_acc\nx,{},0.9\n")
    return str(path)


def _no_meta(run: Path) -> str:
    (run / "meta.json").unlink()
    return str(run / "meta.json")


@pytest.mark.parametrize("damage,message", [
    (_corrupt_summary, "corrupt JSON"),
    (_old_schema, "has no schema field (an older bpfree), but this bpfree reads records schema 1"),
    (_bad_records, "missing column(s) method, dataset, seed, test_acc"),
    (_no_meta, "is missing"),
    (_bad_evaluations, "missing column(s) val_acc_se, test_acc, test_acc_se, inference_runs"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, damage, message):
    run = write_run(tmp_path / "run", [unit("backprop", 0, [0.9])])
    path = damage(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path in err and message in err


@pytest.mark.parametrize("args,message", [
    (["{a}", "{a}", "--out", "{tmp}/o"], "pass each run folder once"),
    (["{a}", "{b}"], "pass --out DIR"),
    (["{a}", "--formats", "md,pdf"], "--formats 'md,pdf'"),
    (["{tmp}/nowhere"], "does not exist"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    a = write_run(tmp_path / "a", [unit("backprop", 0, [0.9])])
    b = write_run(tmp_path / "b", [unit("backprop", 1, [0.9])])
    args = [x.format(a=a, b=b, tmp=tmp_path) for x in args]
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_formats_subset_writes_only_those(tmp_path, capsys):
    run = write_run(tmp_path / "run", [unit("backprop", 0, [0.9])])
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--formats", "tex,csv"]) == 0
    assert f"report: {tmp_path / 'out' / 'tables.tex'}" in capsys.readouterr().out
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".csv"] * 4 + [".tex"]



def test_a_run_where_every_unit_failed_still_reports_the_failures(tmp_path):
    run = write_run(tmp_path / "run", [unit("dtp", 0, [], status="failed"),
                                        unit("fg-w", 0, [], status="failed-early")])
    text = render.markdown(build([run])[0])
    assert "dtp on mnist-5k, seed 0: RuntimeError: boom" in text
    assert "fg-w on mnist-5k, seed 0: RuntimeError: boom" in text


def test_older_records_get_their_network_from_their_configuration(tmp_path, capsys):
    """Records written before bpfree recorded networks (the committed evidence of the FA
    family, PEPITA and FF): `bpfree report` derives each unit's network and schedule from its
    configuration with its method's `network_of`, so that a method meets its twin; a report
    built without the methods cannot, and says the network is not recorded; a method that is
    no longer registered gets no guessed network."""
    run = write_run(tmp_path / "run", [
        unit("backprop", 0, [0.9], network=None, arch="mlp", width=256, depth=2),
        unit("fa", 0, [0.8], network=None, arch="mlp", width=256, depth=2),
        unit("backprop", 0, [0.95], network=None, arch="cnn", width=256, depth=2),
        unit("pepita", 0, [0.85], network=None, width=256, depth=1, bias=False),
        unit("dtp", 0, [0.7], network=None, arch="mlp", lr=0.001),
        unit("gone", 0, [0.6], network=None, arch="mlp", lr=0.001),
    ])
    bare = build([run])[1]["cost"]
    assert (bare["network"] == "").all() and (bare["twin"] == "").all()
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--formats", "md,csv"]) == 0
    text = capsys.readouterr().out
    cost = pd.read_csv(tmp_path / "out" / "cost.csv", keep_default_na=False)
    cost = cost.set_index("method" if cost["method"].is_unique else "variant")
    assert cost.loc["fa", "network"] == "mlp-2x256-relu"
    assert cost.loc["fa", "twin"] == "backprop (arch=mlp)"
    assert float(cost.loc["fa", "flops_train_step_ratio"]) == pytest.approx(2.0)
    assert cost.loc["pepita", "network"] == "mlp-1x256-relu-nobias"
    assert cost.loc["pepita", "twin"] == ""  # no bias-free backprop ran
    assert cost.loc["dtp", "schedule"] == "parallel"
    assert cost.loc["gone", "network"] == "" and cost.loc["gone", "twin"] == ""
    assert "The network of 5 unit(s) is not in their records" in text
    ratios = text.split("## Cost relative")[1].split("## ")[0]
    assert "| fa | backprop (arch=mlp) |" in ratios and "| pepita | no backprop twin |" in ratios


def test_reports_need_neither_torch_nor_the_methods(tmp_path):
    """A report is made from CSV and JSON files alone: in a process where importing torch
    or bpfree.methods fails, bpfree.reports still imports and renders every format."""
    run = write_run(tmp_path / "run", [unit("backprop", 0, [0.8, 0.9]),
                                       unit("noprop-dt", 0, [0.7, 0.85])])
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "bpfree.methods")):
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
from bpfree.reports.report import write_report
path, text = write_report([__import__("pathlib").Path({str(run)!r})])
assert "backprop" in text and "noprop-dt" in text, text
assert "torch" not in sys.modules and "bpfree.methods" not in sys.modules
print("ok", path)
"""
    proc = __import__("subprocess").run([__import__("sys").executable, "-c", script],
                                        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "report" / "report.md").is_file() and (run / "report" / "index.html").is_file()


def test_text_from_records_is_never_markup(tmp_path):
    """A command (or path, device name, error) holding HTML or a line break is shown as
    text: no raw HTML in report.md, and no LaTeX outside the comment lines of tables.tex."""
    evil = "bpfree run --out x<script>alert(1)</script>\n\\input{x}"
    run = write_run(tmp_path / "run", [unit("backprop", 0, [0.9])], command=evil,
                    device_name="GPU <b>9000</b>\r\n\\write18{rm -rf ~}")
    doc = build([run])[0]
    md = render.markdown(doc)
    assert "<script>" not in md and "<b>" not in md
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;\\n\\input{x}" in md
    assert all(line.count("|") >= 2 for line in md.splitlines() if "alert(1)" in line)
    tex = render.latex(doc)
    for line in tex.splitlines():
        if "\\input{x}" in line or "write18" in line:
            assert line.startswith("% "), line
    assert "\\n\\input{x}" in tex
    html_page = render.html_page(doc)
    assert "<script>" not in html_page and "&lt;script&gt;" in html_page
