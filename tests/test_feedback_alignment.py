"""The feedback-alignment family's defining properties, and the diagnostics every method shares.

Each test checks something that fails if the method is wrong: with B = W^T FA *is* backprop,
bit for bit; B never moves and no optimiser sees it; a DFA layer hears from the output only
through its own B; sign-symmetry feedback is sign(W) times the documented scale and is what the
backward actually uses; the learning-rate schedule survives a checkpoint exactly.
"""

from __future__ import annotations

import copy
import io
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from bpfree.methods import Method, Task, all_methods
from bpfree.methods.base import angle_degrees, diagnostic_mode
from bpfree.methods.feedback_alignment import (
    DEFAULT_STEPS_PER_EPOCH,
    FeedbackAlignment,
    _FeedbackMethod,
)
from PIL import Image

from bpfree.cli import main
from bpfree.data import Dataset, make_separable
from bpfree.harness import Budget, Unit, run_units
from tests.conftest import make_method
from tests.test_harness import DOCS
from tests.test_report import META

FAMILY = ["fa", "dfa", "usf", "brsf", "frsf"]
SIGN = ["usf", "brsf", "frsf"]
WITH_DIAGNOSTICS = [name for name, cls in all_methods().items()
                    if cls.diagnostics is not Method.diagnostics]


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# --- FA is backprop when B = W^T -------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fa_with_feedback_set_to_the_weights_makes_backprops_update(arch):
    method = make_method("fa", arch=arch, weight_decay=1e-3)
    reference = copy.deepcopy(method)
    x, y = batch()
    method.train()
    reference.train()
    for step in range(3):  # the CNN's dropout masks and BatchNorm statistics are the same too
        with torch.no_grad():  # B follows W here, so that it stays W^T as W learns
            for layer, feedback in zip(method.weight_layers, method.feedbacks()):
                if feedback is not None:
                    feedback.copy_(layer.weight)  # B^T stored in W's shape: B = W^T
        torch.manual_seed(step)
        method.train_step(x, y)
        torch.manual_seed(step)
        optimizer = reference.optimizers["adamw"]
        optimizer.zero_grad()
        F.cross_entropy(reference.net(x), y).backward()  # plain autograd: W^T
        optimizer.step()
    for (name, p), q in zip(method.net.named_parameters(), reference.net.parameters()):
        assert torch.equal(p, q), f"{arch} {name} differs from backprop's update"
    # and a random B does not give backprop's update (the test above can fail)
    fresh = make_method("fa", arch=arch)
    with diagnostic_mode(fresh.model):
        params = list(fresh.net.parameters())
        fa = grads(fresh.objective(x, y)[0], params)
        bp = grads(F.cross_entropy(fresh.net(x), y), params)
    assert not torch.equal(fa[0], bp[0])
    assert torch.equal(fa[-1], bp[-1])  # the output layer's gradient is backprop's in FA


# --- B is fixed state, never trained ---------------------------------------------------------
BUFFERS = {"fa": 2, "dfa": 2, "frsf": 2, "usf": 0, "brsf": 0}  # on the 2-hidden-layer MLP


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("name", FAMILY)
def test_feedback_never_changes_and_no_optimiser_sees_it(name, arch, separable):
    x, y, _, _ = separable
    method = make_method(name, arch=arch, optimizer="sgd", lr=0.05, weight_decay=0.1)
    buffers = dict(method.model.feedback.named_buffers())
    if arch == "mlp":
        assert len(buffers) == BUFFERS[name]
    before = {k: b.clone() for k, b in buffers.items()}
    weights = {k: p.clone() for k, p in method.net.named_parameters()}
    method.train()
    for i in range(3):
        method.train_step(x[16 * i: 16 * (i + 1)], y[16 * i: 16 * (i + 1)])
    for key, b in method.model.feedback.named_buffers():
        assert torch.equal(b, before[key]), f"{name}: feedback {key} changed in training"
        assert not b.requires_grad
    assert any(not torch.equal(p, weights[k]) for k, p in method.net.named_parameters())
    optimised = {id(p) for opt in method.optimizers.values()
                 for group in opt.param_groups for p in group["params"]}
    assert not optimised & {id(b) for b in buffers.values()}
    assert not {id(p) for p in method.model.parameters()} & {id(b) for b in buffers.values()}
    state = method.state_dict()["model"]
    assert all(f"feedback.{k}" in state for k in buffers)  # checkpoints carry B


