"""NoProp's defining properties (docs/noprop.md), each pinned by a test that fails without it.

Small shapes (1x16x16, 4 classes, batch 32) keep the file fast; the contract tests
(tests/test_methods_contract.py) already check that every variant's `quick` preset learns a
separable task, round-trips its state and repeats exactly under a seed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from bpfree.methods import ConfigError, Task, get_method
from bpfree.methods.noprop import (
    DTBlock,
    LabelEmbedding,
    class_prototypes,
    cosine_schedule,
    kl_to_standard_normal,
    reverse_step_coefficients,
    snr,
)
from bpfree.methods.noprop_continuous import LearnedSchedule
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from bpfree.measure import count_flops, saved_tensor_bytes
from tests.conftest import make_method
from tests.test_methods_contract import accuracy, train

NOPROP = ["noprop-dt", "noprop-ct", "noprop-fm", "backprop-blocks"]


def minibatch(n: int = 32, num_classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.arange(n) % num_classes


# --- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 3, 10, 100])
def test_cosine_schedule_runs_from_noise_to_label_with_positive_weights(T):
    abar = cosine_schedule(T)
    assert len(abar) == T + 1
    assert (abar.diff() > 0).all(), "abar must increase with t (z_0 noise, z_T label)"
    assert 0 < abar[0] < 0.05 and 0.95 < abar[-1] < 1
    assert (snr(abar).diff() > 0).all(), "every L2 weight SNR(t) - SNR(t-1) must be positive"


@pytest.mark.parametrize("abar_0, abar_T", [(0.0, None), (1e-4, None), (None, 0.99), (0.0, 0.9)])
def test_schedule_ends_are_independent_knobs(abar_0, abar_T):
    """Each end can be set alone; the other stays at sigmoid(-/+ log_snr_max)."""
    default = cosine_schedule(10)
    abar = cosine_schedule(10, 4.0, abar_0, abar_T)
    assert float(abar[0]) == pytest.approx(float(default[0]) if abar_0 is None else abar_0, rel=1e-9)
    assert float(abar[-1]) == pytest.approx(float(default[-1]) if abar_T is None else abar_T, rel=1e-12)
    assert (abar.diff() > 0).all() and (snr(abar).diff() > 0).all()


def test_pure_noise_start_has_no_kl_and_a_noise_free_first_reverse_step():
    """abar_0 = 0: q(z_0 | y) is the prior, so the KL term is exactly 0 whatever u_y, and the
    first reverse step ignores z_0 (b_1 = 0)."""
    method = make_method("noprop-dt", T=4, abar_0=0.0)
    u = 5 * torch.randn(8, 4)
    assert kl_to_standard_normal(u, method.abar[0]) == 0
    assert method.step_b[0] == 0
    assert method.l2_weight[0] > 0


def test_schedule_ends_are_validated():
    with pytest.raises(ConfigError, match="0 <= abar_0 < abar_T < 1"):
        make_method("noprop-dt", abar_0=0.5, abar_T=0.4)
    with pytest.raises(ConfigError, match="0 <= abar_0 < abar_T < 1"):
        make_method("noprop-dt", abar_T=1.0)
    assert make_method("noprop-dt", abar_0="none").config.abar_0 is None  # as typed on a CLI


@pytest.mark.parametrize("name", ["noprop-dt", "noprop-ct"])
def test_mean_sampler_draws_no_noise_after_z0(name, monkeypatch):
    """`sampler=mean` runs the reverse chain on its means: the only random draw of a
    prediction is z_0, so fixing z_0 fixes the prediction."""
    method = make_method(name, sampler="mean")
    method.eval()
    x, _ = minibatch(8)
    calls = []
    original = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    first = method.predict(x)
    assert not calls
    torch.manual_seed(0)
    assert torch.equal(first, method.predict(x))
    ancestral = make_method(name, sampler="ancestral")
    ancestral.load_state_dict(method.state_dict())
    ancestral.eval()
    torch.manual_seed(0)
    ancestral.predict(x)
    assert calls, "the ancestral chain draws noise at every step"


def test_fm_heun_is_exact_where_euler_is_not():
    """On a velocity field linear in t, Heun's trapezoid integrates exactly in one step while
    Euler does not: the solver option really changes the integrator."""
    method = make_method("noprop-fm", inference_steps=1)
    method.eval()
    weight = method.model["embed"].weight
    method.velocity = lambda features, z, t: t[:, None].expand_as(z)  # dz/dt = t
    x, _ = minibatch(4)
    torch.manual_seed(0)
    z0 = torch.randn(4, weight.shape[1])
    for sampler, expected in (("euler", z0), ("heun", z0 + 0.5)):
        method.config.sampler = sampler
        torch.manual_seed(0)
        scores = method.predict(x)
        assert torch.allclose(scores, -torch.cdist(expected, weight).pow(2), atol=1e-5)


@pytest.mark.parametrize("embedding", ["one-hot", "prototype", "learned"])
def test_embed_scale_multiplies_the_initial_embedding(embedding):
    plain = make_method("noprop-dt", embedding=embedding)
    scaled = make_method("noprop-dt", embedding=embedding, embed_scale=0.25)
    assert torch.allclose(scaled.model["embed"].weight, 0.25 * plain.model["embed"].weight)


def test_ct_can_spare_the_schedule_from_weight_decay():
    method = make_method("noprop-ct", schedule_weight_decay=False)
    groups = method.optimizers["adam"].param_groups
    schedule = {id(p) for p in method.model["schedule"].parameters()}
    assert [g["weight_decay"] for g in groups] == [method.config.weight_decay, 0.0]
    assert {id(p) for p in groups[1]["params"]} == schedule
    assert not schedule & {id(p) for p in groups[0]["params"]}
    x, y = minibatch()
    method.train()
    out = method.train_step(x, y)
    assert out["gamma1"] > out["gamma0"]  # the learned ends are reported every step


def test_dt_loss_weights_are_the_positive_snr_differences():
    method = make_method("noprop-dt", T=4)
    expected = 4 * 0.1 / 2 * snr(cosine_schedule(4)).diff()
    assert torch.allclose(method.l2_weight.double(), expected, rtol=1e-5)
    assert (method.l2_weight > 0).all()


def assert_increasing(schedule: LearnedSchedule) -> None:
    grid = torch.linspace(0, 1, 1001)
    with torch.no_grad():
        abar = schedule.abar(grid)
        assert (abar.diff() >= 0).all() and abar[-1] > abar[0]
        assert (schedule.snr_derivative(grid) >= 0).all()


def test_ct_schedule_stays_monotone_after_training_and_for_any_parameters(separable):
    x, y, _, _ = separable
    method = make_method("noprop-ct", lr=0.05)  # a large rate moves the schedule a lot
    before = {k: v.clone() for k, v in method.model["schedule"].state_dict().items()}
    train(method, x, y, steps=10)
    schedule = method.model["schedule"]
    assert any(not torch.equal(before[k], v) for k, v in schedule.state_dict().items())
    assert_increasing(schedule)
    # Monotone by construction, not by luck: arbitrary (also negative) raw parameters.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            for p in schedule.parameters():
                p.copy_(4 * torch.randn(p.shape, generator=gen))
        assert_increasing(schedule)


def test_ct_snr_derivative_matches_autograd():
    schedule = LearnedSchedule(-4.0, 4.0, 16)
    t = torch.rand(50, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.exp(-schedule.gamma(t)).sum(), t)
    assert torch.allclose(schedule.snr_derivative(t.detach()), expected, rtol=1e-4, atol=1e-6)


# --- gradient isolation ("isn't this backprop?") -----------------------------------------------


def touched_blocks(method) -> list[bool]:
    return [
        any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in block.parameters())
        for block in method.model["blocks"]
    ]


@pytest.mark.parametrize("embedding", ["one-hot", "learned", "prototype"])
def test_block_loss_reaches_only_its_own_block(embedding):
    """The loss of block t trains block t, the embedding and the classifier, and no other block:
    z_{t-1} is sampled from q(z_{t-1} | y), never produced by block t - 1."""
    method = make_method("noprop-dt", T=3, embedding=embedding)
    x, y = minibatch()
    for t in (1, 2, 3):
        for path in ("paper's L_t as one graph", "what train_step runs"):
            method.model.zero_grad(set_to_none=True)
            if path == "what train_step runs":
                method.backward_blocks(x, y, [t])
            else:
                method.block_loss(t, x, y).backward()
            assert touched_blocks(method) == [s == t for s in (1, 2, 3)]
            assert all(p.grad is not None for p in method.model["blocks"][t - 1].parameters())
            # the shared classifier and embedding are in every block's graph
            assert method.model["classifier"].weight.grad is not None
            assert (embedding == "one-hot") != (method.model["embed"].weight.grad is not None)


def test_backprop_blocks_loss_reaches_every_block():
    """The contrast: end-to-end backprop through the chained blocks trains all of them."""
    method = make_method("backprop-blocks", T=3)
    x, y = minibatch()
    F.cross_entropy(method.forward(x), y).backward()
    assert touched_blocks(method) == [True, True, True]


def test_every_block_step_has_the_gradient_of_the_summed_block_losses():
    """The block-by-block backward of `train_step` computes exactly grad sum_t L_t."""
    method = make_method("noprop-dt", T=3, embedding="learned")
    reference = copy.deepcopy(method)
    x, y = minibatch()
    torch.manual_seed(1)
    method.backward_blocks(x, y, [1, 2, 3])
    torch.manual_seed(1)  # same noise and dropout masks, drawn in the same order
    u = reference.model["embed"](y)
    z = reference.noisy_labels(u)
    denoise = sum(reference.denoise_loss(t, x, z[t - 1], u) for t in (1, 2, 3))
    ce, kl = reference.shared_loss(z[-1], u, y)
    (3 * (ce + kl) + denoise).backward()
    for (name, p), q in zip(method.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


# --- inference ---------------------------------------------------------------------------------------


class Oracle(nn.Module):
    """A perfect block: all softmax mass on the true class, so uhat = u_y exactly."""

    def __init__(self, y: Tensor, num_classes: int) -> None:
        super().__init__()
        self.logits = 100.0 * F.one_hot(y, num_classes).float()

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.logits

    def image(self, x: Tensor) -> Tensor:  # the continuous-time net's image branch
        return x


@pytest.mark.parametrize("name", ["noprop-dt", "noprop-ct"])
def test_oracle_chain_samples_q_of_z_T(name):
    """With blocks that return u_y, the inference chain from z_0 ~ N(0, I) samples
    q(z_T | y) = N(sqrt(abar_T) u_y, (1 - abar_T) I): the reverse-step coefficients match
    the noising process."""
    n, classes = 20000, 4
    overrides = {"T": 10} if name == "noprop-dt" else {"inference_steps": 50}
    method = make_method(name, embedding="learned", embed_dim=6, **overrides)
    y = torch.arange(n) % classes
    if name == "noprop-dt":
        method.model["blocks"] = nn.ModuleList([Oracle(y, classes)] * 10)
        abar_last = method.abar[-1]
    else:
        method.model["net"] = Oracle(y, classes)
        abar_last = method.model["schedule"].abar(torch.ones(1))[0].detach()
    method.eval()
    torch.manual_seed(0)
    z = method.sample_last(torch.zeros(n, 1))
    u = method.model["embed"].weight.detach()
    residual = z - abar_last.sqrt() * u[y]
    var = 1 - abar_last
    for c in range(classes):
        mean_err = residual[y == c].mean(0).abs().max()
        assert mean_err < 5 * math.sqrt(var / (n / classes)) + 1e-3, (c, mean_err)
    assert torch.allclose(residual.var(0), var.expand(6), rtol=5 * math.sqrt(2 / n))


class LinearBlock(nn.Module):
    """A stand-in block whose logits depend on z: z @ M, with its own random M, so that which
    block runs at which step, and on which z, changes the result."""

    def __init__(self, dim: int, classes: int, seed: int) -> None:
        super().__init__()
        self.m = 0.7 * torch.randn(dim, classes, generator=torch.Generator().manual_seed(seed))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return z @ self.m


def linear_blocks(method, T: int, dim: int, classes: int) -> list[LinearBlock]:
    blocks = [LinearBlock(dim, classes, seed=100 + t) for t in range(T)]
    method.model["blocks"] = nn.ModuleList(blocks)
    return blocks


@pytest.mark.parametrize("sampler", ["ancestral", "mean"])
def test_dt_inference_runs_block_t_on_z_t_minus_1_in_order(sampler):
    """The chain written out by hand with the schedule's own abar: z_0 ~ N(0, I), then for
    t = 1..T, z_t = a_t uhat_t(z_{t-1}) + b_t z_{t-1} (+ sqrt(c_t) noise), with a_t, b_t, c_t
    of p(z_t | z_{t-1}) between abar_{t-1} and abar_t. Distinct blocks catch blocks applied in
    another order, on another z, or with another step's coefficients."""
    T, dim, classes, n = 4, 6, 4, 16
    method = make_method("noprop-dt", T=T, embedding="learned", embed_dim=dim, sampler=sampler)
    blocks = linear_blocks(method, T, dim, classes)
    method.eval()
    weight = method.model["embed"].weight.detach()
    abar = cosine_schedule(T).float()
    x = torch.zeros(n, 1, 16, 16)
    torch.manual_seed(0)
    got = method.sample_last(x)
    torch.manual_seed(0)
    z = torch.randn(n, dim)
    for t in range(1, T + 1):
        a, b, c = reverse_step_coefficients(abar[t - 1], abar[t])
        z = a * (blocks[t - 1](x, z).softmax(1) @ weight) + b * z
        if sampler == "ancestral":
            z = z + c.sqrt() * torch.randn(n, dim)
    assert torch.allclose(got, z, atol=1e-5)
    # the same chain with the blocks reversed ends elsewhere: the check can fail
    method.model["blocks"] = nn.ModuleList(blocks[::-1])
    torch.manual_seed(0)
    assert not torch.allclose(method.sample_last(x), z, atol=1e-3)


