"""The `bpfree` CLI: listing, an end-to-end run, and one-line errors for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import pandas as pd
import pytest
from bpfree.methods import all_methods

from bpfree.cli import main
from bpfree.cost import build_method
from bpfree.measure import count_flops


def test_list_shows_every_registered_method_dataset_and_suite(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, cls in all_methods().items():
        assert name in out and cls.description in out
    for name in ["mnist-5k", "mnist", "fashion-mnist", "cifar10", "cifar100", "quick"]:
        assert name in out


def test_run_writes_records_summary_meta_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--methods", "backprop", "--dataset", "synthetic", "--epochs", "1",
            "--seeds", "0,1", "--set", "arch=mlp", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "**synthetic, network mlp-2x256-relu**" in printed
    assert "| backprop | 2 |" in printed and str(out / "report") in printed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["seed"]) == [0, 1] and set(summary["status"]) == {"finished"}
    assert (summary["final_test_acc"] > 0.9).all()
    assert set(summary["network"]) == {"mlp-2x256-relu"}  # what was trained, recorded
    assert (out / "meta.json").is_file() and (out / "report" / "report.md").is_file()
    assert '"arch": "mlp"' in summary.loc[0, "config"]


def test_inference_runs_are_averaged_and_evaluate_reproduces_them(tmp_path, capsys):
    """A sampling method's test accuracy is the mean of --inference-runs passes, with its
    standard error; the passes never change what is learned; `bpfree evaluate` on the saved
    model reproduces the recorded number and adds rows for other inference settings."""
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"runs{n}"
        args = ["run", "--methods", "noprop-dt,backprop", "--dataset", "synthetic", "--epochs", "1",
                "--set", "preset=quick", "arch=mlp", "--out", str(out), "--device", "cpu",
                "--inference-runs", str(n), "--save-model"]
        assert main(args) == 0
        runs[n] = pd.read_csv(out / "records.csv").set_index(["method", "epoch"])
    one, three = runs[1], runs[3]
    pd.testing.assert_series_equal(one["train_loss"], three["train_loss"])  # same training
    assert three.loc["noprop-dt", "inference_runs"].tolist() == [3]
    assert three.loc["backprop", "inference_runs"].tolist() == [1]  # predict does not sample
    assert three.loc["noprop-dt", "test_acc_se"].notna().all()
    assert one["test_acc_se"].isna().all() and three.loc["backprop", "test_acc_se"].isna().all()
    assert (three["eval_time_s"] > 0).all()
    capsys.readouterr()

    out = tmp_path / "runs3"
    assert main(["evaluate", str(out), "--inference-runs", "3", "--device", "cpu"]) == 0
    assert main(["evaluate", str(out), "--inference-runs", "3", "--device", "cpu",
                 "--set", "sampler=ancestral,mean"]) == 0
    rows = pd.read_csv(out / "evaluations.csv")
    recorded = three["test_acc"].xs(1, level="epoch")
    as_trained = rows.iloc[:2].set_index("method")["test_acc"]
    assert as_trained["noprop-dt"] == pytest.approx(recorded["noprop-dt"], abs=1e-12)
    assert as_trained["backprop"] == pytest.approx(recorded["backprop"], abs=1e-12)
    assert len(rows) == 2 + 3  # backprop has no sampler: measured once
    dt = rows[rows["method"] == "noprop-dt"].iloc[1:]
    assert sorted(dt["sampler"]) == ["ancestral", "mean"]
    assert dt.set_index("sampler").loc["ancestral", "test_acc"] == pytest.approx(
        recorded["noprop-dt"], abs=1e-12)


def test_evaluate_refuses_training_settings_and_unsaved_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--methods", "backprop", "--dataset", "synthetic", "--epochs", "1",
                 "--set", "arch=mlp", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "train with `bpfree run --save-model`" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--set", "lr=1"]) == 2
    assert "only inference settings can change after training" in capsys.readouterr().err


def test_cost_measures_every_method_and_input(tmp_path, capsys):
    """`bpfree cost` rows carry the harness's deterministic FLOPs and bytes for that shape,
    and a timing that is positive and ordered (min <= median <= max)."""
    out = tmp_path / "cost.csv"
    args = ["cost", "--methods", "backprop,noprop-dt", "--input", "mnist,cifar", "--repeats", "2",
            "--batch-size", "8", "--device", "cpu", "--set", "arch=mlp", "--out", str(out)]
    assert main(args) == 0
    assert "| cifar | `noprop-dt` |" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert list(zip(frame["input"], frame["method"])) == [
        ("mnist", "backprop"), ("mnist", "noprop-dt"), ("cifar", "backprop"), ("cifar", "noprop-dt")]
    assert (frame["ms_step_min"] <= frame["ms_step"]).all() and (frame["ms_step"] <= frame["ms_step_max"]).all()
    assert (frame["ms_step_min"] > 0).all() and set(frame["device"]) == {"cpu"}
    for shape in ["mnist", "cifar"]:
        method, x, y = build_method("noprop-dt", shape, "cpu", 8)
        row = frame[(frame["input"] == shape) & (frame["method"] == "noprop-dt")].iloc[0]
        assert row["gflop_step"] * 1e9 == pytest.approx(count_flops(partial(method.train_step, x, y)))
        assert row["img_s"] == pytest.approx(8 / (row["ms_step"] / 1e3))


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--methods", "nope"], "unknown method 'nope'"),
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["run", "--methods", "backprop", "--set", "nokey=1"], "no selected method has a hyperparameter 'nokey'"),
        (["run", "--methods", "backprop", "--set", "lr=abc"], "lr='abc' is not a valid float"),
        (["run", "--methods", "backprop", "--set", "lr=-1"], "lr must be a finite number > 0"),
        (["run", "--methods", "backprop", "--set", "lr=nan"], "lr must be a finite number > 0"),
        (["run", "--methods", "backprop", "--set", "lr=inf"], "lr must be a finite number > 0"),
        (["run", "--methods", "backprop", "--inference-runs", "0"], "--inference-runs must be >= 1"),
        (["evaluate", "{tmp}"], "is not a bpfree run folder"),
        (["run", "--methods", "backprop", "--set", "preset=nope"], "unknown preset 'nope'"),
        (["run", "--methods", "backprop", "--seeds", "a,b"], "--seeds"),
        (["run", "--methods", "backprop", "--dataset", "mnist"], "needs --data-dir"),
        (["run", "--methods", "backprop", "--dataset", "mnist", "--data-dir", "{tmp}"],
         "not found in {tmp}"),
        (["run", "--methods", "backprop", "--out", "/proc/bpfree-cannot-write"], "pass a writable --out"),
        (["report", "{tmp}"], "is not a bpfree run folder"),
        (["cost", "--methods", "nope"], "unknown method 'nope'"),
        (["cost", "--methods", "backprop", "--input", "imagenet"], "unknown input 'imagenet'"),
        (["cost", "--methods", "backprop", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bpfree: error:")
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "bpfree.cli", "run", "--methods", "nope"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_set_does_not_swallow_a_positional_argument():
    """`--set` takes KEY=VALUE words only: a run folder written after it stays positional."""
    from bpfree.cli import build_parser, hoist_sets

    argv = ["evaluate", "--set", "sampler=mean", "inference_steps=10", "RUN", "--device", "cpu"]
    assert hoist_sets(argv) == ["evaluate", "RUN", "--device", "cpu", "--set", "sampler=mean",
                                "inference_steps=10"]
    args = build_parser().parse_args(hoist_sets(argv))
    assert args.run_dir == "RUN" and args.set == [["sampler=mean", "inference_steps=10"]]


def test_every_option_has_help_and_version_names_the_commit(capsys):
    import argparse

    from bpfree.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in verbs.choices.items():
        for action in sub._actions:
            assert action.help, f"bpfree {name}: {action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("bpfree ") and "commit" in out
