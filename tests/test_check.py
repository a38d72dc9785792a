"""The CI gate `bpfree check`: reproducible metrics, and it fails when it should.

The gate's real budget takes minutes for all methods, so the CLI tests replace `measure_all`
with real metrics of backprop measured once on a small synthetic task.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bpfree import check
from bpfree.check import METRICS, GateBudget, compare, measure_method
from bpfree.cli import main
from bpfree.data import Dataset, make_separable

TINY = GateBudget(dataset="synthetic", train_images=64, batch_size=32)


def tiny_data() -> Dataset:
    return Dataset("synthetic", 4, *make_separable(TINY.train_images, 100, 4, (1, 16, 16), seed=2))


@pytest.fixture(scope="module")
def measured() -> pd.DataFrame:
    return pd.DataFrame([{**measure_method("backprop", tiny_data(), TINY), "error": ""}])


@pytest.fixture
def gate(monkeypatch, measured, tmp_path, capsys):
    """Run `bpfree check` against a baseline built by `doctor(baseline_frame)`:
    returns (exit code, printed output)."""
    monkeypatch.setattr(check, "measure_all", lambda budget=check.BUDGET, progress=None: measured.copy())

    def run(doctor=lambda frame: frame, *extra: str) -> tuple[int, str]:
        path = tmp_path / "ci.csv"
        doctor(measured.drop(columns="error")).to_csv(path, index=False)
        code = main(["check", "--baseline", str(path), *extra])
        return code, capsys.readouterr().out

    return run


def test_gate_metrics_are_bit_reproducible(measured):
    again = measure_method("backprop", tiny_data(), TINY)
    assert again == measured.drop(columns="error").iloc[0].to_dict()
    assert set(again) == {"method", *METRICS}
    assert all(again[m] > 0 for m in METRICS if m != "test_error")


def test_unchanged_metrics_pass(gate):
    code, out = gate()
    assert code == 0 and "passed" in out


def test_doctored_baseline_fails_naming_the_metrics(gate):
    def doctor(frame):
        frame["flops_train_step"] //= 2
        frame["test_error"] -= 0.05
        return frame

    code, out = gate(doctor)
    assert code == 1 and "FAILED" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("backprop")}
    assert "CHANGED" in lines["flops_train_step"]
    assert "REGRESSION" in lines["test_error"]


def test_counts_must_match_exactly_even_when_lower(gate):
    def doctor(frame):
        frame["act_bytes_peak"] += 1
        return frame

    code, out = gate(doctor)
    assert code == 1 and "act_bytes_peak" in out


def test_error_within_margin_or_lower_passes(gate):
    margin = METRICS["test_error"].margin
    for shift, verdict in [(-margin / 2, "within tolerance"), (margin * 3, "improved")]:
        def doctor(frame, shift=shift):
            frame["test_error"] += shift
            return frame

        code, out = gate(doctor)
        assert code == 0 and verdict in out


def test_method_missing_from_baseline_fails(gate):
    code, out = gate(lambda frame: frame.iloc[:0])
    assert code == 1 and "NOT IN BASELINE" in out


def test_baseline_method_no_longer_registered_fails(gate):
    def doctor(frame):
        return pd.concat([frame, frame.assign(method="retired-method")])

    code, out = gate(doctor)
    assert code == 1 and "retired-method" in out and "NO LONGER REGISTERED" in out


def test_method_that_raises_fails_and_blocks_update(gate, monkeypatch, measured):
    broken = measured.assign(error="RuntimeError: boom")
    monkeypatch.setattr(check, "measure_all", lambda budget=check.BUDGET, progress=None: broken)
    code, out = gate()
    assert code == 1 and "FAILED TO MEASURE: RuntimeError: boom" in out
    code, out = gate(lambda frame: frame, "--update")
    assert code == 1 and "NOT updated" in out


def test_update_rewrites_the_baseline(gate, tmp_path):
    def doctor(frame):
        frame["params"] += 10
        return frame

    code, out = gate(doctor, "--update")
    assert code == 0 and "params" in out and "wrote 1 method" in out
    assert main(["check", "--baseline", str(tmp_path / "ci.csv")]) == 0


def test_update_creates_a_missing_baseline(monkeypatch, measured, tmp_path):
    monkeypatch.setattr(check, "measure_all", lambda budget=check.BUDGET, progress=None: measured.copy())
    path = tmp_path / "new" / "ci.csv"
    assert main(["check", "--baseline", str(path)]) == 2  # a missing baseline is a user error
    assert main(["check", "--baseline", str(path), "--update"]) == 0
    assert list(pd.read_csv(path).columns) == ["method", *METRICS]


def test_compare_rejects_a_baseline_without_the_metrics(measured):
    with pytest.raises(check.ConfigError, match="--update"):
        compare(measured, measured[["method", "params"]])


def test_committed_baseline_has_the_gate_columns():
    baseline = pd.read_csv(Path(check.BASELINE))
    assert list(baseline.columns) == ["method", *METRICS] and baseline["method"].is_unique
