"""NoProp-DT and its backprop baseline (Li, Teh, Pascanu 2025, arXiv 2503.24322 v2).

NoProp trains T blocks, each on its own, to predict a label embedding u_y = W_embed[y] from
the image x and a noisy label z_{t-1} ~ q(z_{t-1} | y) = N(sqrt(abar) u_y, (1 - abar) I).
No block's output is ever fed into another block during training, so no gradient crosses
blocks; only the shared embedding W_embed and the classifier p_out(y | z_T) receive
gradients from every block. At inference the blocks are chained from z_0 ~ N(0, I) like the
reverse steps of a diffusion model and p_out classifies z_T.

This module holds what the variants share (label embeddings, the cosine schedule, the KL
term, the Gaussian reverse step, the DT block) and registers `noprop-dt` and
`backprop-blocks`; `noprop_continuous` registers `noprop-ct` and `noprop-fm`.

Choices the paper leaves open are made explicitly, each a named hyperparameter where it is a
real alternative, and documented with their reasons and the measurements behind them in
docs/noprop.md ("Choices the paper leaves open"):

- the cosine schedule and its two ends [log_snr_max, abar_0, abar_T]: abar = cos^2(pi tau / 2),
  indexed so that abar increases with t (z_0 noise, z_T label), T + 1 levels evenly spaced in
  tau between the ends;
- noisy labels drawn independently per level, each from its marginal q(z | y);
- gradients into W_embed through the sampled z [embed_grad_through_z];
- the classifier p_out and its initialisation [classifier_init];
- the label embedding, its size, initialisation and scale [embedding, embed_dim, embed_init,
  embed_scale];
- the training order [order, steps_per_block]: every block on every minibatch, or
  Algorithm 1's block by block;
- one AdamW over every parameter (Adam's state is per parameter, so this equals one
  optimiser per block), constant learning rate, no augmentation;
- the inference chain [sampler]: ancestral (the paper's Gaussian reverse steps) or its means;
- how a step's blocks run [blocks]: one at a time (`loop`: one block's activations held for
  backward, the paper's memory claim) or vmapped together (`stacked`, for GPUs).

Memory: in `every-block`, each block's loss is backpropagated and its activations freed before
the next block runs; the noisy labels enter the blocks as detached leaves whose gradients go
through the noising and the shared terms in one last backward. `backprop-blocks` necessarily
holds all T blocks.

`backprop-blocks` is the paper's backprop baseline: the same blocks, embedding and classifier,
chained from z_0 ~ N(0, I) by z_t = (1 - a_t) z_{t-1} + a_t uhat_t(z_{t-1}, x) with
a_t = tanh(w_t) learnable, trained end to end on the cross-entropy alone. The initial
a_t [mix_init, default 0.5] is not given in the paper.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .backprop import cross_entropy_step
from .base import ConfigError, HParams, Method, Task
from .nets import ImageBranch

EmbeddingKind = Literal["one-hot", "learned", "prototype"]
EmbeddingInit = Literal["auto", "random", "orthogonal", "prototype"]


# --- configuration ---------------------------------------------------------------------------


@dataclass
class EmbeddingConfig(HParams):
    """What every NoProp-shaped method shares: label embedding, classifier, dropout, optimiser."""

    embedding: EmbeddingKind = "one-hot"
    embed_dim: int = 20  # `learned` only; one-hot uses the class count, prototype the image size
    embed_init: EmbeddingInit = "auto"
    embed_scale: float = 1.0  # multiplies the initial embedding (one-hot's fixed one too)
    classifier_init: Literal["nearest-embedding", "default"] = "nearest-embedding"
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-3

    def validate(self) -> None:
        super().validate()
        if self.embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not 0 < self.embed_scale < float("inf"):
            raise ConfigError(f"embed_scale must be a finite number > 0, got {self.embed_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embed_init == "prototype" and self.embedding != "prototype":
            raise ConfigError("embed_init=prototype needs embedding=prototype (d = image size)")
        if self.embedding == "one-hot" and self.embed_init != "auto":
            raise ConfigError("one-hot embeddings are fixed: leave embed_init=auto")


@dataclass
class NoisedLabelConfig(EmbeddingConfig):
    """Shared by the NoProp variants, which train on noised label embeddings."""

    embed_grad_through_z: bool = True  # W_embed also learns through the sampled noisy labels


@dataclass
class NoPropDTConfig(NoisedLabelConfig):
    """NoProp-DT (Algorithm 1); defaults are the paper's Table 4 values."""

    T: int = 10
    eta: float = 0.1
    log_snr_max: float = 4.0  # the schedule spans log SNR in [-log_snr_max, log_snr_max]...
    abar_0: float | None = None  # ...unless an end is set: abar at t = 0 (noise end), may be 0
    abar_T: float | None = None  # abar at t = T (label end), must be < 1
    order: Literal["every-block", "block-by-block"] = "every-block"
    steps_per_block: int = 469  # block-by-block only: one MNIST epoch at batch 128
    sampler: Literal["ancestral", "mean"] = "ancestral"  # inference chain; mean drops its noise
    # loop: one block's forward and backward at a time (holds one block's activations);
    # stacked: all blocks as one vmapped computation (fewer, larger kernels; holds all).
    blocks: Literal["loop", "stacked"] = "loop"

    def validate(self) -> None:
        super().validate()
        if self.T < 1:
            raise ConfigError(f"T must be >= 1, got {self.T}")
        if self.eta <= 0:
            raise ConfigError(f"eta must be > 0, got {self.eta}")
        if self.log_snr_max <= 0:
            raise ConfigError(f"log_snr_max must be > 0, got {self.log_snr_max}")
        low, high = schedule_ends(self)
        if not 0.0 <= low < high < 1.0:
            raise ConfigError(f"the schedule needs 0 <= abar_0 < abar_T < 1, got abar_0={low:g}, "
                              f"abar_T={high:g}")
        if self.steps_per_block < 1:
            raise ConfigError(f"steps_per_block must be >= 1, got {self.steps_per_block}")


