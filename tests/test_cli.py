"""The `bpfree` CLI: listing, an end-to-end run, and one-line errors for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from benchmarks.cli import main
from methods import all_methods


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
    assert "| backprop | synthetic | 2 |" in printed and str(out / "report") in printed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["seed"]) == [0, 1] and set(summary["status"]) == {"finished"}
    assert (summary["final_test_acc"] > 0.9).all()
    assert (out / "meta.json").is_file() and (out / "report" / "report.md").is_file()
    assert '"arch": "mlp"' in summary.loc[0, "config"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--methods", "nope"], "unknown method 'nope'"),
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["run", "--methods", "backprop", "--set", "nokey=1"], "no selected method has a hyperparameter 'nokey'"),
        (["run", "--methods", "backprop", "--set", "lr=abc"], "lr='abc' is not a valid float"),
        (["run", "--methods", "backprop", "--set", "lr=-1"], "lr must be > 0"),
        (["run", "--methods", "backprop", "--set", "preset=nope"], "unknown preset 'nope'"),
        (["run", "--methods", "backprop", "--seeds", "a,b"], "--seeds"),
        (["run", "--methods", "backprop", "--dataset", "mnist"], "needs --data-dir"),
        (["run", "--methods", "backprop", "--dataset", "mnist", "--data-dir", "{tmp}"],
         "not found in {tmp}"),
        (["run", "--methods", "backprop", "--out", "/proc/bpfree-cannot-write"], "pass a writable --out"),
        (["report", "{tmp}"], "is not a bpfree run folder"),
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
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli", "run", "--methods", "nope"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
