"""Forward-gradient methods: no backward pass, unbiased estimates, greedy isolation, learning.

Autograd appears here only to compute the true gradients that the estimates are checked against.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from bpfree.methods import Method, Task, all_methods
from bpfree.methods.forward_gradient import (
    ForwardGradientConfig,
    _Block,
    _block_estimates,
)
from bpfree.methods.nets import build_net, flat_steps
from torch import Tensor, nn

from tests.conftest import make_method
from tests.test_methods_contract import accuracy, train

NAMES = ["fg-w", "fg-a", "lg-fg-a"]


def refuse(*args, **kwargs):
    raise AssertionError("reverse-mode autograd was called")


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("name", NAMES)
def test_step_runs_without_reverse_mode_and_updates_every_parameter(name, arch, separable, monkeypatch):
    x, y, _, _ = separable
    method = make_method(name, arch=arch, tangents=2)
    method.train()
    grad_enabled = []
    for module in method.model.modules():
        module.register_forward_pre_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    before = {k: p.detach().clone() for k, p in method.model.named_parameters()}
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    logs = method.train_step(x[:32], y[:32])
    assert grad_enabled and not any(grad_enabled), "a module ran with grad mode on"
    assert all(not v.requires_grad for v in logs.values())
    unchanged = [k for k, p in method.model.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, f"{name} did not update {unchanged}"


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_flat_steps_compute_the_shared_net(arch):
    """Activity perturbation runs the nets of `methods.nets` as a flat list: it must be the same net."""
    torch.manual_seed(0)
    net = build_net(arch, (1, 16, 16), 4).eval()
    x = torch.randn(5, 1, 16, 16)
    h = x
    for step in flat_steps(net):
        h = step(h)
    assert torch.equal(h, net(x))


def true_gradient(method: Method, x: Tensor, y: Tensor) -> Tensor:
    """The gradient each method estimates: of the net's loss, or of the sum of local losses with
    every block's input detached (local greedy)."""
    params = list(method.model.parameters())
    if method.name == "lg-fg-a":
        loss, h = 0.0, x
        for block in method.blocks:
            logits, _, h, _ = block(h.detach(), {})
            loss = loss + F.cross_entropy(logits, y)
    else:
        loss = F.cross_entropy(method.net(x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@torch.no_grad()
def estimate(method: Method, x: Tensor, y: Tensor, tangents: int, chunk: int = 0) -> Tensor:
    method.config.tangents, method.config.tangent_chunk = tangents, chunk
    grads, _ = method.estimate(x, y)
    return torch.cat([grads[k].flatten() for k, _ in method.model.named_parameters()])


@pytest.mark.parametrize("name", NAMES)
def test_estimates_are_unbiased_and_spread_shrinks_like_one_over_sqrt_k(name):
    cls = all_methods()[name]
    torch.manual_seed(0)
    shape, classes = (1, 4, 4), 3
    method = cls(Task(shape, classes), cls.config_for("default", {"width": 8, "depth": 2}))
    x, y = torch.randn(8, *shape), torch.arange(8) % classes
    g = true_gradient(method, x, y)

    samples = 300
    spread = {}
    for k in (1, 16):
        errors = torch.stack([estimate(method, x, y, k) - g for _ in range(samples)])
        spread[k] = errors.pow(2).sum(1).mean().sqrt()
    ratio = float(spread[1] / spread[16])
    assert 4 / 1.33 < ratio < 4 * 1.33, f"spread(K=1)/spread(K=16) = {ratio:.2f}, expected ~4"

    # The mean of many tangents misses g by no more than its own noise: E||mean - g||^2 is
    # spread(K=1)^2 / K for an unbiased estimator; a 10% bias would already triple it here.
    many = 50_000
    error = (estimate(method, x, y, many, chunk=5000) - g).pow(2).sum()
    expected = spread[1] ** 2 / many
    assert error < 3 * expected, f"{name}: ||mean - g||^2 = {error:.3g}, noise alone {expected:.3g}"


def batchnorm_bias() -> float:
    """||mean estimate - g||^2 over its noise level for a block with BatchNorm in training mode."""
    torch.manual_seed(0)
    steps = [nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)]
    block = _Block(steps, [], (6,), torch.device("cpu"))
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    params = [p for s in steps for p in s.parameters()]
    logits, _, _, _ = block(x, {})
    g = torch.cat([t.flatten() for t in torch.autograd.grad(F.cross_entropy(logits, y), params)])

    @torch.no_grad()
    def mean_error(tangents: int, chunk: int = 0) -> Tensor:
        config = ForwardGradientConfig(tangents=tangents, tangent_chunk=chunk)
        pairs = {id(p): est for p, est in _block_estimates(block, x, y, config)[0]}
        return torch.cat([pairs[id(p)].flatten() for p in params]) - g

    noise = torch.stack([mean_error(1) for _ in range(300)]).pow(2).sum(1).mean()
    many = 50_000
    return float(mean_error(many, chunk=5000).pow(2).sum() / (noise / many))


def test_batchnorm_in_training_mode_keeps_estimates_unbiased(monkeypatch):
    """BatchNorm mixes examples: sites before it use the batch's total directional derivative."""
    assert batchnorm_bias() < 3
    # The per-example estimate, which ignores the mixing, is measurably biased on the same block.
    monkeypatch.setattr(_Block, "coupled", lambda self, site: False)
    assert batchnorm_bias() > 30


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_running_statistics_advance_once_per_step(name, separable):
    """K tangents in K separate chunks still apply exactly one momentum update, as one forward."""
    x, y, _, _ = separable
    method = make_method(name, arch="cnn", tangents=3, tangent_chunk=1)
    for module in method.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # so that a plain forward sees the same batch statistics
    method.train()
    reference = copy.deepcopy(method.net)
    with torch.no_grad():
        reference(x[:16])
    method.train_step(x[:16], y[:16])
    buffers = dict(method.net.named_buffers())
    assert buffers, "the CNN should have BatchNorm buffers"
    for key, expected in reference.named_buffers():
        torch.testing.assert_close(buffers[key], expected, msg=key)


def output_layer(method: Method) -> nn.Linear:
    return [m for m in method.net.modules() if isinstance(m, nn.Linear)][-1]


def parameters_after_one_step(name: str, arch: str, shift_output: bool, separable) -> dict:
    x, y, _, _ = separable
    method = make_method(name, arch=arch, depth=3, tangents=2)
    if shift_output:
        with torch.no_grad():
            for p in output_layer(method).parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(0)
    method.train()
    method.train_step(x[:32], y[:32])
    return {k: p.detach().clone() for k, p in method.model.named_parameters()}


@pytest.mark.parametrize("name,arch", [("lg-fg-a", "mlp"), ("lg-fg-a", "cnn"), ("fg-a", "mlp")])
def test_local_greedy_blocks_do_not_depend_on_later_blocks(name, arch, separable):
    """Changing the output layer leaves the update of every block before the last unchanged
    (lg-fg-a), but changes the first layer's update when one loss spans the net (fg-a)."""
    method = make_method(name, arch=arch, depth=3)
    params = list(method.model.named_parameters())
    if name == "lg-fg-a":
        assert len(method.blocks) > 2
        last = {id(p) for p in method.blocks[-1].steps.parameters()}
        checked = [k for k, p in params if id(p) not in last]
    else:
        first = next(m for m in method.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        checked = [k for k, p in params if p is first.weight]
    assert checked
    base = parameters_after_one_step(name, arch, False, separable)
    shifted = parameters_after_one_step(name, arch, True, separable)
    same = [k for k in checked if torch.equal(base[k], shifted[k])]
    assert (same == checked) == (name == "lg-fg-a"), f"unchanged: {same}"


@pytest.mark.parametrize("name", NAMES)
def test_learns_with_sgd_and_rademacher_tangents(name, separable):
    x, y, tx, ty = separable
    method = make_method(name, optimizer="sgd", lr=1e-3, distribution="rademacher", tangents=4)
    before = accuracy(method, tx, ty)
    train(method, x, y, steps=50)
    after = accuracy(method, tx, ty)
    assert after >= 0.9, f"{name}: test accuracy {after:.3f} (was {before:.3f})"


# --- Ren et al.'s estimator: ReLU-masked perturbations, exact heads, per-example tangents ---


def small_method(name: str, seed: int = 0, **overrides) -> Method:
    """A 64-32-32-4 ReLU MLP (fixed seed) at initialisation, K=1 tangent."""
    cls = all_methods()[name]
    torch.manual_seed(seed)
    config = cls.config_for("default", {"width": 32, "depth": 2, **overrides})
    return cls(Task((1, 8, 8), 4), config)


def small_batch(n: int = 16, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 4


def estimator_errors(method: Method, x: Tensor, y: Tensor, draws: int = 300) -> dict[str, float]:
    """Mean squared error of one-tangent estimates against autograd, E||g_hat - g||^2, in
    total and per layer (each relative to that layer's ||g||^2), and the squared error of the
    mean of 50,000 tangents over what its noise alone would give (about 1 if unbiased)."""
    names = [k for k, _ in method.model.named_parameters()]
    sizes = [p.numel() for _, p in method.model.named_parameters()]
    g = true_gradient(method, x, y)
    torch.manual_seed(2)
    errors = torch.stack([estimate(method, x, y, 1) - g for _ in range(draws)])
    mse = float(errors.pow(2).sum(1).mean())
    out = {"mse": mse, "relative_mse": mse / float(g.pow(2).sum())}
    layers: dict[str, list[int]] = {}
    start = 0
    for name, size in zip(names, sizes):
        layers.setdefault(name.rpartition(".")[0], []).extend(range(start, start + size))
        start += size
    for layer, idx in layers.items():
        out[f"relative_mse/{layer}"] = float(errors[:, idx].pow(2).sum(1).mean()
                                             / g[idx].pow(2).sum().clamp_min(1e-30))
    many = 50_000
    bias = float((estimate(method, x, y, many, chunk=5000) - g).pow(2).sum())
    out["bias_over_noise"] = bias / (mse / many)
    return out


@pytest.mark.parametrize("name", ["fg-a", "lg-fg-a"])
def test_relu_mask_keeps_the_estimate_unbiased_and_lowers_its_variance(name):
    """Ren et al. Sec. 3.6: an inactive ReLU's unit has zero true gradient, so not perturbing
    it changes nothing in expectation and removes its noise. Same weights, same batch, the
    mask on and off: both unbiased, the masked one clearly less noisy."""
    method = small_method(name)
    x, y = small_batch()
    method.config.relu_mask = True
    masked = estimator_errors(method, x, y)
    method.config.relu_mask = False
    plain = estimator_errors(method, x, y)
    for result in (masked, plain):
        assert result["bias_over_noise"] < 3, result  # a 10% bias would give ~30 here
    assert masked["mse"] < 0.75 * plain["mse"], (masked["mse"], plain["mse"])


def test_masked_perturbations_are_zero_exactly_where_the_relu_is_off(monkeypatch):
    """The tangent that reaches a masked site is u * (pre-activation > 0): an inactive unit's
    weight row gets an estimate of exactly zero (like its true gradient), an active one not."""
    method = small_method("fg-a")
    x, y = small_batch(1)
    first = method.net.layers[0]
    with torch.no_grad():
        active = (first(x.flatten(1)) > 0)[0]
        grads, _ = method.estimate(x, y)
    rows = grads["net.layers.0.weight"].abs().sum(1)
    assert (~active).any() and active.any()
    assert torch.all(rows[~active] == 0) and torch.all(rows[active] > 0)
    method.config.relu_mask = False
    with torch.no_grad():
        grads, _ = method.estimate(x, y)
    assert torch.all(grads["net.layers.0.weight"].abs().sum(1) > 0)


@pytest.mark.parametrize("name", ["fg-a", "lg-fg-a"])
def test_heads_and_readout_get_their_exact_local_gradient(name):
    """head_grad=exact (Ren et al.'s code): every layer that produces a loss's logits (the
    network's output layer; lg-fg-a's auxiliary heads) gets the exact gradient of that loss,
    on every draw; head_grad=forward estimates it like the others (noisy)."""
    method = small_method(name)
    x, y = small_batch()
    params = dict(method.model.named_parameters())
    heads = [k for k in params if k.startswith("heads.")] + [
        k for k in params if k.startswith(f"net.layers.{len(method.net.layers) - 1}.")]
    assert len(heads) == 2 * len(method.blocks)  # a weight and a bias per loss
    reference = dict(zip(params, torch.autograd.grad(
        method.reference_loss(x, y), list(params.values()))))
    for mode, exact in (("exact", True), ("forward", False)):
        method.config.head_grad = mode
        with torch.no_grad():
            grads, _ = method.estimate(x, y)
        for key in heads:
            assert torch.allclose(grads[key], reference[key], atol=1e-6) == exact, (mode, key)


def test_activity_tangents_are_drawn_per_example():
    """Ren et al. Table 1: independent perturbations per example divide the variance by the
    batch size N. On a batch of N copies of one example, the weight estimate is then the mean
    of N independent single-example estimates, N times less noisy than on that example alone;
    a tangent shared across the batch would make it exactly as noisy."""
    method = small_method("fg-a")
    x, y = small_batch(1)
    copies = 16
    alone = estimator_errors(method, x, y, draws=400)["mse"]
    batch = estimator_errors(method, x.repeat(copies, 1, 1, 1), y.repeat(copies), draws=400)["mse"]
    assert alone / batch > copies / 2, (alone, batch)


def mask_variance_figures(draws: int = 300) -> pd.DataFrame:
    """The numbers behind docs/forward_gradient.md's table: the estimator errors of
    `test_relu_mask_keeps_the_estimate_unbiased_and_lowers_its_variance` for every
    combination of `relu_mask` and `head_grad`."""
    rows = []
    for name in ("fg-a", "lg-fg-a"):
        method = small_method(name)
        x, y = small_batch()
        for head in ("exact", "forward"):
            for mask in (True, False):
                method.config.relu_mask, method.config.head_grad = mask, head
                result = estimator_errors(method, x, y, draws)
                rows.append({"method": name, "head_grad": head, "relu_mask": mask, **result})
    return pd.DataFrame(rows)


if __name__ == "__main__":  # python -m tests.test_forward_gradient: the figures for the docs
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(mask_variance_figures().round(3).to_string(index=False))
