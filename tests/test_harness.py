"""The harness: record schema, reproducibility, resume after interruption, divergence, failures."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from bpfree.methods import Task
from bpfree.methods.backprop import Backprop

from bpfree import checkpoints
from bpfree.data import Dataset, make_separable
from bpfree.harness import DIVERGENCE_FACTOR, Budget, Unit, diverged, run_unit, run_units
from bpfree.records import LOCK_NAME, RecordsError, collect, exclusive

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
        Task((1, 16, 16), 4), Backprop.config_for("default", {"arch": "mlp"})
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


ONE = Budget(epochs=1, batch_size=32, warmup_steps=1)


def test_the_divergence_rule_catches_a_finite_blow_up():
    loss = lambda v: {"loss": torch.tensor(v)}  # noqa: E731
    assert diverged(loss(float("nan"))) and diverged(loss(float("inf")), 2.0)
    assert diverged(loss(2.0 * DIVERGENCE_FACTOR + 1), first_loss=2.0)
    assert not diverged(loss(2.0 * DIVERGENCE_FACTOR - 1), first_loss=2.0)
    assert not diverged(loss(1e9))  # no first loss to compare with


def test_a_huge_learning_rate_is_recorded_diverged_not_finished(tmp_path, tiny):
    """fg-a at lr=1e6 keeps a finite loss (about 1e22 here) and may even score well on an
    easy task: it is a blow-up all the same, and recorded as one."""
    bad = Unit("fg-a", "synthetic", 0, "quick", (("lr", "1e6"),))
    run_units([bad], tiny, Budget(epochs=2, batch_size=32, warmup_steps=1), tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.loc[0, "status"] == "diverged" and summary.loc[0, "epochs_done"] == 1
    records = pd.read_csv(tmp_path / "records.csv")
    assert math.isfinite(records.loc[0, "train_loss"]) and records.loc[0, "train_loss"] > 1e10


@pytest.mark.parametrize("budget,key", [
    (Budget(epochs=3, batch_size=32, warmup_steps=1), "epochs=1, this run 3"),
    (Budget(epochs=1, batch_size=16, warmup_steps=1), "batch_size=32, this run 16"),
])
def test_a_finished_unit_of_another_budget_is_refused_naming_the_key(tmp_path, tiny, budget,
                                                                     key):
    run_units([UNIT], tiny, ONE, tmp_path)
    with pytest.raises(RecordsError) as info:
        run_units([UNIT], tiny, budget, tmp_path)
    assert key in str(info.value) and "summary.json" in str(info.value)
    if "epochs" in key:
        assert "a finished unit is not extended" in str(info.value)


def test_an_interrupted_unit_of_another_config_is_refused_naming_the_hyperparameter(
        tmp_path, tiny, monkeypatch):
    unit_dir = tmp_path / "units" / UNIT.id
    monkeypatch.setattr(Backprop, "train_step", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_units([UNIT], tiny, ONE, tmp_path)
    ident = json.loads((unit_dir / "unit.json").read_text())
    config = json.loads(ident["config"])
    ident["config"] = json.dumps({**config, "lr": config["lr"] * 10}, sort_keys=True)
    (unit_dir / "unit.json").write_text(json.dumps(ident))
    monkeypatch.undo()
    with pytest.raises(RecordsError, match=r"unit.json was made with config lr="):
        run_units([UNIT], tiny, ONE, tmp_path)


def test_a_unit_another_process_holds_is_skipped_and_never_trained_twice(tmp_path, tiny,
                                                                          monkeypatch):
    unit_dir = tmp_path / "units" / UNIT.id
    with exclusive(unit_dir / LOCK_NAME):  # another open file description: "another process"
        (result,) = run_units([UNIT], tiny, ONE, tmp_path)
        assert result.busy and f"pid {os.getpid()}" in result.busy
        assert not (unit_dir / "unit.json").exists()
        run_units([UNIT], tiny, ONE, tmp_path / "elsewhere")  # meanwhile the holder trains it
        for name in ("unit.json", "records.csv", "summary.json"):
            shutil.copy(tmp_path / "elsewhere" / "units" / UNIT.id / name, unit_dir / name)
    # After taking the lock the unit is checked again: done, so it is returned untrained.
    monkeypatch.setattr(Backprop, "train_step", lambda *a: pytest.fail("trained it twice"))
    result = run_unit(UNIT, tiny["synthetic"], ONE, unit_dir)
    assert result.summary["status"] == "finished" and len(result.records) == 1


def test_a_kill_between_write_and_rename_leaves_no_temporary_behind(tmp_path, tiny):
    unit_dir = tmp_path / "units" / UNIT.id
    unit_dir.mkdir(parents=True)
    stale = unit_dir / ".checkpoint.pt.x8e2k1.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_units([UNIT], tiny, ONE, tmp_path)
    assert not stale.exists()
    assert not [p.name for p in unit_dir.iterdir() if p.name.endswith(".tmp")]


class Planted:
    """What an attacker would put in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_an_unloadable_checkpoint_stops_the_run_naming_it_and_runs_nothing(tmp_path, tiny,
                                                                           kind):
    unit_dir = tmp_path / "units" / UNIT.id
    unit_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"method": Planted(marker), "rows": [], "cum_time": 0.0, "images": 0,
                "rng": {}}, unit_dir / "checkpoint.pt")
    if kind == "truncated":
        data = (unit_dir / "checkpoint.pt").read_bytes()
        (unit_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordsError) as info:
        run_units([UNIT], tiny, ONE, tmp_path)
    message = str(info.value)
    assert str(unit_dir / "checkpoint.pt") in message and "delete it" in message
    assert "\n" not in message
    assert not marker.exists()
    (unit_dir / "checkpoint.pt").unlink()  # as the message says: then it trains afresh
    run_units([UNIT], tiny, ONE, tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv").loc[0, "status"] == "finished"


class _FillsUp(io.FileIO):
    """A file on a disk with 1 KiB free: a write past it fails with ENOSPC, as on a full
    file system (a tmpfs of 64 KiB showed it: torch.save turned that into "unexpected pos")."""

    def write(self, data) -> int:
        if self.tell() + memoryview(data).nbytes > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_disk_that_fills_mid_checkpoint_is_one_line_saying_so(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "open", lambda path, mode: _FillsUp(path, "w"),
                        raising=False)
    with pytest.raises(RecordsError, match=r"checkpoint.pt \(No space left on device\); free"):
        checkpoints.save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.randn(10_000)})
    assert not list(tmp_path.iterdir())  # no temporary left, nothing replaced


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_while_checkpointing_stops_the_run_and_keeps_the_epochs(tmp_path, tiny,
                                                                            monkeypatch):
    """The checkpoint is written with a plain file write, so the kernel's ENOSPC (/dev/full here)
    arrives as an OSError, and the run stops with one line; rerun later, it resumes."""
    real_open = open
    monkeypatch.setattr(checkpoints, "open", lambda path, mode: real_open("/dev/full", mode),
                        raising=False)
    with pytest.raises(RecordsError) as info:
        run_units([UNIT], tiny, BUDGET, tmp_path)
    message = str(info.value)
    assert "checkpoint.pt" in message and "No space left on device" in message
    unit_dir = tmp_path / "units" / UNIT.id
    assert len(pd.read_csv(unit_dir / "records.csv")) == 1  # the epoch is kept
    assert not [p.name for p in unit_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    run_units([UNIT], tiny, BUDGET, tmp_path)
    assert pd.read_csv(tmp_path / "summary.csv").loc[0, "status"] == "finished"