@dataclass
class BackpropBlocksConfig(EmbeddingConfig):
    """The paper's backprop baseline: NoProp-DT's blocks chained and trained end to end."""

    T: int = 10
    mix_init: float = 0.5  # initial a_t = tanh(w_t)

    def validate(self) -> None:
        super().validate()
        if self.T < 1:
            raise ConfigError(f"T must be >= 1, got {self.T}")
        if not 0.0 < self.mix_init < 1.0:
            raise ConfigError(f"mix_init must be in (0, 1), got {self.mix_init}")


# --- schedule and closed forms -----------------------------------------------------------------


def schedule_ends(config: NoPropDTConfig) -> tuple[float, float]:
    """(abar_0, abar_T): the set ends, else sigmoid(-/+ log_snr_max)."""
    low = 1 / (1 + math.exp(config.log_snr_max)) if config.abar_0 is None else config.abar_0
    high = 1 / (1 + math.exp(-config.log_snr_max)) if config.abar_T is None else config.abar_T
    return low, high


def cosine_schedule(T: int, log_snr_max: float = 4.0, abar_0: float | None = None,
                    abar_T: float | None = None) -> Tensor:
    """abar_0..abar_T (float64), increasing: z_0 is nearly noise, z_T nearly the label.

    abar = cos^2(pi tau / 2); tau runs evenly from the point where abar = abar_0 (t = 0) to
    where abar = abar_T (t = T). The ends default to log SNR = -/+ log_snr_max, i.e.
    abar = sigmoid(-/+ log_snr_max); either can be set on its own (abar_0 = 0 is pure noise).
    """
    # tau where log SNR = -log_snr_max is 1 - tau_low, where it is +log_snr_max, tau_low
    tau_low = 2 / math.pi * math.atan(math.exp(-log_snr_max / 2))
    tau_0 = 1 - tau_low if abar_0 is None else 2 / math.pi * math.acos(math.sqrt(abar_0))
    tau_T = tau_low if abar_T is None else 2 / math.pi * math.acos(math.sqrt(abar_T))
    span = 1 - 2 * tau_low if abar_0 is None and abar_T is None else tau_0 - tau_T
    abar = torch.cos(0.5 * math.pi * (tau_0 - span * torch.arange(T + 1, dtype=torch.float64) / T))
    abar = abar**2
    if abar_0 == 0:
        abar[0] = 0.0  # cos(pi / 2)^2 is 4e-33 in floating point, not 0
    return abar


def snr(abar: Tensor) -> Tensor:
    return abar / (1 - abar)