def test_backprop_blocks_chain_formula():
    """backprop-blocks (the paper's baseline): z_0 ~ N(0, I), z_t = (1 - a_t) z_{t-1}
    + a_t uhat_t(z_{t-1}, x) with a_t = tanh(w_t), logits of p_out on z_T; every w_t and every
    block gets a gradient from the cross-entropy."""
    T, dim, classes, n = 3, 6, 4, 16
    method = make_method("backprop-blocks", T=T, embedding="learned", embed_dim=dim)
    blocks = linear_blocks(method, T, dim, classes)
    for block in blocks:
        block.m = nn.Parameter(block.m)
    with torch.no_grad():
        method.model.mix.copy_(torch.tensor([0.2, -0.4, 1.3]))
    weight = method.model["embed"].weight
    x, y = minibatch(n)
    torch.manual_seed(0)
    logits = method.forward(x)
    torch.manual_seed(0)
    z = torch.randn(n, dim)
    for t, w in enumerate([0.2, -0.4, 1.3]):
        a = math.tanh(w)
        z = (1 - a) * z + a * (blocks[t](x, z).softmax(1) @ weight)
    assert torch.allclose(logits, method.model["classifier"](z), atol=1e-5)
    F.cross_entropy(logits, y).backward()
    assert (method.model.mix.grad != 0).all()
    assert all(b.m.grad is not None and b.m.grad.abs().sum() > 0 for b in blocks)


