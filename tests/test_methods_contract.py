"""The contract every registered method must honour; new methods are checked automatically."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import bpfree.methods
import pytest
import torch
from bpfree.methods import Method

from bpfree.checkpoints import load_checkpoint, save_checkpoint
from bpfree.harness import rng_state
from tests.conftest import METHODS, make_method


def train(method: Method, x, y, steps: int, batch: int = 32, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    logs = []
    method.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        logs.append({k: float(v) for k, v in method.train_step(x[idx], y[idx]).items()})
    return logs


def accuracy(method: Method, x, y) -> float:
    method.eval()
    return (method.predict(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", METHODS)
def test_declares_itself(name):
    cls = make_method(name).__class__
    assert cls.name == name and cls.family and cls.description
    assert "default" in cls.presets and "quick" in cls.presets
    for preset in cls.presets:
        cls.config_for(preset)  # every preset is valid


@pytest.mark.parametrize("name", METHODS)
def test_steps_give_finite_losses_and_scores_of_right_shape(name, separable):
    x, y, tx, ty = separable
    method = make_method(name)
    logs = train(method, x, y, steps=3)
    assert all("loss" in log for log in logs)
    assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in logs)
    method.eval()
    scores = method.predict(tx[:10])
    assert scores.shape == (10, 4)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trips(name, separable, tmp_path):
    """Through a real checkpoint file, saved and loaded as the harness does: loading admits
    tensors and plain values only (weights_only), so every method's state must be made of
    them (model, optimisers, step counters), as must the harness's rows and RNG state."""
    x, y, tx, ty = separable
    a = make_method(name, seed=0)
    train(a, x, y, steps=2)
    b = make_method(name, seed=1)
    save_checkpoint(tmp_path / "checkpoint.pt", {
        "method": a.state_dict(), "rows": [{"epoch": 1, "test_acc": 0.5, "val_acc": math.nan,
                                            "unit": name}],
        "cum_time": 1.5, "images": 64, "first_loss": 2.3, "rng": rng_state(torch.device("cpu"))})
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["rows"][0]["unit"] == name and math.isnan(state["rows"][0]["val_acc"])
    b.load_state_dict(state["method"])
    for m in (a, b):
        m.eval()
    torch.manual_seed(5)
    pa = a.predict(tx[:16])
    torch.manual_seed(5)
    pb = b.predict(tx[:16])
    assert torch.equal(pa, pb)
    # The optimiser state travels too: one more identical step keeps them identical.
    torch.manual_seed(6)
    train(a, x, y, steps=1, seed=3)
    torch.manual_seed(6)
    train(b, x, y, steps=1, seed=3)
    for m in (a, b):
        m.eval()
    torch.manual_seed(5)
    pa = a.predict(tx[:16])
    torch.manual_seed(5)
    assert torch.equal(pa, b.predict(tx[:16]))


@pytest.mark.parametrize("name", METHODS)
def test_seeded_runs_repeat_exactly(name, separable):
    x, y, tx, ty = separable
    runs = []
    for _ in range(2):
        method = make_method(name, seed=3)
        logs = train(method, x, y, steps=3)
        method.eval()
        torch.manual_seed(0)
        runs.append((logs, method.predict(tx[:16])))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", METHODS)
def test_learns_a_separable_task(name, separable):
    x, y, tx, ty = separable
    method = make_method(name)
    before = accuracy(method, tx, ty)
    train(method, x, y, steps=150)
    after = accuracy(method, tx, ty)
    assert after >= 0.9, f"{name}: test accuracy {after:.3f} (was {before:.3f} before training)"


def test_no_method_module_is_broken():
    """A method module that fails to import is listed, not hidden: the contract fails on it."""
    assert bpfree.methods.broken_modules() == {}


def test_a_broken_module_is_listed_and_the_others_still_load(monkeypatch, capsys):
    real = importlib.import_module

    def failing(name, *args):
        if name == "bpfree.methods.target_prop":
            raise SyntaxError("invalid syntax (target_prop.py, line 1)")
        return real(name, *args)

    bpfree.methods._discover.cache_clear()
    monkeypatch.setattr(importlib, "import_module", failing)
    try:
        methods = bpfree.methods.all_methods()
        assert "backprop" in methods and "dtp" not in methods
        assert "SyntaxError" in bpfree.methods.broken_modules()["target_prop"]
        from bpfree.cli import main

        assert main(["list"]) == 0
        assert "target_prop" in capsys.readouterr().out
        with pytest.raises(bpfree.methods.ConfigError, match="failed to import: target_prop"):
            bpfree.methods.get_method("dtp")
    finally:
        monkeypatch.undo()
        bpfree.methods._discover.cache_clear()


@pytest.mark.parametrize("folder", ["methods", "reports", "results"])
def test_the_folders_cannot_be_imported_under_a_second_name(folder):
    """From the repository root, `import methods` would load the same files as a second
    package next to bpfree.methods (two registries, two copies of every class): refused."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"import bpfree.{folder}, not {folder}" in proc.stderr