def reverse_step_coefficients(abar_prev: Tensor, abar_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, c) of p(z_next | z_prev, x) = N(a uhat + b z_prev, c I).

    The Gaussian posterior q(z_next | z_prev, y) with u_y replaced by the prediction uhat; with
    alpha = abar_prev / abar_next these are the paper's a_t, b_t, c_t.
    """
    alpha = abar_prev / abar_next
    a = abar_next.sqrt() * (1 - alpha) / (1 - abar_prev)
    b = alpha.sqrt() * (1 - abar_next) / (1 - abar_prev)
    c = (1 - abar_next) * (1 - alpha) / (1 - abar_prev)
    return a, b, c


def kl_to_standard_normal(u: Tensor, abar0: Tensor | float) -> Tensor:
    """Mean over the batch of KL(N(sqrt(abar0) u, (1 - abar0) I) || N(0, I)), in closed form.

    0.5 (abar0 ||u||^2 - d abar0 - d log(1 - abar0)); it depends on u, so it regularises W_embed.
    """
    abar0 = torch.as_tensor(abar0, dtype=u.dtype, device=u.device)
    d = u.shape[1]
    per_example = abar0 * u.pow(2).sum(1) - d * abar0 - d * torch.log1p(-abar0)
    return 0.5 * per_example.mean()


# --- label embedding ---------------------------------------------------------------------------


def class_prototypes(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Per class, the example with the smallest median distance to the other examples of its
    class (the paper's prototype initialisation), flattened: (num_classes, x[0].numel())."""
    flat = x.flatten(1).float()
    rows = []
    for c in range(num_classes):
        members = flat[y == c]
        if len(members) == 0:
            raise ConfigError(
                f"prototype embeddings need training examples of every class; class {c} has "
                "none in the task's train_sample"
            )
        dist = torch.cdist(members, members)
        dist.fill_diagonal_(float("nan"))  # a member's distance to itself is not "to others"
        typical = dist.nanmedian(1).values if len(members) > 1 else flat.new_zeros(1)
        rows.append(members[typical.argmin()])
    return torch.stack(rows)


def make_classifier(embed: LabelEmbedding, init: str) -> nn.Linear:
    """p_out's linear layer on z. `nearest-embedding` starts it at logits
    -||z - u_c||^2 / (2 s) + const, s = the mean ||u_c||^2, so logit gaps are O(1) at any
    embedding scale (a saturated softmax would give the cross-entropy no gradient)."""
    classifier = nn.Linear(embed.dim, embed.weight.shape[0])
    if init == "nearest-embedding":
        with torch.no_grad():
            norms = embed.weight.pow(2).sum(1)
            classifier.weight.copy_(embed.weight / norms.mean())
            classifier.bias.copy_(-norms / (2 * norms.mean()))
    return classifier


class LabelEmbedding(nn.Module):
    """W_embed (classes x d); `weight` is a parameter unless the embedding is one-hot."""

    def __init__(self, kind: EmbeddingKind, init: EmbeddingInit, dim: int, task: Task,
                 scale: float = 1.0) -> None:
        super().__init__()
        m = task.num_classes
        self.kind = kind
        if kind == "one-hot":
            self.register_buffer("weight", scale * torch.eye(m))
            return
        d = math.prod(task.input_shape) if kind == "prototype" else dim
        if init == "auto":
            init = "prototype" if kind == "prototype" else ("orthogonal" if d >= m else "random")
        if init == "prototype":
            if task.train_sample is None:
                raise ConfigError("embed_init=prototype needs a task with train_sample")
            weight = class_prototypes(*task.train_sample, m)
        elif init == "orthogonal":
            if d < m:
                raise ConfigError(f"orthogonal embeddings need d >= classes ({d} < {m}); use random")
            weight = nn.init.orthogonal_(torch.empty(m, d), gain=math.sqrt(d))
        else:
            weight = torch.randn(m, d)
        self.weight = nn.Parameter(scale * weight.to(task.device))

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def learned(self) -> bool:
        return isinstance(self.weight, nn.Parameter)

    def forward(self, y: Tensor) -> Tensor:
        return self.weight[y]


# --- the DT block (Fig. 5) -------------------------------------------------------------------------


class LabelBranch(nn.Module):
    """h = ReLU(BN(FC(z))); out = h + BN(FC(ReLU(BN(FC(h))))), no activation after the add."""

    def __init__(self, dim: int, width: int = 256) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU())
        self.res = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width), nn.BatchNorm1d(width),
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.inp(z)
        return h + self.res(h)


