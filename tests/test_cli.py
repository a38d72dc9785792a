"""The `bpfree` CLI: listing, an end-to-end run, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from bpfree.methods import all_methods

from bpfree import checkpoints
from bpfree.cli import main
from bpfree.cost import build_method
from bpfree.measure import count_flops
from tests.test_data import write_mnist


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
    as_trained = rows[rows["setting"] == "{}"].set_index("method")["test_acc"]
    assert as_trained["noprop-dt"] == pytest.approx(recorded["noprop-dt"], abs=1e-12)
    assert as_trained["backprop"] == pytest.approx(recorded["backprop"], abs=1e-12)
    # backprop has no sampler: measured once per call, and its second row replaced the first
    assert len(rows) == 2 + 2
    assert main(["evaluate", str(out), "--inference-runs", "3", "--device", "cpu",
                 "--set", "sampler=mean"]) == 0
    again = pd.read_csv(out / "evaluations.csv")
    assert len(again) == len(rows)  # the same unit, setting and runs again: no second row
    assert not again.duplicated(["unit", "setting", "inference_runs"]).any()
    dt = rows[rows["method"] == "noprop-dt"].iloc[1:]
    assert sorted(dt["sampler"]) == ["ancestral", "mean"]
    assert dt.set_index("sampler").loc["ancestral", "test_acc"] == pytest.approx(
        recorded["noprop-dt"], abs=1e-12)


def test_the_paper_suite_evaluates_by_the_papers_protocol(tmp_path, capsys):
    """`--suite paper-mnist` (and the sweep file of the same comparison) evaluate a sampling
    method 5 times per seed, the NoProp paper's protocol, unless --inference-runs says
    otherwise."""
    from bpfree.sweep import load_sweep

    common = ["--methods", "noprop-dt", "--dataset", "synthetic", "--epochs", "1", "--seeds",
              "0", "--set", "preset=quick", "--device", "cpu"]
    for extra, runs in (([], 5), (["--inference-runs", "2"], 2)):
        out = tmp_path / f"paper{runs}"
        assert main(["run", "--suite", "paper-mnist", *common, *extra, "--out", str(out)]) == 0
        assert pd.read_csv(out / "records.csv")["inference_runs"].tolist() == [runs]
    assert load_sweep("noprop-mnist").inference_runs == 5
    capsys.readouterr()


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


RUN = ["run", "--methods", "backprop", "--dataset", "synthetic", "--epochs", "1", "--seeds", "0",
       "--set", "arch=mlp", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-unit run folder of RUN, made once; cases copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


def _unit(run: Path) -> Path:
    return next((run / "units").iterdir())


def _copy_run(ctx) -> None:
    shutil.copytree(ctx.finished_run, ctx.tmp / "run")


def _corrupt_summary(ctx) -> None:
    _copy_run(ctx)
    (_unit(ctx.tmp / "run") / "summary.json").write_text('{"schema": 1, "unit": ')


def _unfinished(ctx) -> Path:
    """The run with its unit cut back to 'running' (summary gone): the next run resumes it."""
    _copy_run(ctx)
    unit = _unit(ctx.tmp / "run")
    (unit / "summary.json").unlink()
    return unit


def _truncated_checkpoint(ctx) -> None:
    unit = _unfinished(ctx)
    torch.save({"method": {}, "rows": [], "cum_time": 0.0, "images": 0, "rng": {}},
               unit / "checkpoint.pt")
    data = (unit / "checkpoint.pt").read_bytes()
    (unit / "checkpoint.pt").write_bytes(data[: len(data) // 3])


def _other_data(ctx) -> None:
    """The run, as if trained on other files of the same dataset (another fingerprint)."""
    _copy_run(ctx)
    meta = json.loads((ctx.tmp / "run" / "meta.json").read_text())
    meta["spec"]["data"] = "0123456789ab"
    (ctx.tmp / "run" / "meta.json").write_text(json.dumps(meta))


def _foreign_files(ctx) -> None:
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / "thesis.tex").write_text("mine")


def _mnist(ctx, damage) -> None:
    folder = ctx.tmp / "mnist"
    write_mnist(folder, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))


def _sweep_file(ctx) -> None:
    (ctx.tmp / "tiny.toml").write_text('methods = "backprop"\ndatasets = "synthetic"\n'
                                       'seeds = 0\nepochs = 1\n')


def _not_utf8_sweep(ctx) -> None:
    (ctx.tmp / "tiny.toml").write_bytes(b'methods = "backprop"\n# caf\xe9\n')


def _disk_full(ctx) -> None:
    real_open = open
    ctx.monkeypatch.setattr(checkpoints, "open", lambda path, mode: real_open("/dev/full", mode),
                            raising=False)


def _bad_baseline(ctx, text: str) -> None:
    (ctx.tmp / "ci.csv").write_text(text)
    ctx.monkeypatch.setattr("bpfree.check.measure_all",
                            lambda **kw: pytest.fail("measured before checking the baseline"))


def _offline(ctx) -> None:
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    ctx.monkeypatch.setattr(urllib.request, "urlopen", offline)
    (ctx.tmp / "mnist").mkdir()


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["run", "--methods", "nope"], "unknown method 'nope'"),
        (None, ["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (None, ["run", "--methods", "backprop", "--set", "nokey=1"], "no selected method has a hyperparameter 'nokey'"),
        (None, ["run", "--methods", "backprop", "--set", "lr=abc"], "lr='abc' is not a valid float"),
        (None, ["run", "--methods", "backprop", "--set", "lr=-1"], "lr must be a finite number > 0"),
        (None, ["run", "--methods", "backprop", "--set", "lr=nan"], "lr must be a finite number > 0"),
        (None, ["run", "--methods", "backprop", "--set", "lr=inf"], "lr must be a finite number > 0"),
        (None, ["run", "--methods", "backprop", "--inference-runs", "0"], "--inference-runs must be >= 1"),
        (None, ["evaluate", "{tmp}"], "is not a bpfree run folder"),
        (None, ["run", "--methods", "backprop", "--set", "preset=nope"], "unknown preset 'nope'"),
        (None, ["run", "--methods", "backprop", "--seeds", "a,b"], "--seeds"),
        (None, ["run", "--methods", "backprop", "--dataset", "mnist"], "needs --data-dir"),
        (None, ["run", "--methods", "backprop", "--dataset", "mnist", "--data-dir", "{tmp}"],
         "not found in {tmp}"),
        (None, ["run", "--methods", "backprop", "--out", "/proc/bpfree-cannot-write"], "pass a writable --out"),
        (None, ["report", "{tmp}"], "is not a bpfree run folder"),
        (None, ["cost", "--methods", "nope"], "unknown method 'nope'"),
        (None, ["cost", "--methods", "backprop", "--input", "imagenet"], "unknown input 'imagenet'"),
        (None, ["cost", "--methods", "backprop", "--repeats", "0"], "--repeats must be >= 1"),
        # validation: seeds, target accuracy, batch size, the --out folder
        (None, [*RUN, "--seeds", "0,9223372036854775808"], "seed 9223372036854775808 does not fit in 64 bits"),
        (None, [*RUN, "--seeds", "-9223372036854775809"], "does not fit in 64 bits"),
        (None, [*RUN, "--seeds", "3,1,3"], "seed(s) 3 given twice"),
        (None, [*RUN, "--target-acc", "0"], "target accuracy must be in (0, 1]"),
        (None, [*RUN, "--target-acc", "95"], "target accuracy must be in (0, 1] (a fraction), got 95.0"),
        (None, [*RUN, "--batch-size", "5000"], "--batch-size 5000 is larger than the 1024 training images"),
        (_foreign_files, [*RUN, "--out", "{tmp}/run"], "holds files but is not a bpfree run"),
        # data files
        (lambda ctx: _mnist(ctx, lambda raw: raw[: len(raw) // 2]),
         [*RUN, "--dataset", "mnist", "--data-dir", "{tmp}/mnist"], "is not a complete gzip file"),
        (lambda ctx: _mnist(ctx, lambda raw: b"<html>not gzip</html>"),
         [*RUN, "--dataset", "mnist", "--data-dir", "{tmp}/mnist"], "is not a complete gzip file"),
        (_offline, [*RUN, "--dataset", "mnist", "--data-dir", "{tmp}/mnist", "--download"],
         "--download of mnist failed"),
        # sweep files and output folders
        (_not_utf8_sweep, ["sweep", "{tmp}/tiny.toml"], "not UTF-8 text"),
        (_sweep_file, ["sweep", "{tmp}/tiny.toml", "--out", "/proc/bpfree-cannot-write"],
         "pass a writable --out"),
        (_sweep_file, ["sweep", "{tmp}/tiny.toml", "--out", "/sys/bpfree-cannot-write"],
         "pass a writable --out"),
        (_copy_run, ["report", "{tmp}/run", "--out", "/proc/bpfree-cannot-write"],
         "pass a writable --out"),
        (_copy_run, ["report", "{tmp}/run", "--out", "/sys/bpfree-cannot-write"],
         "pass a writable --out"),
        # records met on resume, and a disk that fills up
        (_corrupt_summary, [*RUN, "--out", "{tmp}/run"], "summary.json: corrupt JSON"),
        (_truncated_checkpoint, [*RUN, "--out", "{tmp}/run"],
         "checkpoint.pt cannot be loaded (corrupt or truncated"),
        (_copy_run, [*RUN, "--epochs", "3", "--out", "{tmp}/run"],
         "was made with epochs=1, this command says 3"),
        (_copy_run, [*RUN, "--batch-size", "32", "--out", "{tmp}/run"],
         "was made with batch_size=128, this command says 32"),
        (_copy_run, [*RUN, "--val-fraction", "0.2", "--out", "{tmp}/run"],
         "was made with val_fraction=0.0, this command says 0.2"),
        (_copy_run, [*RUN, "--target-acc", "0.5", "--out", "{tmp}/run"],
         "was made with target_acc=None, this command says 0.5"),
        (_other_data, [*RUN, "--out", "{tmp}/run"],
         "was made on other data (fingerprint 0123456789ab"),
        (_disk_full, [*RUN, "--out", "{tmp}/run"], "checkpoint.pt (No space left on device); free some space"),
        # the CI gate's baseline, checked before minutes of measuring
        (lambda ctx: _bad_baseline(ctx, "method,flops\nbackprop,1\n"),
         ["check", "--baseline", "{tmp}/ci.csv"], "the baseline lacks the column(s)"),
        (lambda ctx: _bad_baseline(ctx, '"unclosed\n'), ["check", "--baseline", "{tmp}/ci.csv"],
         "not a baseline CSV"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(setup, args, message, tmp_path, capsys, monkeypatch,
                                            request):
    if setup is not None:
        ctx = SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch,
                              finished_run=request.getfixturevalue("finished_run")
                              if setup in NEEDS_RUN else None)
        setup(ctx)
    capsys.readouterr()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bpfree: error:"), err
    assert message.replace("{tmp}", str(tmp_path)) in err


NEEDS_RUN = {_copy_run, _corrupt_summary, _truncated_checkpoint, _other_data}


def test_a_bad_data_folder_leaves_no_out_folder_behind(tmp_path, capsys):
    (tmp_path / "mnist").mkdir()
    assert main([*RUN, "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"),
                 "--out", str(tmp_path / "new")]) == 2
    assert "not found in" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


class Planted:
    """Unpickling it runs a shell command: what a planted checkpoint.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_is_refused_with_one_line_and_never_run(tmp_path, capsys,
                                                                     finished_run):
    ctx = SimpleNamespace(tmp=tmp_path, finished_run=finished_run)
    unit = _unfinished(ctx)
    marker = tmp_path / "pwned"
    torch.save({"method": Planted(marker), "rows": [], "cum_time": 0.0, "images": 0, "rng": {}},
               unit / "checkpoint.pt")
    capsys.readouterr()
    assert main([*RUN, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.count("\n") == 0 and str(unit / "checkpoint.pt") in err
    assert "could run code: not loaded" in err and "delete it" in err
    assert not marker.exists()


def test_a_run_where_every_unit_fails_exits_1_and_says_so(tmp_path, capsys, monkeypatch):
    from bpfree.methods.backprop import Backprop

    def broken(self, x, y):
        raise RuntimeError("boom")

    monkeypatch.setattr(Backprop, "train_step", broken)
    assert main([*RUN, "--seeds", "0,1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "bpfree: all 2 unit(s) failed:" in err and "run the same command again" in err
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert set(summary["status"]) == {"failed"} and summary["error"].str.contains("boom").all()


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("  0  everything asked for finished", "  1  some unit failed",
                 "  2  a usage error"):
        assert code in out


TWO_PROCESS_SCRIPT = """
import os, sys
import bpfree.harness as harness
log = sys.argv[1]
summarise = harness.summarise
def logged(ident, *args, **kwargs):
    with open(log, "a") as f:
        f.write(f"{ident['unit']} {os.getpid()}\\n")
    return summarise(ident, *args, **kwargs)
harness.summarise = logged
from bpfree.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_on_one_folder_never_train_a_unit_twice(tmp_path):
    """Each unit is trained by whichever process takes its lock first; the other skips it
    (exit 1 if it had to leave one to the other) or finds it done. Whatever the timing,
    every unit is trained exactly once and the folder ends complete."""
    log = tmp_path / "trained.log"
    args = [*RUN, "--seeds", "0,1,2,3", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, str(log), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode in (0, 1) for p in procs), errors
    trained = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(trained) == len(set(trained)) == 4, trained
    for proc, err in zip(procs, errors):
        if proc.returncode == 1:
            assert "left to another process that is training them" in err
    units = [json.loads(p.read_text())["status"]
             for p in (tmp_path / "run" / "units").glob("*/summary.json")]
    assert units == ["finished"] * 4


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