def test_fm_euler_solver_and_nearest_embedding_prediction():
    """With the exact conditional velocity (u_y - z) / (1 - t), N Euler steps end at u_y and the
    prediction is y: the solver's time grid and the nearest-embedding rule are right."""
    method = make_method("noprop-fm", embedding="learned", embed_dim=6, inference_steps=7)
    x, y = minibatch()
    u = method.model["embed"].weight.detach()[y]
    method.velocity = lambda features, z, t: (u - z) / (1 - t[:, None])
    method.eval()
    scores = method.predict(x)
    assert (scores.argmax(1) == y).all()
    assert scores.gather(1, y[:, None]).abs().max() < 1e-6  # -||z_1 - u_y||^2 = 0


# --- losses and embeddings ----------------------------------------------------------------------------


def test_kl_term_equals_its_closed_form():
    u = torch.randn(64, 7)
    abar0 = 0.03
    expected = kl_divergence(Normal(math.sqrt(abar0) * u, math.sqrt(1 - abar0)), Normal(0.0, 1.0))
    assert torch.allclose(kl_to_standard_normal(u, abar0), expected.sum(1).mean(), rtol=1e-5)
    # and NoProp-DT's loss uses it at abar_0 on the embedded labels
    method = make_method("noprop-dt", embedding="learned")
    x, y = minibatch()
    u = method.model["embed"](y).detach()
    _, kl = method.shared_loss(torch.zeros_like(u), u, y)
    a0 = method.abar[0]
    expected = kl_divergence(Normal(a0.sqrt() * u, (1 - a0).sqrt()), Normal(0.0, 1.0))
    assert torch.allclose(kl, expected.sum(1).mean(), rtol=1e-5)


