"""NoProp-CT and NoProp-FM: one network conditioned on continuous time t in [0, 1].

Both use the paper's continuous-time block (Fig. 5, no BatchNorm): the image branch ending
in FC256 + ReLU, a label branch (FC256 + ReLU, or a copy of the image branch for prototype
embeddings), a time branch (64-dimensional positional embedding -> FC256 -> ReLU) and a head
FC256, ReLU, FC128, ReLU, FC(classes) on the 768-wide concatenation. Label embeddings, the KL
term and the Gaussian reverse step are shared with NoProp-DT (`methods.noprop`).

NoProp-CT (Algorithm 2): t ~ U(0, 1) per example, z_t ~ q(z_t | y), and the loss
CE(p_out(y | z_1)) + KL(q(z_0 | y) || N(0, I)) + eta/2 SNR'(t) ||uhat(z_t, x, t) - u_y||^2,
with the noise schedule learned (Appendix B).
NoProp-FM (Algorithm 3): z_t = t u_y + (1 - t) z_0 (+ sigma noise), the velocity
v = logits @ W_embed regressed on u_y - z_0, plus CE(p_out(y | z_t + (1 - t) v)) when W_embed
is learned; the prediction is the class whose embedding is nearest to the final z.

Choices the paper leaves open (field names in brackets):

- Learned schedule [gamma0_init, gamma1_init, schedule_width]. SNR(t) = exp(-gamma(t)),
  gamma(t) = gamma0 + (gamma1 - gamma0) (1 - gbar(t)), gbar the normalised output of a
  two-layer network with positive weights (softplus of free parameters, sigmoid hidden units,
  `schedule_width` of them), abar = sigmoid(-gamma). We keep gamma1 > gamma0 by construction
  (gamma1 = gamma0 + softplus(.)), so abar increases with t for *any* parameter values, not
  just at initialisation. The initial end points gamma0 = -4, gamma1 = 4 (abar from 0.018 to
  0.982) are NoProp-DT's schedule ends. SNR'(t) is computed in closed form.
- Time embedding: the transformer's sinusoidal embedding (32 frequencies, sin and cos) of
  1000 t, so [0, 1] spans the range of DDPM's integer steps.
- Optimiser: torch.optim.Adam with weight_decay (L2 added to the gradient), as Table 4 lists
  Adam, not AdamW, for CT and FM; it applies to the schedule parameters too.
- CT inference [inference_steps, default the paper's 1000]: ancestral sampling on the grid
  t_k = k / N with the same Gaussian reverse step as NoProp-DT between consecutive grid
  points, then p_out on z_1. The image branch does not depend on z or t, so its features are
  computed once per image and reused by every step (prototype embeddings still run their
  label CNN at every step).
- FM [sigma, default 0; inference_steps]: the paper writes z_t ~ N(t z_1 + (1 - t) z_0,
  sigma^2) without a value; sigma = 0 is the usual conditional flow matching path. The ODE
  is solved with N explicit Euler steps from t = 0 to 1. p_out is the same linear classifier
  as in DT/CT (same initialisation) and exists only when W_embed is learned (a fixed one-hot
  embedding needs no anchor term).
- Gradients reach W_embed through the sampled z_t [embed_grad_through_z], as in NoProp-DT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, Method, Task
from .nets import ImageBranch
from .noprop import (
    LabelEmbedding,
    NoisedLabelConfig,
    embedding_id,
    kl_to_standard_normal,
    make_classifier,
    predicted_embedding,
    reverse_step_coefficients,
)

TIME_FEATURES = 64


@dataclass
class ContinuousConfig(NoisedLabelConfig):
    """What CT and FM share; Table 4: Adam, lr 1e-3, weight decay 1e-3, 1000 inference steps."""

    inference_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.inference_steps < 1:
            raise ConfigError(f"inference_steps must be >= 1, got {self.inference_steps}")


@dataclass
class NoPropCTConfig(ContinuousConfig):
    eta: float = 1.0
    gamma0_init: float = -4.0  # gamma at t = 1: abar(1) = sigmoid(4) = 0.982
    gamma1_init: float = 4.0  # gamma at t = 0: abar(0) = sigmoid(-4) = 0.018
    schedule_width: int = 64  # hidden units of the monotone network gbar
    schedule_weight_decay: bool = True  # whether weight decay also pulls the schedule's parameters
    sampler: Literal["ancestral", "mean"] = "ancestral"  # inference chain; mean drops its noise

    def validate(self) -> None:
        super().validate()
        if self.eta <= 0:
            raise ConfigError(f"eta must be > 0, got {self.eta}")
        if self.gamma1_init <= self.gamma0_init:
            raise ConfigError("gamma1_init must exceed gamma0_init (SNR must grow with t)")
        if self.schedule_width < 1:
            raise ConfigError(f"schedule_width must be >= 1, got {self.schedule_width}")


@dataclass
class NoPropFMConfig(ContinuousConfig):
    sigma: float = 0.0  # standard deviation of z_t around the straight path
    sampler: Literal["euler", "heun"] = "euler"  # ODE solver at inference

    def validate(self) -> None:
        super().validate()
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")


def time_features(t: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    """Sinusoidal embedding of times t in [0, 1], shape (len(t), dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)