class DTBlock(nn.Module):
    """One NoProp-DT block: logits over classes from the image and a noisy label.

    Prototype labels are images: they go through their own copy of the image branch.
    """

    def __init__(self, task: Task, embed: LabelEmbedding, dropout: float) -> None:
        super().__init__()
        shape, m = task.input_shape, task.num_classes
        self.image = ImageBranch(shape, dropout=dropout, fast_dropout=True)
        if embed.kind == "prototype":
            self.label = nn.Sequential(
                nn.Unflatten(1, shape), ImageBranch(shape, dropout=dropout, fast_dropout=True)
            )
        else:
            self.label = LabelBranch(embed.dim)
        self.head = nn.Sequential(
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, m),
        )

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.cat([self.image(x), self.label(z)], 1))


def embedding_id(config: EmbeddingConfig) -> str:
    """The label embedding as network ids name it: `one-hot`, `learned<d>` or `prototype`."""
    if config.embedding == "learned":
        return f"learned{config.embed_dim}"
    return config.embedding


def predicted_embedding(logits: Tensor, weight: Tensor) -> Tensor:
    """uhat = softmax(logits) @ W_embed: a convex mix of the class embeddings."""
    return logits.softmax(1) @ weight


class _DTShaped(Method):
    """T DT blocks, a label embedding and a linear classifier on z_T: what NoProp-DT and its
    backprop baseline share, so that the two differ only in how they learn."""

    family = "noprop"
    samples_at_inference = True  # the chain starts from z_0 ~ N(0, I)

    @classmethod
    def network_of(cls, config: EmbeddingConfig) -> str:
        """`noprop-dt-T<T>-<embedding>`: T DT blocks with that label embedding, which NoProp-DT
        and its backprop baseline `backprop-blocks` share (its twin)."""
        return f"noprop-dt-T{config.T}-{embedding_id(config)}"

    def _build(self, task: Task, config: EmbeddingConfig, T: int) -> None:
        embed = LabelEmbedding(config.embedding, config.embed_init, config.embed_dim, task,
                               config.embed_scale)
        self.model = nn.ModuleDict({
            "embed": embed,
            "blocks": nn.ModuleList(DTBlock(task, embed, config.dropout) for _ in range(T)),
            "classifier": make_classifier(embed, config.classifier_init),
        }).to(self.device, memory_format=torch.channels_last)

    def _make_optimizer(self) -> None:
        self.optimizers = {
            "adamw": self.make_optimizer(
                torch.optim.AdamW, self.model.parameters(), lr=self.config.lr,
                weight_decay=self.config.weight_decay,
            )
        }

    def _uhat(self, t: int, x: Tensor, z: Tensor) -> Tensor:
        """Block t's (1-based) prediction of the label embedding."""
        return predicted_embedding(self.model["blocks"][t - 1](x, z), self.model["embed"].weight)