def test_paper_preset_starts_the_chain_from_pure_noise_with_the_old_schedule_reachable():
    """The `paper` preset's z_0 carries nothing of the label (abar_0 = 0, so the KL term is
    exactly 0 even for prototype embeddings of squared norm ~700); `abar_0=none` restores the
    schedule tied to log_snr_max, whose z_0 keeps a prototype label readable."""
    cls = get_method("noprop-dt")
    x, y = minibatch()
    kls = {}
    for abar_0 in (0.0, None):
        config = cls.config_for("paper", {"embedding": "prototype", "abar_0": abar_0})
        task = Task((1, 28, 28), 10, train_sample=(torch.randn(64, 1, 28, 28), torch.arange(64) % 10))
        method = cls(task, config)
        u = method.model["embed"](y % 10).detach()
        kls[abar_0] = method.shared_loss(torch.zeros_like(u), u, y % 10)[1].item()
        assert method.abar[0].item() == pytest.approx(0.0 if abar_0 == 0.0 else 1 / (1 + math.exp(4)))
    assert cls.config_for("paper").abar_0 == 0.0
    assert kls[0.0] == 0.0 and kls[None] > 1.0, kls


def test_ct_training_loss_is_algorithm_2():
    """NoProp-CT's loss rebuilt from the same random draws (t, then the noise of z_t, then
    that of z_1), with SNR' by autograd: CE of p_out on z_1 ~ q(z_1 | y) (not z_t), the KL at
    abar(0), and eta / 2 SNR'(t_i) ||uhat(z_t_i, x_i, t_i) - u_y||^2 at each example's own t."""
    n, dim, eta = 16, 6, 0.3
    method = make_method("noprop-ct", embedding="learned", embed_dim=dim, eta=eta)
    method.eval()  # dropout off: the only random draws are the loss's own
    x, y = minibatch(n)
    torch.manual_seed(0)
    got = method.losses(x, y)
    torch.manual_seed(0)
    t, noise_t, noise_1 = torch.rand(n), torch.randn(n, dim), torch.randn(n, dim)
    schedule, net = method.model["schedule"], method.model["net"]
    u = method.model["embed"](y)
    with torch.no_grad():
        abar_t, abar_0, abar_1 = (schedule.abar(v) for v in (t, torch.zeros(1), torch.ones(1)))
    leaf = t.clone().requires_grad_()
    (snr_prime,) = torch.autograd.grad(torch.exp(-schedule.gamma(leaf)).sum(), leaf)
    z_t = abar_t.sqrt()[:, None] * u + (1 - abar_t).sqrt()[:, None] * noise_t
    uhat = net(net.image(x), z_t, t).softmax(1) @ method.model["embed"].weight
    denoise = eta / 2 * (snr_prime * (uhat - u).pow(2).sum(1)).mean()
    z_1 = abar_1.sqrt() * u + (1 - abar_1).sqrt() * noise_1
    ce = F.cross_entropy(method.model["classifier"](z_1), y)
    prior = kl_divergence(Normal(abar_0.sqrt() * u, (1 - abar_0).sqrt()), Normal(0.0, 1.0))
    expected = {"denoise": denoise, "ce": ce, "kl": prior.sum(1).mean()}
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-4), key
    assert torch.allclose(got["loss"], sum(expected.values()), rtol=1e-4)