# --- DFA: the output reaches a hidden layer only through its B ------------------------------
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_dfa_hidden_update_depends_on_the_output_only_through_its_feedback(arch):
    x, y = batch()
    error = torch.randn(len(y), 4) / len(y)

    def first_layer_update(method) -> list[torch.Tensor]:
        with diagnostic_mode(method.model):
            surrogate, _ = method.objective(x, y, error=error)
            return grads(surrogate, list(method.weight_layers[0].parameters()))

    method = make_method("dfa", arch=arch)
    before = first_layer_update(method)
    with torch.no_grad():
        for layer in method.weight_layers[1:]:  # every layer above the first
            layer.weight.add_(torch.randn_like(layer.weight))
    after = first_layer_update(method)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ... and it is linear in B_1: doubling B_1 doubles the update
    with torch.no_grad():
        method.model.feedback.b0.mul_(2)
    doubled = first_layer_update(method)
    assert all(torch.equal(2 * a, b) for a, b in zip(after, doubled))

    # Contrast: FA's (and backprop's) first-layer update does depend on the layers above.
    fa = make_method("fa", arch=arch)
    with diagnostic_mode(fa.model):
        fa_before = grads(fa.objective(x, y)[0], [fa.weight_layers[0].weight])
        with torch.no_grad():
            fa.weight_layers[1].weight.add_(torch.randn_like(fa.weight_layers[1].weight))
        fa_after = grads(fa.objective(x, y)[0], [fa.weight_layers[0].weight])
    assert not torch.equal(fa_before[0], fa_after[0])


# --- sign symmetry: sign(W) times the documented scale, and the backward uses it -------------
def fan_in(w: torch.Tensor) -> int:
    return math.prod(w.shape[1:])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("name", SIGN)
def test_sign_symmetric_feedback_is_sign_of_w_times_the_documented_scale(name, arch, separable):
    x, y, _, _ = separable
    method = make_method(name, arch=arch)
    method.train()
    for i in range(3):  # feedback follows W as it learns
        method.train_step(x[32 * i: 32 * (i + 1)], y[32 * i: 32 * (i + 1)])
    torch.manual_seed(7)
    feedbacks = method.feedbacks()
    torch.manual_seed(7)
    assert feedbacks[0] is None  # nothing below the first layer needs an error
    for k, (layer, b) in enumerate(zip(method.weight_layers[1:], feedbacks[1:]), 1):
        w = layer.weight.detach()
        bound = 1 / math.sqrt(fan_in(w))  # PyTorch's default init: U(-bound, bound)
        if name == "usf":
            expected = w.sign() * (bound / math.sqrt(3))  # the init's standard deviation
        elif name == "brsf":  # |M|, M redrawn from the init distribution at every call
            expected = torch.empty_like(w).uniform_(-bound, bound).abs() * w.sign()
        else:  # |M| drawn once, a buffer
            magnitude = getattr(method.model.feedback, f"m{k}")
            assert (magnitude >= 0).all() and (magnitude <= bound).all()
            expected = magnitude * w.sign()
        assert torch.equal(b, expected)
        assert torch.equal(b.sign(), w.sign())
    if name == "brsf":  # batchwise: a fresh magnitude at every call
        assert not torch.equal(method.feedbacks()[1], method.feedbacks()[1])
    else:
        assert torch.equal(method.feedbacks()[1], method.feedbacks()[1])


@pytest.mark.parametrize("name", ["fa", *SIGN])
def test_backward_sends_the_error_through_the_feedback(name):
    """A hand-written backward of the MLP with B in place of W^T gives the method's gradient."""
    method = make_method(name)
    x, y = batch()
    feedbacks = method.feedbacks()
    w1, w2, w3 = (layer.weight.detach() for layer in method.weight_layers)
    with diagnostic_mode(method.model):
        surrogate, _ = method.objective(x, y, feedbacks)
        got = grads(surrogate, [layer.weight for layer in method.weight_layers])
        with torch.no_grad():
            h0 = x.flatten(1)
            a1 = F.linear(h0, w1, method.weight_layers[0].bias)
            a2 = F.linear(a1.relu(), w2, method.weight_layers[1].bias)
            logits = F.linear(a2.relu(), w3, method.weight_layers[2].bias)
            e = (logits.softmax(1) - F.one_hot(y, 4)) / len(y)
            d2 = (e @ feedbacks[2]) * (a2 > 0)
            d1 = (d2 @ feedbacks[1]) * (a1 > 0)
    expected = [d1.T @ h0, d2.T @ a1.relu(), e.T @ a2.relu()]
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7)