class NoPropDT(_DTShaped):
    name = "noprop-dt"
    description = "NoProp discrete time: T blocks each trained alone to denoise the label (Li et al. 2025)"
    Config = NoPropDTConfig
    presets = {
        "default": {},
        "quick": {"T": 3},  # 3 blocks instead of 10: sized for the quick suite (docs/noprop.md)
        # abar_0 = 0: z_0 pure noise, as at test time; chosen on a validation split over the
        # schedule's default low end, which leaks a prototype label into z_0 (docs/noprop.md).
        "paper": {"T": 10, "eta": 0.1, "lr": 1e-3, "weight_decay": 1e-3, "abar_0": 0.0},
    }

    def __init__(self, task: Task, config: NoPropDTConfig) -> None:
        super().__init__(task, config)
        self._build(task, config, config.T)
        abar = cosine_schedule(config.T, config.log_snr_max, *schedule_ends(config))
        a, b, c = reverse_step_coefficients(abar[:-1], abar[1:])
        as_f32 = lambda v: v.to(torch.float32).to(self.device)  # noqa: E731
        self.abar = as_f32(abar)
        # Block t's L2 weight T eta / 2 (SNR(t) - SNR(t-1)), index t - 1.
        self.l2_weight = as_f32(config.T * config.eta / 2 * snr(abar).diff())
        self.step_a, self.step_b, self.step_c_sqrt = as_f32(a), as_f32(b), as_f32(c.sqrt())
        self.steps_done = 0  # block-by-block steps taken: picks the block; saved with the state
        self._make_optimizer()

    # --- the loss, in pieces that the efficient step and the tests share ----------------------
    def noisy_labels(self, u: Tensor) -> Tensor:
        """z_0..z_T, shape (T + 1, B, d), each level drawn independently from q(z_t | y)."""
        scale = self.abar.sqrt()[:, None, None]
        noise = torch.randn((len(self.abar), *u.shape), device=u.device, dtype=u.dtype)
        return scale * u + (1 - self.abar).sqrt()[:, None, None] * noise

    def denoise_loss(self, t: int, x: Tensor, z_prev: Tensor, u: Tensor) -> Tensor:
        """Block t's term T eta / 2 (SNR(t) - SNR(t-1)) mean_i ||uhat_t(z_{t-1}, x) - u_y||^2."""
        err = self._uhat(t, x, z_prev) - u
        return self.l2_weight[t - 1] * err.pow(2).sum(1).mean()

    def shared_loss(self, z_last: Tensor, u: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy of p_out on z_T, KL(q(z_0 | y) || N(0, I))): in every block's L_t."""
        ce = F.cross_entropy(self.model["classifier"](z_last), y)
        return ce, kl_to_standard_normal(u, self.abar[0])

    def block_loss(self, t: int, x: Tensor, y: Tensor) -> Tensor:
        """The paper's L_t for one minibatch, as one graph (for tests and inspection)."""
        u = self.model["embed"](y)
        z = self.noisy_labels(u if self.config.embed_grad_through_z else u.detach())
        ce, kl = self.shared_loss(z[-1], u, y)
        return ce + kl + self.denoise_loss(t, x, z[t - 1], u)

    def stacked_denoise_losses(self, x: Tensor, z_leaf: Tensor, u_leaf: Tensor,
                               blocks: Sequence[int]) -> Tensor:
        """The L2 terms of `blocks` in one computation (`blocks=stacked`): their parameters
        stacked along a new leading dimension and one block's forward vmapped over it, so each
        layer is one batched kernel (a grouped convolution, a batched matrix product) instead
        of one per block. The sum of these terms has exactly the loop's gradients, since no
        term depends on another block's parameters; BatchNorm statistics are per block as
        before, and dropout masks are drawn independently per block. The price is memory: all
        blocks' activations are held for backward at once, as in end-to-end backprop."""
        modules = [self.model["blocks"][t - 1] for t in blocks]
        params = {name: torch.stack([dict(m.named_parameters())[name] for m in modules])
                  for name, _ in modules[0].named_parameters()}
        buffers = {name: torch.stack([dict(m.named_buffers())[name] for m in modules])
                   for name, _ in modules[0].named_buffers()}
        template = self._block_template

        def one_block(p: dict[str, Tensor], b: dict[str, Tensor], z: Tensor) -> Tensor:
            return functional_call(template, {**p, **b}, (x, z))

        first, last = blocks[0], blocks[-1]
        if list(blocks) != list(range(first, last + 1)):
            raise ValueError(f"stacked blocks must be consecutive, got {list(blocks)}")
        # Slices with host integers, not an index tensor: building one would copy from the host.
        logits = vmap(one_block, randomness="different")(params, buffers, z_leaf[first - 1:last])
        uhat = logits.softmax(-1) @ self.model["embed"].weight
        err = (uhat - u_leaf).pow(2).sum(-1).mean(-1)
        for name, stacked in buffers.items():  # BatchNorm's running statistics, back per block
            torch._foreach_copy_([dict(m.named_buffers())[name] for m in modules],
                                 list(stacked.unbind()))
        return self.l2_weight[first - 1:last] * err

    @property
    def _block_template(self) -> nn.Module:
        """A parameterless (meta-device) copy of one block for `functional_call`."""
        if not hasattr(self, "_template"):
            self._template = copy.deepcopy(self.model["blocks"][0]).to("meta")
        return self._template

    def backward_blocks(self, x: Tensor, y: Tensor, blocks: Sequence[int]) -> dict[str, Tensor]:
        """Accumulate the gradients of sum_{t in blocks} L_t, one block's graph at a time.

        Each block's L2 term is backpropagated as soon as it is built, so only one block's
        activations are ever held; the noisy labels and u_y enter the blocks as detached
        leaves whose gradients are then sent, with the shared terms (weighted by the number of
        blocks, as they appear once in every L_t), through the embedding in one last backward.
        """
        embed = self.model["embed"]
        u = embed(y)
        through_z = embed.learned and self.config.embed_grad_through_z
        z = self.noisy_labels(u if through_z else u.detach())
        z_leaf = z.detach().requires_grad_(through_z)
        u_leaf = u.detach().requires_grad_(embed.learned)
        if self.config.blocks == "stacked" and len(blocks) > 1:
            losses = self.stacked_denoise_losses(x, z_leaf, u_leaf, blocks)
            losses.sum().backward()
            denoise = list(losses.detach().unbind())
        else:
            denoise = []
            for t in blocks:
                loss = self.denoise_loss(t, x, z_leaf[t - 1], u_leaf)
                loss.backward()
                denoise.append(loss.detach())
        ce, kl = self.shared_loss(z[-1], u, y)
        roots, grads = [len(blocks) * (ce + kl)], [None]
        if through_z:
            roots.append(z)
            grads.append(z_leaf.grad)
        if embed.learned:
            roots.append(u)
            grads.append(u_leaf.grad)
        torch.autograd.backward(roots, grads)
        mean_denoise = torch.stack(denoise).mean()
        return {
            "loss": (ce + kl + mean_denoise).detach(),
            "ce": ce.detach(),
            "kl": kl.detach(),
            "denoise": mean_denoise,
        }

    # --- the Method interface --------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        config: NoPropDTConfig = self.config
        if config.order == "every-block":
            blocks = range(1, config.T + 1)
        else:
            blocks = [self.steps_done // config.steps_per_block % config.T + 1]
        opt = self.optimizers["adamw"]
        opt.zero_grad(set_to_none=True)
        stats = self.backward_blocks(x, y, blocks)
        opt.step()
        if config.order == "block-by-block":
            self.steps_done += 1
        return stats

    def capturable(self) -> bool:
        """Every-block steps launch the same kernels every time; block-by-block steps pick
        their block from a host-side counter, so they run eagerly."""
        return self.config.order == "every-block"

    @torch.no_grad()
    def sample_last(self, x: Tensor) -> Tensor:
        """Inference chain: z_0 ~ N(0, I), then z_t ~ p(z_t | z_{t-1}, x) for t = 1..T
        (`sampler=mean`: z_t = the mean of that step, no noise after z_0)."""
        weight = self.model["embed"].weight
        z = torch.randn(len(x), weight.shape[1], device=x.device)
        for t in range(1, self.config.T + 1):
            uhat = self._uhat(t, x, z)
            z = self.step_a[t - 1] * uhat + self.step_b[t - 1] * z
            if self.config.sampler == "ancestral":
                z = z + self.step_c_sqrt[t - 1] * torch.randn_like(z)
        return z

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model["classifier"](self.sample_last(x))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps_done = state["steps_done"]


class BackpropBlocks(_DTShaped):
    name = "backprop-blocks"
    description = "NoProp paper's backprop baseline: the DT blocks chained and trained end to end"
    Config = BackpropBlocksConfig
    presets = {
        "default": {},
        "quick": {"T": 3},  # as noprop-dt's quick preset, so the two stay comparable
        "paper": {"T": 10, "lr": 1e-3, "weight_decay": 1e-3},
    }

    def __init__(self, task: Task, config: BackpropBlocksConfig) -> None:
        super().__init__(task, config)
        self._build(task, config, config.T)
        # w_t, with a_t = tanh(w_t) the weight of block t's prediction in z_t.
        self.model.register_parameter(
            "mix", nn.Parameter(torch.full((config.T,), math.atanh(config.mix_init), device=self.device))
        )
        self._make_optimizer()

    def forward(self, x: Tensor) -> Tensor:
        """Logits of p_out on z_T, chained from z_0 ~ N(0, I) through every block."""
        mix = torch.tanh(self.model.mix)
        z = torch.randn(len(x), self.model["embed"].dim, device=x.device)
        for t in range(1, self.config.T + 1):
            a = mix[t - 1]
            z = (1 - a) * z + a * self._uhat(t, x, z)
        return self.model["classifier"](z)

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return cross_entropy_step(self.forward(x), y, self.optimizers["adamw"])

    def capturable(self) -> bool:
        return True

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x)