@pytest.mark.parametrize("embedding,sigma", [("learned", 0.5), ("one-hot", 0.0)])
def test_fm_training_target_and_path(embedding, sigma):
    """NoProp-FM: z_0 ~ N(0, I), t ~ U(0, 1), the network sees z_t = t u_y + (1 - t) z_0
    (+ sigma noise) at that t, its velocity is regressed on u_y - z_0, and a learned
    embedding adds CE of p_out on z_t + (1 - t) v; a fixed one-hot embedding has no CE."""
    n = 16
    method = make_method("noprop-fm", embedding=embedding, embed_dim=6, sigma=sigma)
    method.eval()
    x, y = minibatch(n)
    seen = {}
    velocity = method.velocity

    def recording(features: Tensor, z: Tensor, t: Tensor) -> Tensor:
        seen.update(z=z.detach(), t=t, v=velocity(features, z, t))
        return seen["v"]

    method.velocity = recording
    torch.manual_seed(0)
    got = method.losses(x, y)
    u = method.model["embed"](y)
    dim = u.shape[1]
    torch.manual_seed(0)
    z_0, t, noise = torch.randn(n, dim), torch.rand(n), torch.randn(n, dim)
    path = t[:, None] * u + (1 - t[:, None]) * z_0 + (sigma * noise if sigma else 0)
    assert torch.equal(seen["t"], t)
    assert torch.allclose(seen["z"], path.detach(), atol=1e-6)
    v = seen["v"]
    assert torch.allclose(got["flow"], (v - (u - z_0)).pow(2).sum(1).mean(), rtol=1e-5)
    if embedding == "learned":
        ce = F.cross_entropy(method.model["classifier"](path + (1 - t[:, None]) * v), y)
        assert torch.allclose(got["ce"], ce, rtol=1e-5)
        assert torch.allclose(got["loss"], got["flow"] + ce, rtol=1e-5)
    else:
        assert "ce" not in got and torch.equal(got["loss"], got["flow"])