# --- angles ------------------------------------------------------------------------------------
def test_angle_is_zero_for_a_gradient_against_itself_and_about_90_for_a_random_direction():
    method = make_method("fa", arch="cnn")
    x, y = batch()
    with diagnostic_mode(method.model):
        gradient = grads(F.cross_entropy(method.net(x), y), list(method.net.parameters()))
    flat = torch.cat([g.flatten() for g in gradient])
    assert flat.numel() > 100_000
    assert angle_degrees(flat, flat.clone()) == 0.0
    assert angle_degrees(flat, 3 * flat) == pytest.approx(0.0, abs=1e-4)  # float32 rounding of 3x
    assert angle_degrees(flat, -flat) == pytest.approx(180.0)
    random = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    assert abs(angle_degrees(flat, random) - 90) < 1.0
    assert math.isnan(angle_degrees(flat, torch.zeros_like(flat)))

    # The method's own diagnostics: with B = W^T every update angle and feedback angle is 0.
    with torch.no_grad():
        for layer, feedback in zip(method.weight_layers, method.feedbacks()):
            if feedback is not None:
                feedback.copy_(layer.weight)
    values = method.diagnostics(x, y)
    assert values and all(v == 0.0 for v in values.values()), values
    # ... and with a random B the hidden layers' update is far from backprop's at initialisation
    values = make_method("fa", arch="cnn").diagnostics(x, y)
    assert values["angle_update/head.1"] == 0.0  # the output layer is trained as in backprop
    assert values["angle_update/features.layers.4"] > 45
    assert values["angle_feedback/features.layers.4"] == pytest.approx(90, abs=5)


@pytest.mark.parametrize("name", WITH_DIAGNOSTICS)
def test_diagnostics_change_nothing_and_give_angles(name, separable):
    x, y, _, _ = separable
    assert {"fa", "dfa", "usf", "brsf", "frsf", "fg-w", "fg-a", "lg-fg-a", "dtp",
            "ddtp-linear"} <= set(WITH_DIAGNOSTICS)
    # The CNN where a method runs on it: its BatchNorm statistics must be left as they were.
    overrides = {"arch": "cnn"} if name in FAMILY else {}
    if name.startswith(("fg", "lg")):
        overrides = {"arch": "cnn", "tangents": 4}
    method = make_method(name, **overrides)
    method.train()
    for i in range(2):
        method.train_step(x[32 * i: 32 * (i + 1)], y[32 * i: 32 * (i + 1)])
    method.eval()
    state = copy.deepcopy(method.state_dict())
    grads_before = {k: None if p.grad is None else p.grad.clone()
                    for k, p in method.model.named_parameters()}
    values = method.diagnostics(x[:64], y[:64])
    assert not method.model.training  # the mode it was called in is restored
    after = method.state_dict()
    for key, tensor in state["model"].items():
        assert torch.equal(tensor, after["model"][key]), f"{name}: diagnostics changed {key}"
    assert repr(after["optimizers"]) == repr(state["optimizers"])
    for k, p in method.model.named_parameters():
        assert (p.grad is None) == (grads_before[k] is None)
        assert p.grad is None or torch.equal(p.grad, grads_before[k])
    updates = {k: v for k, v in values.items() if k.startswith("angle_update/")}
    assert updates, f"{name} reports no angle_update"
    assert all(0 <= v <= 180 for v in updates.values()), values


