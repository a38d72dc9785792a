"""What makes target propagation what it is, beyond the contract every method passes.

- locality: each forward layer is trained by its own local loss and nothing else;
- feedback learning: the feedback mappings get better at their reconstruction loss;
- Gauss-Newton targets: with exact feedback (set in closed form, or learned) on a network that
  is affine where it is evaluated, the propagated targets are h_l - beta * J_l^+ e, where J_l is
  the Jacobian of the output with respect to h_l and e the per-sample loss gradient at the output;
- targets carry the learning signal: hidden layers alone learn a task.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bpfree.methods import ConfigError
from bpfree.methods.target_prop import TargetPropagation
from torch import Tensor

from tests.conftest import make_method
from tests.test_methods_contract import accuracy, train

VARIANTS = ["dtp", "ddtp-linear"]


def detached_targets(method: TargetPropagation, x: Tensor, y: Tensor):
    hs = [h.detach() for h in method.activations(x)]
    return hs, method.targets(hs, method.output_target(hs[-1], y))


def make_affine(method: TargetPropagation) -> None:
    """Weights I + positive noise and biases 1: on positive inputs every pre-activation is
    positive, every ReLU passes its input, and the MLP is affine with Jacobians = weight products.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in method.layers:
            rows, cols = layer.weight.shape
            layer.weight.copy_(torch.eye(rows, cols) + 0.1 * torch.rand(rows, cols, generator=gen))
            layer.bias.fill_(0.1)


def gauss_newton_targets(method: TargetPropagation, hs: list[Tensor], y: Tensor) -> list[Tensor]:
    """h_l - beta * J_l^+ e for every layer, J_l = W_L ... W_{l+1} (the MLP being affine)."""
    e = hs[-1].softmax(1) - F.one_hot(y, hs[-1].shape[1]).float()
    jacobian = torch.eye(hs[-1].shape[1])
    targets = []
    for index in range(len(method.layers), 0, -1):
        targets.insert(0, hs[index] - method.config.beta * e @ torch.linalg.pinv(jacobian).T)
        jacobian = jacobian @ method.layers[index - 1].weight.detach()
    return targets


def positive_batch(n: int = 16, classes: int = 4) -> tuple[Tensor, Tensor]:
    return 0.1 + 2 * torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(n) % classes