EMBEDDINGS = [
    {"embedding": "one-hot"},
    {"embedding": "learned"},
    {"embedding": "learned", "embed_dim": 3},  # d < classes: random init
    {"embedding": "prototype"},
]


@pytest.mark.parametrize("name", NOPROP)
@pytest.mark.parametrize("embedding", EMBEDDINGS, ids=lambda e: "-".join(map(str, e.values())))
def test_loss_is_finite_for_every_embedding(name, embedding, separable):
    x, y, tx, _ = separable
    method = make_method(name, **embedding)
    for log in train(method, x, y, steps=2):
        assert all(math.isfinite(v) for v in log.values()), log
    method.eval()
    assert torch.isfinite(method.predict(tx[:8])).all()


@pytest.mark.parametrize("init", ["random", "orthogonal", "prototype"])
def test_prototype_sized_embedding_initialisations(init, separable):
    x, y, _, _ = separable
    method = make_method("noprop-dt", T=2, embedding="prototype", embed_init=init)
    weight = method.model["embed"].weight
    assert weight.shape == (4, 256)
    if init == "orthogonal":
        gram = weight @ weight.T
        assert torch.allclose(gram, 256 * torch.eye(4), atol=1e-3)
    for log in train(method, x, y, steps=2):
        assert math.isfinite(log["loss"])