# --- the learning-rate schedule survives a checkpoint -----------------------------------------
def test_schedule_resumes_exactly_from_a_checkpoint(separable):
    x, y, _, _ = separable
    overrides = {"optimizer": "sgd", "lr": 0.05, "milestones": "1,2", "gamma": 0.5}
    cls = all_methods()["fa"]
    task = Task((1, 16, 16), 4, steps_per_epoch=2)

    def fresh(seed: int) -> FeedbackAlignment:
        torch.manual_seed(seed)
        return cls(task, cls.config_for("quick", overrides))

    def steps(method, start: int, stop: int) -> None:
        method.train()
        for i in range(start, stop):
            torch.manual_seed(100 + i)
            method.train_step(x[32 * i: 32 * (i + 1)], y[32 * i: 32 * (i + 1)])

    whole = fresh(0)
    steps(whole, 0, 7)
    assert whole.learning_rate() == pytest.approx(0.05 * 0.25)  # both milestones passed

    cut = fresh(0)
    steps(cut, 0, 3)
    buffer = io.BytesIO()
    torch.save(cut.state_dict(), buffer)
    buffer.seek(0)
    resumed = fresh(1)  # a different initialisation and B, all replaced by the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.learning_rate() == pytest.approx(0.05 * 0.5)  # mid-schedule
    steps(resumed, 3, 7)
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"

    # Without the step count the schedule would restart, and the result would differ.
    restarted = fresh(1)
    restarted.load_state_dict({**cut.state_dict(), "schedule": {"step_count": 0}})
    steps(restarted, 3, 7)
    assert not torch.equal(restarted.net.layers[0].weight, whole.net.layers[0].weight)


def test_paper_preset_is_biotorchs_lenet_schedule():
    config = FeedbackAlignment.config_for("paper")
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 1e-3)
    assert config.milestone_epochs() == [50, 75] and config.gamma == 0.1
    torch.manual_seed(0)
    method = FeedbackAlignment(Task((1, 28, 28), 10), config)  # steps_per_epoch unknown
    assert method.milestone_steps == [50 * DEFAULT_STEPS_PER_EPOCH, 75 * DEFAULT_STEPS_PER_EPOCH]
    method = FeedbackAlignment(Task((1, 28, 28), 10, steps_per_epoch=10), config)
    assert method.milestone_steps == [500, 750]


# --- the harness records the diagnostics, and the report draws them --------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    data = {"synthetic": Dataset("synthetic", 4, *make_separable(256, 128, 4, (1, 16, 16), seed=2))}
    units = [Unit("fa", "synthetic", seed=0, preset="quick"),
             Unit("dfa", "synthetic", seed=0, preset="quick")]
    run = tmp_path_factory.mktemp("run")
    run_units(units, data, Budget(epochs=2, batch_size=32, warmup_steps=1), run)
    return run, data, units


def test_harness_records_diagnostics_columns(tiny_run):
    run, _, _ = tiny_run
    records = pd.read_csv(run / "records.csv")
    fa = records[records["method"] == "fa"]
    angles = [c for c in records.columns if c.startswith("diag_angle_update/")]
    assert {"diag_angle_update/layers.0", "diag_angle_update/layers.2",
            "diag_angle_feedback/layers.1", "diag_time_s"} <= set(records.columns)
    assert len(fa) == 2 and fa[angles].notna().all().all()
    assert ((records[angles] >= 0) & (records[angles] <= 180)).all().all()
    assert (records["diag_time_s"] > 0).all()
    assert records[records["method"] == "dfa"]["diag_angle_feedback/layers.1"].isna().all()
    text = DOCS.read_text()
    assert "`diag_<key>`" in text and "`diag_time_s`" in text


def test_diagnostics_do_not_change_what_is_learned(tiny_run, tmp_path, monkeypatch):
    run, data, units = tiny_run
    monkeypatch.setattr(_FeedbackMethod, "diagnostics", lambda self, x, y: {})
    run_units(units, data, Budget(epochs=2, batch_size=32, warmup_steps=1), tmp_path)
    cols = ["unit", "epoch", "train_acc", "test_acc", "train_loss"]
    with_diag = pd.read_csv(run / "records.csv")[cols]
    without = pd.read_csv(tmp_path / "records.csv")
    assert not any(c.startswith("diag_") for c in without.columns)
    pd.testing.assert_frame_equal(with_diag, without[cols])


def test_report_draws_alignment_angles_when_recorded(tiny_run, tmp_path):
    run, _, _ = tiny_run
    (run / "meta.json").write_text(json.dumps(META))  # what `bpfree run` adds to a run folder
    assert main(["report", str(run), "--out", str(tmp_path), "--formats", "md"]) == 0
    png = tmp_path / "alignment_angles.png"
    assert png.is_file() and Image.open(png).verify() is None
    assert "](alignment_angles.png)" in (tmp_path / "report.md").read_text()