class ContinuousNet(nn.Module):
    """The continuous-time block: logits over classes from image features, z and t."""

    def __init__(self, task: Task, embed: LabelEmbedding, dropout: float) -> None:
        super().__init__()
        shape = task.input_shape
        self.image = ImageBranch(shape, dropout=dropout, batchnorm=False, fast_dropout=True)
        if embed.kind == "prototype":
            self.label = nn.Sequential(
                nn.Unflatten(1, shape),
                ImageBranch(shape, dropout=dropout, batchnorm=False, fast_dropout=True),
            )
        else:
            self.label = nn.Sequential(nn.Linear(embed.dim, 256), nn.ReLU())
        self.time = nn.Sequential(nn.Linear(TIME_FEATURES, 256), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, task.num_classes),
        )

    def forward(self, features: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """`features` = self.image(x), passed in so inference computes it once per image."""
        return self.head(torch.cat([features, self.label(z), self.time(time_features(t))], 1))


class LearnedSchedule(nn.Module):
    """NoProp-CT's learned noise schedule (Appendix B); abar(t) increases with t by construction."""

    def __init__(self, gamma0: float, gamma1: float, width: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width))
        self.b1 = nn.Parameter(torch.randn(width))
        self.w2 = nn.Parameter(torch.randn(width))
        self.gamma0 = nn.Parameter(torch.tensor(gamma0))
        # softplus^-1 of the gap, so that gamma1 = gamma0 + softplus(.) > gamma0 always
        self.gap = nn.Parameter(torch.tensor(math.log(math.expm1(gamma1 - gamma0))))
        # t = 0 and 1, kept on the device: building them per step would copy from the host
        self.register_buffer("ends", torch.tensor([0.0, 1.0]), persistent=False)

    def _hidden(self, t: Tensor) -> Tensor:
        return torch.sigmoid(t[:, None] * F.softplus(self.w1) + self.b1)

    def _g(self, t: Tensor) -> Tensor:
        """Two-layer network with positive weights: strictly increasing in t."""
        return self._hidden(t) @ F.softplus(self.w2)

    def _g_derivative(self, t: Tensor) -> Tensor:
        h = self._hidden(t)
        return (h * (1 - h) * F.softplus(self.w1)) @ F.softplus(self.w2)

    def gamma(self, t: Tensor) -> Tensor:
        g0, g1 = self._g(self.ends)
        gbar = (self._g(t) - g0) / (g1 - g0)
        return self.gamma0 + F.softplus(self.gap) * (1 - gbar)

    def abar(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self.gamma(t))

    def snr_derivative(self, t: Tensor) -> Tensor:
        """d/dt exp(-gamma(t)) = exp(-gamma) * gap * g'(t) / (g(1) - g(0)) > 0."""
        g0, g1 = self._g(self.ends)
        slope = F.softplus(self.gap) * self._g_derivative(t) / (g1 - g0)
        return torch.exp(-self.gamma(t)) * slope