def test_prototype_is_the_example_with_the_smallest_median_distance():
    # class 0 on a line at 0, 1, 2, 10: median distances to the others are 2, 1, 2, 9
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [5.0], [7.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    assert torch.equal(class_prototypes(x, y, 2), torch.tensor([[1.0], [5.0]]))
    task = Task((1, 1, 1), 2, train_sample=(x.view(-1, 1, 1, 1), y))
    embed = LabelEmbedding("prototype", "auto", 0, task)
    assert embed.learned and torch.equal(embed.weight.detach(), torch.tensor([[1.0], [5.0]]))


# --- architecture ---------------------------------------------------------------------------------------

# Table 5 (millions of parameters per block, one-hot / dim=20 / prototype) and the exact count
# of our block with unpadded 3x3 convolutions.
TABLE5 = [
    ((1, 28, 28), 10, "one-hot", 0.92, 919_946),
    ((1, 28, 28), 10, "learned", 0.92, 922_506),
    ((1, 28, 28), 10, "prototype", 1.40, 1_401_738),
    ((3, 32, 32), 10, "one-hot", 1.22, 1_215_434),
    ((3, 32, 32), 10, "learned", 1.22, 1_217_994),
    ((3, 32, 32), 10, "prototype", 1.99, 1_992_714),
    ((3, 32, 32), 100, "one-hot", 1.25, 1_250_084),
    ((3, 32, 32), 100, "learned", 1.23, 1_229_604),
    ((3, 32, 32), 100, "prototype", 2.00, 2_004_324),
]


@pytest.mark.parametrize("shape,classes,embedding,millions,exact", TABLE5)
def test_dt_block_has_the_papers_parameter_count(shape, classes, embedding, millions, exact):
    task = Task(shape, classes)
    embed = LabelEmbedding(embedding, "auto" if embedding == "one-hot" else "random", 20, task)
    count = sum(p.numel() for p in DTBlock(task, embed, 0.2).parameters())
    assert round(count / 1e6, 2) == millions
    assert count == exact


# --- training order and memory ------------------------------------------------------------------------


def test_block_by_block_order_trains_one_block_at_a_time(separable):
    x, y, _, _ = separable
    method = make_method("noprop-dt", T=3, order="block-by-block", steps_per_block=2)
    trained = []
    for step in range(7):
        before = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in method.model["blocks"]]
        train(method, x, y, steps=1, seed=step)
        after = [torch.cat([p.detach().flatten() for p in b.parameters()]) for b in method.model["blocks"]]
        changed = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
        assert sum(changed) == 1
        trained.append(changed.index(True) + 1)
    assert trained == [1, 1, 2, 2, 3, 3, 1]


def activation_bytes(name: str, T: int) -> tuple[int, int]:
    method = make_method(name, T=T)
    method.train()
    x, y = minibatch()
    return saved_tensor_bytes(
        lambda: method.train_step(x, y), exclude=list(method.model.parameters())
    )


