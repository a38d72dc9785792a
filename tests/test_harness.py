"""The harness: record schema, reproducibility, resume after interruption, divergence, failures."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from bpfree.methods.backprop import Backprop

from bpfree.data import Dataset, make_separable
from bpfree.harness import Budget, Unit, run_units
from bpfree.records import collect

DOCS = Path(__file__).resolve().parents[1] / "docs" / "records.md"


@pytest.fixture
def tiny():
    return {"synthetic": Dataset("synthetic", 4, *make_separable(256, 128, 4, (1, 16, 16), seed=2))}


UNIT = Unit("backprop", "synthetic", seed=0, preset="default", overrides=(("arch", "mlp"),))
BUDGET = Budget(epochs=3, batch_size=32, warmup_steps=1)


def test_records_and_summary_have_every_documented_column(tmp_path, tiny):
    run_units([UNIT], tiny, BUDGET, tmp_path)
    records = pd.read_csv(tmp_path / "records.csv")
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(records) == 3 and records["epoch"].tolist() == [1, 2, 3]
    assert len(summary) == 1 and summary.loc[0, "status"] == "finished"
    assert (records["cum_time_s"].diff().dropna() > 0).all()
    assert summary.loc[0, "params"] == sum(p.numel() for p in Backprop(
        __import__("bpfree.methods").methods.Task((1, 16, 16), 4), Backprop.config_for("default", {"arch": "mlp"})
    ).model.parameters())
    documented = set(re.findall(r"^\| `([a-z_0-9]+)`", DOCS.read_text(), flags=re.M))
    for column in [*records.columns, *summary.columns]:
        assert column in documented, f"column {column} is not documented in docs/records.md"
    for column in ["train_acc", "test_acc", "epoch_time_s", "cum_time_s", "train_loss"]:
        assert column in records
    for column in ["throughput_img_s", "params", "flops_train_step", "flops_predict", "peak_mem_bytes",
                   "peak_mem_kind", "act_bytes_peak", "process_peak_rss_bytes", "time_to_target_s"]:
        assert column in summary


def test_same_command_gives_the_same_numbers(tmp_path, tiny):
    run_units([UNIT], tiny, BUDGET, tmp_path / "a")
    run_units([UNIT], tiny, BUDGET, tmp_path / "b")
    cols = ["train_acc", "test_acc", "train_loss"]
    a, b = (pd.read_csv(tmp_path / r / "records.csv")[cols] for r in "ab")
    pd.testing.assert_frame_equal(a, b)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny, monkeypatch):
    run_units([UNIT], tiny, BUDGET, tmp_path / "whole")
    calls = {"n": 0}
    original = Backprop.train_step

    def interrupted(self, x, y):
        calls["n"] += 1
        # 4 cost-measurement steps and 1 warm-up step (on copies), 2 epochs of 8, 3 into the third
        if calls["n"] == 4 + 1 + 8 + 8 + 3:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(Backprop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_units([UNIT], tiny, BUDGET, tmp_path / "cut")
    records, summary = collect(tmp_path / "cut")
    assert records["epoch"].tolist() == [1, 2]  # the finished epochs were kept
    assert summary["status"].tolist() == ["running"]
    monkeypatch.setattr(Backprop, "train_step", original)
    run_units([UNIT], tiny, BUDGET, tmp_path / "cut")
    cols = ["epoch", "train_acc", "test_acc", "train_loss"]
    whole = pd.read_csv(tmp_path / "whole" / "records.csv")[cols]
    resumed = pd.read_csv(tmp_path / "cut" / "records.csv")[cols]
    pd.testing.assert_frame_equal(whole, resumed)
    # a finished unit is skipped: running again trains nothing
    monkeypatch.setattr(Backprop, "train_step", lambda *a: pytest.fail("trained a finished unit"))
    run_units([UNIT], tiny, BUDGET, tmp_path / "cut")


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path, tiny, monkeypatch):
    original = Backprop.train_step

    def nan_after_a_while(self, x, y):
        out = original(self, x, y)
        if self.config.lr > 0.5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Backprop, "train_step", nan_after_a_while)
    bad = Unit("backprop", "synthetic", 0, "default", (("arch", "mlp"), ("lr", 1.0)))
    run_units([bad, UNIT], tiny, BUDGET, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("unit")
    assert summary.loc[bad.id, "status"] == "diverged"
    assert summary.loc[bad.id, "epochs_done"] == 1
    assert summary.loc[UNIT.id, "status"] == "finished"


def test_a_failing_unit_is_recorded_with_its_error_and_retried_later(tmp_path, tiny, monkeypatch):
    def broken(self, x, y):
        raise RuntimeError("boom")

    monkeypatch.setattr(Backprop, "train_step", broken)
    run_units([UNIT], tiny, BUDGET, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.loc[0, "status"] == "failed" and "boom" in summary.loc[0, "error"]
    monkeypatch.undo()
    run_units([UNIT], tiny, BUDGET, tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv").loc[0, "status"] == "finished"


def test_warm_up_and_measurement_do_not_change_what_is_learned(tmp_path, tiny):
    run_units([UNIT], tiny, BUDGET, tmp_path / "a")
    run_units([UNIT], tiny, Budget(epochs=3, batch_size=32, warmup_steps=4), tmp_path / "b")
    a, b = (pd.read_csv(tmp_path / r / "records.csv")["test_acc"] for r in "ab")
    assert a.tolist() == b.tolist()


def test_harness_tells_methods_the_epoch_length(tmp_path, monkeypatch):
    """Methods with a schedule in epochs (feedback alignment's, PEPITA's) learn how many steps
    an epoch has: ceil(training images / batch size)."""
    seen = []
    original = Backprop.__init__

    def spy(self, task, config):
        seen.append(task.steps_per_epoch)
        original(self, task, config)

    monkeypatch.setattr(Backprop, "__init__", spy)
    data = {"synthetic": Dataset("synthetic", 4, *make_separable(100, 20, 4, (1, 16, 16), seed=2))}
    run_units([UNIT], data, Budget(epochs=1, batch_size=30, warmup_steps=0), tmp_path)
    assert seen and set(seen) == {4}  # ceil(100 / 30), for the method and its measured copies