class _Continuous(Method):
    """What CT and FM share: the label embedding and the continuous-time network. Subclasses
    add their own parts, then call `_finish`."""

    family = "noprop"
    samples_at_inference = True  # the chain or the ODE starts from z_0 ~ N(0, I)

    @classmethod
    def network_of(cls, config: ContinuousConfig) -> str:
        """`noprop-continuous-<embedding>`: the continuous-time block, shared by CT and FM.
        bpfree has no backprop method on it (the paper's baseline there is the adjoint
        method), so CT and FM have no backprop twin."""
        return f"noprop-continuous-{embedding_id(config)}"

    def __init__(self, task: Task, config: ContinuousConfig) -> None:
        super().__init__(task, config)
        embed = LabelEmbedding(config.embedding, config.embed_init, config.embed_dim, task,
                               config.embed_scale)
        self.model = nn.ModuleDict({
            "embed": embed,
            "net": ContinuousNet(task, embed, config.dropout),
        })

    def _finish(self) -> None:
        """Move the complete model to the device and build its optimiser."""
        self.model.to(self.device, memory_format=torch.channels_last)  # faster conv and pooling
        groups: list[dict] = [{"params": list(self.model.parameters())}]
        if "schedule" in self.model and not self.config.schedule_weight_decay:
            free = {id(p) for p in self.model["schedule"].parameters()}
            groups = [{"params": [p for p in self.model.parameters() if id(p) not in free]},
                      {"params": list(self.model["schedule"].parameters()), "weight_decay": 0.0}]
        self.optimizers = {
            "adam": self.make_optimizer(
                torch.optim.Adam, groups, lr=self.config.lr, weight_decay=self.config.weight_decay,
            )
        }

    def capturable(self) -> bool:
        return True

    def _noise_source(self, u: Tensor) -> Tensor:
        """u_y as it enters the noisy labels: detached unless W_embed learns through z."""
        return u if self.config.embed_grad_through_z else u.detach()

    def _step(self, loss: Tensor) -> None:
        opt = self.optimizers["adam"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class NoPropCT(_Continuous):
    name = "noprop-ct"
    description = "NoProp continuous time: one network, learned noise schedule (Li et al. 2025)"
    Config = NoPropCTConfig
    presets = {
        "default": {},
        # Training is one network per step; evaluation dominates, so fewer sampler steps.
        "quick": {"inference_steps": 20},
        # The paper names no solver: the noise-free chain (`mean`) is chosen on the validation
        # split (docs/noprop.md, inference steps and solver); `sampler=ancestral` restores the
        # chain the earlier records used.
        "paper": {"eta": 1.0, "lr": 1e-3, "weight_decay": 1e-3, "inference_steps": 1000,
                  "sampler": "mean"},
    }

    def __init__(self, task: Task, config: NoPropCTConfig) -> None:
        super().__init__(task, config)
        self.model["classifier"] = make_classifier(self.model["embed"], config.classifier_init)
        self.model["schedule"] = LearnedSchedule(
            config.gamma0_init, config.gamma1_init, config.schedule_width
        )
        self._finish()

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Algorithm 2's loss on a minibatch and its terms (attached to the graph): per example
        t ~ U(0, 1) and z_t ~ q(z_t | y); CE of p_out on z_1 ~ q(z_1 | y), the KL of
        q(z_0 | y) from N(0, I) at abar(0), and eta / 2 SNR'(t) ||uhat(z_t, x, t) - u_y||^2
        at each example's own t."""
        embed, net, schedule = self.model["embed"], self.model["net"], self.model["schedule"]
        u = embed(y)
        source = self._noise_source(u)
        n = len(x)
        t = torch.rand(n, device=x.device)
        abar = schedule.abar(torch.cat([t, schedule.ends]))
        abar_t, abar0, abar1 = abar[:n, None], abar[n], abar[n + 1]
        z_t = abar_t.sqrt() * source + (1 - abar_t).sqrt() * torch.randn_like(u)
        uhat = predicted_embedding(net(net.image(x), z_t, t), embed.weight)
        weight = schedule.snr_derivative(t)
        denoise = self.config.eta / 2 * (weight * (uhat - u).pow(2).sum(1)).mean()
        z_1 = abar1.sqrt() * source + (1 - abar1).sqrt() * torch.randn_like(u)
        ce = F.cross_entropy(self.model["classifier"](z_1), y)
        kl = kl_to_standard_normal(u, abar0)
        return {"loss": ce + kl + denoise, "ce": ce, "kl": kl, "denoise": denoise}

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        terms = self.losses(x, y)
        self._step(terms["loss"])
        schedule = self.model["schedule"]
        gamma0 = schedule.gamma0.detach()
        return {**{k: v.detach() for k, v in terms.items()}, "gamma0": gamma0.clone(),
                "gamma1": (gamma0 + F.softplus(schedule.gap.detach()))}

    @torch.no_grad()
    def sample_last(self, x: Tensor) -> Tensor:
        """Ancestral sampling of z_1 on the grid t_k = k / N, from z_0 ~ N(0, I)."""
        embed, net = self.model["embed"], self.model["net"]
        steps = self.config.inference_steps
        grid = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
        abar = self.model["schedule"].abar(grid)
        a, b, c = reverse_step_coefficients(abar[:-1], abar[1:])
        c_sqrt = c.sqrt()
        features = net.image(x)
        z = torch.randn(len(x), embed.dim, device=x.device)
        for k in range(steps):
            uhat = predicted_embedding(net(features, z, grid[k].expand(len(x))), embed.weight)
            z = a[k] * uhat + b[k] * z
            if self.config.sampler == "ancestral":
                z = z + c_sqrt[k] * torch.randn_like(z)
        return z

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model["classifier"](self.sample_last(x))


class NoPropFM(_Continuous):
    name = "noprop-fm"
    description = "NoProp flow matching: one network predicts the velocity to the label embedding"
    Config = NoPropFMConfig
    presets = {
        "default": {},
        "quick": {"inference_steps": 20},  # as noprop-ct's quick preset
        "paper": {"lr": 1e-3, "weight_decay": 1e-3, "inference_steps": 1000},
    }

    def __init__(self, task: Task, config: NoPropFMConfig) -> None:
        super().__init__(task, config)
        if self.model["embed"].learned:
            self.model["classifier"] = make_classifier(self.model["embed"], config.classifier_init)
        self._finish()

    def velocity(self, features: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """v = unnormalised logits @ W_embed."""
        return self.model["net"](features, z, t) @ self.model["embed"].weight

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Algorithm 3's loss on a minibatch and its terms (attached to the graph): z_0 ~ N(0, I),
        t ~ U(0, 1), z_t = t u_y + (1 - t) z_0 (+ sigma noise), the velocity regressed on
        u_y - z_0, plus (learned embeddings) CE of p_out on z_t + (1 - t) v."""
        embed, net = self.model["embed"], self.model["net"]
        u = embed(y)
        z_0 = torch.randn_like(u)
        t = torch.rand(len(x), device=x.device)
        z_t = t[:, None] * self._noise_source(u) + (1 - t[:, None]) * z_0
        if self.config.sigma > 0:
            z_t = z_t + self.config.sigma * torch.randn_like(u)
        v = self.velocity(net.image(x), z_t, t)
        flow = (v - (u - z_0)).pow(2).sum(1).mean()
        terms = {"loss": flow, "flow": flow}
        if embed.learned:
            z_1 = z_t + (1 - t[:, None]) * v
            terms["ce"] = F.cross_entropy(self.model["classifier"](z_1), y)
            terms["loss"] = flow + terms["ce"]
        return terms

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        terms = self.losses(x, y)
        self._step(terms["loss"])
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """`inference_steps` Euler (or Heun: two velocity evaluations per step) steps of
        dz/dt = v from z_0 ~ N(0, I); scores are -||z_1 - u_c||^2."""
        weight = self.model["embed"].weight
        steps = self.config.inference_steps
        features = self.model["net"].image(x)
        z = torch.randn(len(x), weight.shape[1], device=x.device)
        for k in range(steps):
            t = torch.full((len(x),), k / steps, device=x.device)
            v = self.velocity(features, z, t)
            if self.config.sampler == "heun":  # trapezoid of the slopes at both ends
                v_end = self.velocity(features, z + v / steps, t + 1 / steps)
                v = (v + v_end) / 2
            z = z + v / steps
        return -torch.cdist(z, weight).pow(2)