@pytest.mark.parametrize("embedding", ["one-hot", "prototype"])
def test_stacked_blocks_give_the_loops_gradients_and_statistics(embedding):
    """`blocks=stacked` runs the T blocks as one vmapped computation: the same gradient of
    sum_t L_t as the loop (dropout off, so both draw the same noisy labels) and the same
    BatchNorm running statistics in every block. Biases followed by BatchNorm have a true
    gradient of 0, so only float noise to compare: the check is relative to each block's
    whole gradient."""
    loop = make_method("noprop-dt", T=3, dropout=0.0, embedding=embedding)
    stacked = make_method("noprop-dt", T=3, dropout=0.0, embedding=embedding, blocks="stacked")
    stacked.load_state_dict(loop.state_dict())
    x, y = minibatch()
    for method in (loop, stacked):
        method.train()
        torch.manual_seed(0)
        method.backward_blocks(x, y, range(1, 4))
    for (name, p), q in zip(loop.model.named_parameters(), stacked.model.parameters()):
        scale = max(g.grad.norm() for g in loop.model.parameters() if g.grad is not None)
        assert (p.grad - q.grad).norm() <= 1e-4 * scale, name
    for (name, a), b in zip(loop.model.named_buffers(), stacked.model.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_dt_step_holds_one_blocks_activations_whatever_T():
    """NoProp's memory claim: updating every block on a minibatch holds one block's activations
    for backward at a time, while end-to-end backprop through the same blocks holds all."""
    (dt_peak_2, dt_total_2), (dt_peak_6, dt_total_6) = activation_bytes("noprop-dt", 2), activation_bytes("noprop-dt", 6)
    (bp_peak_2, _), (bp_peak_6, _) = activation_bytes("backprop-blocks", 2), activation_bytes("backprop-blocks", 6)
    assert dt_peak_6 <= 1.1 * dt_peak_2
    assert dt_total_6 >= 2.5 * dt_total_2  # all six blocks did run and save activations
    assert bp_peak_6 >= 2.5 * bp_peak_2


# --- learning --------------------------------------------------------------------------------------


def test_block_by_block_order_learns(separable):
    x, y, tx, ty = separable
    method = make_method("noprop-dt", T=3, order="block-by-block", steps_per_block=60)
    train(method, x, y, steps=180)
    assert accuracy(method, tx, ty) >= 0.9


# --- benchmark ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_step_costs() -> dict[str, tuple[int, int, int]]:
    """(FLOPs, activation bytes at the peak, all activation bytes) of one `paper` step
    (T = 10) at batch 128 on MNIST-shaped input, for noprop-dt and backprop-blocks."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.arange(128) % 10
    costs = {}
    for name in ("noprop-dt", "backprop-blocks"):
        cls = type(make_method(name))
        method = cls(Task((1, 28, 28), 10, train_sample=(x, y)), cls.config_for("paper"))
        method.train()
        flops = count_flops(lambda m=method: copy.deepcopy(m).train_step(x, y))
        other = copy.deepcopy(method)
        peak, total = saved_tensor_bytes(
            lambda m=other: m.train_step(x, y), exclude=list(other.model.parameters()))
        costs[name] = (flops, peak, total)
    return costs


def test_paper_step_costs_match_the_papers_memory_claim(paper_step_costs):
    """At the paper's size (T = 10, batch 128, MNIST): both methods run every block forward
    and backward once per step, so their FLOPs agree within 5%; NoProp-DT holds one block's
    activations for backward at a time (under a fifth of backprop's, which holds all ten)
    while it saves as much in total over the step."""
    dt_flops, dt_peak, dt_total = paper_step_costs["noprop-dt"]
    bp_flops, bp_peak, _ = paper_step_costs["backprop-blocks"]
    assert abs(dt_flops / bp_flops - 1) < 0.05, (dt_flops, bp_flops)
    assert 5 * dt_peak < bp_peak, (dt_peak, bp_peak)
    assert dt_total > 0.8 * bp_peak


@pytest.mark.parametrize("name", ["noprop-dt", "backprop-blocks"])
def test_paper_train_step_benchmark(benchmark, name, paper_step_costs):
    """One `paper` training step (T = 10) at batch 128 on MNIST-shaped input, timed with
    --benchmark-enable (once otherwise); its FLOPs and bytes held for backward go into the
    benchmark's JSON. The step must run and give a finite loss either way."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.arange(128) % 10
    cls = type(make_method(name))
    method = cls(Task((1, 28, 28), 10, train_sample=(x, y)), cls.config_for("paper"))
    method.train()
    flops, peak, total = paper_step_costs[name]
    benchmark.extra_info.update(flops_train_step=flops, act_bytes_peak=peak, act_bytes_total=total)
    before = [p.detach().clone() for p in method.model.parameters()]
    out = benchmark.pedantic(method.train_step, args=(x, y), rounds=10, warmup_rounds=1)
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
