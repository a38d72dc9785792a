"""Forward-only methods: what makes Forward-Forward and PEPITA what they are.

- ff: each layer's loss reaches that layer's parameters and no other, and a step runs reverse
  mode through one layer at a time; its gradient is the one of Hinton's Matlab code; negative
  labels are never the true label; a prediction is the argmax of the goodness summed over
  layers for every candidate label, at the cost of one forward pass per label;
- pepita: a step is two forward passes and no autograd, its update is the closed form of the
  paper, and the projection F never changes;
- both: per-epoch lr schedules follow their sources and survive a checkpoint exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bpfree.methods import ConfigError, Method, Task
from bpfree.methods.forward_only import ForwardForward, Pepita, hinton_gain, rms_normalise
from torch import Tensor

from bpfree import measure
from tests.conftest import make_method
from tests.test_methods_contract import train


def ff_method(seed: int = 0, shape=(1, 4, 4), classes: int = 3, task_kw=None, **overrides):
    torch.manual_seed(seed)
    task = Task(shape, classes, seed=seed, **(task_kw or {}))
    return ForwardForward(task, ForwardForward.config_for("quick", overrides))


def layer_of(method: ForwardForward) -> dict[int, str]:
    """id of every parameter -> the module it belongs to (`layers.i` or `head`)."""
    owner = {}
    for name, p in method.model.named_parameters():
        owner[id(p)] = name.rsplit(".", 1)[0]
    return owner


def reachable_leaves(root: Tensor) -> set[int]:
    """ids of the leaf tensors that reverse mode from `root` would accumulate into."""
    seen, found, stack = set(), set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


# --- Forward-Forward ------------------------------------------------------------------------


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_ff_layer_loss_reaches_its_own_layer_only(negatives):
    """No parameter of layer l gets a gradient from the loss of any other layer, peer
    normalisation included."""
    method = ff_method(depth=3, width=6, negatives=negatives, peer_norm=0.1)
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    pos = method.pre_activations(method.layer_inputs(x, y))
    neg = method.pre_activations(method.layer_inputs(x, method.negative_labels(y)))
    losses = method.layer_losses(pos, neg)
    assert len(losses) == 3
    for index, loss in enumerate(losses):
        loss = loss + method.peer_term(index, pos[index])
        for other, layer in enumerate(method.model.layers):
            grads = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True,
                                        allow_unused=True)
            reached = [g is not None and bool(g.abs().sum() > 0) for g in grads]
            if other == index:
                assert all(reached), f"layer {index}'s loss does not train layer {index}"
            else:
                assert not any(reached), f"layer {index}'s loss reaches layer {other}"


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_ff_step_runs_reverse_mode_through_one_layer_at_a_time(negatives, monkeypatch):
    method = ff_method(depth=3, width=6, negatives=negatives, peer_norm=0.1)
    owner = layer_of(method)
    original = torch.autograd.backward
    modules = []

    def one_layer_backward(tensors, *args, **kwargs):
        roots = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        reached = {owner[i] for root in roots for i in reachable_leaves(root) if i in owner}
        assert len(reached) == 1, f"one backward reaches {sorted(reached)}"
        modules.extend(reached)
        return original(tensors, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.autograd.grad was called")

    monkeypatch.setattr(torch.autograd, "backward", one_layer_backward)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    before = {k: p.detach().clone() for k, p in method.model.named_parameters()}
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    method.train()
    method.train_step(x, y)
    expected = {"layers.0", "layers.1", "layers.2"} | ({"head"} if negatives == "hard" else set())
    assert sorted(modules) == sorted(expected), "each module is trained by exactly one backward"
    unchanged = [k for k, p in method.model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, f"not updated: {unchanged}"


def test_ff_gradient_is_that_of_hintons_matlab_code():
    """dC/d(input of unit j) = (1 - p_pos) h_j on positive data, -p_neg h_j on negative data,
    plus lambda * (layer mean - unit mean) on positive data; dW = input^T dC / B (ascent)."""
    method = ff_method(depth=2, width=5, goodness="sum", threshold=1.0, peer_norm=0.2)
    x, y = torch.randn(6, 1, 4, 4), torch.arange(6) % 3
    wrong = (y + 1) % 3
    h_pos, h_neg = method.layer_inputs(x, y), method.layer_inputs(x, wrong)
    layer = method.model.layers[0]
    mean = method.model.mean_activity[0].clone()
    pos, neg = method.pre_activations(h_pos), method.pre_activations(h_neg)
    loss = method.layer_losses(pos, neg)[0] + method.peer_term(0, pos[0])
    got = torch.autograd.grad(loss, layer.weight)[0]
    with torch.no_grad():
        a_pos, a_neg = ((h @ layer.weight.T + layer.bias).relu() for h in (h_pos, h_neg))
        p_pos = torch.sigmoid(a_pos.pow(2).sum(1) - 5)[:, None]
        p_neg = torch.sigmoid(a_neg.pow(2).sum(1) - 5)[:, None]
        mean = 0.9 * mean + 0.1 * a_pos.mean(0)
        d_pos = (1 - p_pos) * a_pos + 0.2 * (mean.mean() - mean)
        d_neg = -p_neg * a_neg
        ascent = (h_pos.T @ d_pos + h_neg.T @ d_neg).T / 6
    torch.testing.assert_close(got, -ascent)


def test_negative_labels_are_never_the_true_label():
    classes, n = 5, 4000
    method = ff_method(classes=classes, shape=(1, 4, 4), negatives="hard")
    y = torch.arange(n) % classes
    random = method.negative_labels(y)
    assert not (random == y).any()
    counts = torch.bincount(random[y == 0], minlength=classes)
    assert counts[0] == 0 and (counts[1:] > 0.2 * n / classes).all()  # uniform over the wrong ones

    # Hard: drawn from the head's softmax with the true label excluded, even when the head is
    # sure of the true label...
    sure = 50.0 * F.one_hot(y, classes).float()
    hard = method.negative_labels(y, sure)
    assert not (hard == y).any()
    # ...and following the head among the wrong labels: it prefers (y + 2) % C.
    prefers = 8.0 * F.one_hot((y + 2) % classes, classes).float()
    hard = method.negative_labels(y, prefers)
    assert not (hard == y).any()
    assert (hard == (y + 2) % classes).float().mean() > 0.95


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_negatives_used_in_training_steps_are_wrong_labels(negatives, separable):
    x, y, _, _ = separable
    method = make_method("ff", negatives=negatives)
    drawn = []
    original = method.negative_labels

    def record(labels, logits=None):
        out = original(labels, logits)
        drawn.append((labels, out))
        return out

    method.negative_labels = record
    train(method, x, y, steps=20)
    assert len(drawn) == 20
    assert all(not (neg == lab).any() for lab, neg in drawn)


@pytest.mark.parametrize("goodness", ["sum", "mean"])
def test_ff_prediction_is_the_argmax_of_goodness_summed_by_hand(goodness):
    classes, start = 3, 1
    method = ff_method(classes=classes, depth=3, width=5, goodness=goodness,
                       goodness_from=start, label_strength=1.5)
    x = torch.randn(7, 1, 4, 4)
    layers = method.model.layers
    by_hand = torch.zeros(7, classes)
    for i in range(7):
        for label in range(classes):
            h = x[i].flatten().clone()
            h[:classes] = 0.0
            h[label] = 1.5
            h = h / h.pow(2).mean().sqrt()
            for index, layer in enumerate(layers):
                a = (layer.weight @ h + layer.bias).relu()
                if index >= start:
                    by_hand[i, label] += a.pow(2).sum() if goodness == "sum" else a.pow(2).mean()
                h = a / a.pow(2).mean().sqrt()
    method.eval()
    scores = method.predict(x)
    torch.testing.assert_close(scores, by_hand)
    assert torch.equal(scores.argmax(1), by_hand.argmax(1))


def test_ff_prediction_costs_one_forward_pass_per_label():
    """FLOPs of `predict` are num_classes times those of one pass through the hidden layers."""
    classes, width, depth, n = 4, 6, 3, 5
    method = ff_method(shape=(1, 4, 4), classes=classes, width=width, depth=depth)
    method.eval()
    one_pass = 2 * n * (16 * width + (depth - 1) * width * width)
    assert measure.count_flops(lambda: method.predict(torch.randn(n, 1, 4, 4))) == classes * one_pass


def test_rms_normalisation_keeps_only_the_direction():
    h = torch.rand(4, 10) * torch.tensor([[1.0], [2.0], [10.0], [0.1]])
    out = rms_normalise(h)
    torch.testing.assert_close(out.pow(2).mean(1), torch.ones(4))
    torch.testing.assert_close(rms_normalise(3 * h), out)


# --- PEPITA -----------------------------------------------------------------------------------


def pepita_by_hand() -> tuple[Pepita, dict[str, Tensor]]:
    """A 4-3-2 net without biases, hand-set weights and F, no dropout, no momentum."""
    torch.manual_seed(0)
    task = Task((1, 2, 2), 2)
    method = Pepita(task, Pepita.config_for("default", {
        "width": 3, "depth": 1, "dropout": 0.0, "momentum": 0.0, "lr": 0.5,
    }))
    w1 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [-0.4, 0.6, 0.2, -0.1], [0.3, 0.3, -0.5, 0.2]])
    w2 = torch.tensor([[0.7, -0.3, 0.2], [-0.6, 0.4, 0.5]])
    f = torch.tensor([[0.3, -0.1], [0.2, 0.4], [-0.5, 0.1], [0.1, -0.3]])
    with torch.no_grad():
        method.layers[0].weight.copy_(w1)
        method.layers[1].weight.copy_(w2)
        method.model.projection.copy_(f)
    return method, {"w1": w1, "w2": w2, "f": f}


def test_pepita_update_is_the_closed_form():
    method, p = pepita_by_hand()
    x = torch.tensor([[1.0, 0.5, -0.5, 2.0], [0.2, -1.0, 1.5, 0.3]])
    y = torch.tensor([0, 1])
    w1, w2, f, lr = p["w1"], p["w2"], p["f"], 0.5
    # The paper's rule, written out: first pass, error, modulated input, second pass.
    h1 = (x @ w1.T).relu()
    e = (h1 @ w2.T).softmax(1) - F.one_hot(y, 2).float()
    x_mod = x + e @ f.T
    h1_mod = (x_mod @ w1.T).relu()
    e_mod = (h1_mod @ w2.T).softmax(1) - F.one_hot(y, 2).float()
    new_w1 = w1 - lr * (h1 - h1_mod).T @ x_mod / 2
    new_w2 = w2 - lr * e_mod.T @ h1_mod / 2
    assert not torch.allclose(h1, h1_mod), "the modulation must change the hidden activity"

    method.train()
    method.train_step(x.view(2, 1, 2, 2), y)
    torch.testing.assert_close(method.layers[0].weight, new_w1)
    torch.testing.assert_close(method.layers[1].weight, new_w2)
    assert method.layers[0].bias is None and method.layers[1].bias is None


def test_pepita_projection_is_fixed_and_checkpointed(separable):
    x, y, _, _ = separable
    method = make_method("pepita")
    projection = method.model.projection.clone()
    assert "projection" in dict(method.model.named_buffers())
    assert not any(p is method.model.projection for p in method.model.parameters())
    assert "projection" in method.state_dict()["model"]
    train(method, x, y, steps=20)
    assert torch.equal(method.model.projection, projection)
    # The scale of the reference code: U(-b, b), b = 0.05 * sqrt(6 / inputs).
    bound = 0.05 * math.sqrt(6 / 256)
    assert projection.abs().max() <= bound and projection.abs().max() > 0.9 * bound


def test_pepita_step_uses_no_autograd(separable, monkeypatch):
    x, y, _, _ = separable
    method = make_method("pepita", depth=2)

    def refuse(*args, **kwargs):
        raise AssertionError("reverse-mode autograd was called")

    grad_enabled = []
    for module in method.model.modules():
        module.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    before = {k: p.clone() for k, p in method.model.named_parameters()}
    method.train()
    logs = method.train_step(x[:32], y[:32])
    assert grad_enabled and not any(grad_enabled)
    assert not logs["loss"].requires_grad
    assert all(not torch.equal(p, before[k]) for k, p in method.model.named_parameters())


def test_pepita_dropout_mask_is_shared_by_both_passes(monkeypatch):
    """With one mask for both passes, a dropped unit has the same (zero) activity in both, so
    its weights do not move; masks drawn per pass would move them."""
    torch.manual_seed(0)
    method = Pepita(Task((1, 4, 4), 3), Pepita.config_for("default", {"width": 64, "momentum": 0.0}))
    method.train()
    original = method.forward_pass
    masks_seen = []

    def spy(x, masks):
        masks_seen.append(masks)
        return original(x, masks)

    monkeypatch.setattr(method, "forward_pass", spy)
    before = method.layers[0].weight.clone()
    method.train_step(torch.randn(1, 1, 4, 4), torch.tensor([1]))
    assert len(masks_seen) == 2 and masks_seen[0] is masks_seen[1]
    dropped = masks_seen[0][0][0] == 0
    assert dropped.any()
    assert torch.equal(method.layers[0].weight[dropped], before[dropped])


# --- shared ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ff", "pepita"])
def test_cnn_is_rejected_with_a_reason(name):
    cls = {"ff": ForwardForward, "pepita": Pepita}[name]
    with pytest.raises(ConfigError, match="arch=mlp only"):
        cls.config_for("default", {"arch": "cnn"})


def test_schedules_follow_their_sources():
    # Hinton's Matlab code, 60 epochs: constant to epoch 30, then (1 + 2 (60 - e)) / 60.
    gain = hinton_gain(60)
    assert [gain(e) for e in (1, 30)] == [1.0, 1.0]
    assert gain(31) == pytest.approx(59 / 60) and gain(60) == pytest.approx(1 / 60)
    assert gain(61) == gain(60)

    steps = 3
    ff = ff_method(task_kw={"steps_per_epoch": steps}, optimizer="sgd", lr=0.1, head_lr=0.2,
                   schedule_epochs=4, negatives="hard")
    pep = Pepita(Task((1, 4, 4), 3, steps_per_epoch=steps),
                 Pepita.config_for("default", {"width": 8, "decay_epochs": "1,3", "lr": 0.1}))
    x, y = torch.randn(4, 1, 4, 4), torch.arange(4) % 3
    ff_lrs, pep_lrs = [], []
    for _ in range(5 * steps):
        ff_lrs.append([(g["lr"], base) for opt, base in ((ff.optimizers["layers"], 0.1),
                                                        (ff.optimizers["head"], 0.2))
                       for g in opt.param_groups])
        pep_lrs.append(pep.optimizers["sgd"].param_groups[0]["lr"])
        ff.train_step(x, y)
        pep.train_step(x, y)
    gains = [1, 1, 3 / 4, 1 / 4, 1 / 4]  # gain(e) of a 4-epoch schedule, held after it ends
    for step, lrs in enumerate(ff_lrs):
        assert [lr for lr, _ in lrs] == pytest.approx([base * gains[step // steps]
                                                       for _, base in lrs]), step
    assert pep_lrs == pytest.approx([0.1] * 3 + [0.01] * 6 + [0.001] * 6)


@pytest.mark.parametrize("name", ["ff", "pepita"])
def test_resumed_method_continues_its_schedule_exactly(name, separable):
    x, y, _, _ = separable
    overrides = ({"optimizer": "sgd", "lr": 0.01, "schedule_epochs": 4, "negatives": "hard"}
                 if name == "ff" else {"decay_epochs": "1,2"})
    kw = {"steps_per_epoch": 2}

    def build(seed: int) -> Method:
        cls = {"ff": ForwardForward, "pepita": Pepita}[name]
        torch.manual_seed(seed)
        return cls(Task((1, 16, 16), 4, seed=seed, **kw), cls.config_for("quick", overrides))

    a = build(0)
    train(a, x, y, steps=3)
    b = build(1)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        torch.manual_seed(7)
        train(m, x, y, steps=4, seed=2)
    for (k, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), k
    lrs = [[g["lr"] for opt in m.optimizers.values() for g in opt.param_groups] for m in (a, b)]
    assert lrs[0] == lrs[1]
    assert lrs[0][0] < overrides.get("lr", 0.1) / 2, "the schedule should have moved the lr"


def test_ff_rejects_inputs_smaller_than_the_label():
    with pytest.raises(ConfigError, match="label"):
        ForwardForward(Task((1, 2, 2), 5), ForwardForward.config_for("quick"))


def test_pepita_with_biases_updates_them_by_the_same_deltas():
    """A bias is a weight on a constant input of 1: it moves by the batch mean of its delta."""
    torch.manual_seed(0)
    method = Pepita(Task((1, 2, 2), 2), Pepita.config_for(
        "default", {"width": 3, "bias": True, "dropout": 0.0, "momentum": 0.0, "lr": 1.0}))
    with torch.no_grad():
        for layer in method.layers:
            layer.bias.uniform_(-0.5, 0.5)
    (w1, b1), (w2, b2) = ((layer.weight.clone(), layer.bias.clone()) for layer in method.layers)
    f = method.model.projection
    x, y = torch.randn(5, 4), torch.arange(5) % 2
    target = F.one_hot(y, 2).float()
    h1 = (x @ w1.T + b1).relu()
    x_mod = x + ((h1 @ w2.T + b2).softmax(1) - target) @ f.T
    h1_mod = (x_mod @ w1.T + b1).relu()
    e_mod = (h1_mod @ w2.T + b2).softmax(1) - target
    expected = [(h1 - h1_mod).T @ x_mod / 5, (h1 - h1_mod).mean(0), e_mod.T @ h1_mod / 5,
                e_mod.mean(0)]
    grads, _ = method.updates(x, y)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