@pytest.mark.parametrize("name", VARIANTS)
def test_each_layer_is_trained_by_its_local_loss_only(name):
    method = make_method(name, shape=(1, 4, 4), num_classes=3, width=8, depth=3)
    x, y = torch.randn(16, 1, 4, 4), torch.arange(16) % 3
    layers = list(method.layers)
    fixed, targets = detached_targets(method, x, y)
    grads = torch.autograd.grad(method.local_loss(method.activations(x), targets),
                                [p for layer in layers for p in layer.parameters()])
    grads = [grads[2 * i: 2 * i + 2] for i in range(len(layers))]
    for index, layer in enumerate(layers, 1):
        # The layer's own loss, written out here: its input and target held constant.
        out = layer(fixed[index - 1])
        out = out.relu() if index < len(layers) else out
        own = 0.5 * (out - targets[index - 1]).pow(2).sum(1).mean()
        expected = torch.autograd.grad(own, list(layer.parameters()))
        for got, want in zip(grads[index - 1], expected):
            torch.testing.assert_close(got, want)

        # Moving every other layer's target, and the weights of every layer above it, leaves
        # this layer's gradient where it was (layers below would change its input, its own).
        moved = [t + (i + 1 != index) * torch.randn_like(t) for i, t in enumerate(targets)]
        saved = [layer.weight.detach().clone() for layer in layers]
        with torch.no_grad():
            for upper in layers[index:]:
                upper.weight.add_(torch.randn_like(upper.weight))
        again = torch.autograd.grad(method.local_loss(method.activations(x), moved),
                                    list(layer.parameters()))
        with torch.no_grad():
            for upper, weight in zip(layers, saved):
                upper.weight.copy_(weight)
        for got, want in zip(again, expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", VARIANTS)
def test_feedback_training_reduces_the_reconstruction_loss(name):
    # One hidden layer and more outputs than hidden units: the only Jacobian the feedback has
    # to undo is the output layer's full-column-rank weight matrix, so an exact reconstruction
    # exists for both losses and the loss can fall far, not just to a rank-limited floor.
    method = make_method(name, shape=(1, 4, 4), num_classes=16, width=8, depth=1, feedback_lr=1e-2)
    hs = [h.detach() for h in method.activations(torch.randn(64, 1, 4, 4))]

    def loss_with_fixed_noise() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return method.reconstruction_loss(hs).item()

    before = loss_with_fixed_noise()
    forward = [p.clone() for p in method.layers.parameters()]
    for _ in range(200):
        method.update_feedback(hs)
    after = loss_with_fixed_noise()
    assert after < 0.2 * before, f"{name}: reconstruction loss {before:.3f} -> {after:.3f}"
    assert all(torch.equal(a, b) for a, b in zip(forward, method.layers.parameters()))


def test_dtp_with_exact_inverses_propagates_gauss_newton_targets():
    method = make_method("dtp", shape=(1, 2, 2), width=4, depth=2, beta=0.5)  # 4 -> 4 -> 4 -> 4: invertible
    make_affine(method)
    for index in (2, 3):
        layer, inverse = method.layers[index - 1], method.model["feedback"][index - 2]
        with torch.no_grad():
            inverse.weight.copy_(torch.linalg.inv(layer.weight))
            inverse.bias.copy_(-inverse.weight @ layer.bias)
    x, y = positive_batch()
    hs, targets = detached_targets(method, x, y)
    assert all((h > 0).all() for h in hs[1:-1]), "the ReLUs must all be passing"
    expected = gauss_newton_targets(method, hs, y)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # Difference correction: an inverse that is off by a constant (g(f(h)) = h + 1) gives the
    # same targets, where plain target propagation, t_1 = g_2(t_2), would be off by 1.
    with torch.no_grad():
        for inverse in method.model["feedback"]:
            inverse.bias.add_(1.0)
    _, shifted = detached_targets(method, x, y)
    for got, want in zip(shifted, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = method.inverse(2, shifted[1])
    assert not torch.allclose(plain, expected[0], atol=0.5)


def test_ddtp_with_pseudo_inverse_feedback_propagates_gauss_newton_targets():
    method = make_method("ddtp-linear", shape=(1, 2, 2), num_classes=3, width=6, depth=2, beta=0.5)
    make_affine(method)
    w2, w3 = (layer.weight.detach() for layer in method.layers[1:])
    with torch.no_grad():
        method.model["feedback"][0].weight.copy_(torch.linalg.pinv(w3 @ w2))
        method.model["feedback"][1].weight.copy_(torch.linalg.pinv(w3))
    x, y = positive_batch(classes=3)
    hs, targets = detached_targets(method, x, y)
    assert all((h > 0).all() for h in hs[1:-1]), "the ReLUs must all be passing"
    for got, want in zip(targets, gauss_newton_targets(method, hs, y)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "classes", "width", "feedback_lr", "batch"),
    # DTP needs invertible layers, DDTP does not; DDTP's loss is noisier, so a bigger batch.
    [("dtp", 4, 4, 3e-2, 64), ("ddtp-linear", 3, 6, 1e-2, 256)],
)
def test_learned_feedback_reaches_gauss_newton_targets(name, classes, width, feedback_lr, batch):
    """Training only the feedback, by each method's own loss, makes the propagated targets
    the Gauss-Newton ones: for DDTP this is the claim that the difference reconstruction loss
    is minimised by the pseudo-inverse."""
    method = make_method(name, shape=(1, 2, 2), num_classes=classes, width=width, depth=2, beta=0.5,
                         noise=0.05, feedback_lr=feedback_lr)
    make_affine(method)
    x, y = positive_batch(batch, classes)
    hs, before = detached_targets(method, x, y)
    expected = gauss_newton_targets(method, hs, y)

    def error(targets: list[Tensor]) -> float:
        # Relative error of the step t_l - h_l, summed over the hidden layers.
        return sum(((t - w).norm() / (w - h).norm()).item()
                   for t, w, h in zip(targets[:-1], expected[:-1], hs[1:-1]))

    torch.manual_seed(0)
    for _ in range(400):
        method.update_feedback(hs)
    _, after = detached_targets(method, x, y)
    assert error(before) > 0.5 and error(after) < 0.1, (error(before), error(after))


@pytest.mark.parametrize("name", VARIANTS)
def test_hidden_layers_learn_through_their_targets_alone(name, separable):
    """With the output layer frozen, all learning must come through the propagated targets."""
    x, y, tx, ty = separable
    method = make_method(name, layer_lrs="1e-3,1e-3,1e-12")
    output = [p.clone() for p in method.layers[-1].parameters()]
    train(method, x, y, steps=150)
    assert accuracy(method, tx, ty) >= 0.9
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(output, method.layers[-1].parameters()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "cnn"}, "arch=mlp only"),
        ({"layer_lrs": "1e-3,1e-3"}, "needs 3 positive values"),
        ({"layer_noise": "0.1,x"}, "comma-separated list"),
    ],
)
def test_rejects_what_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_method("dtp", **overrides)
