"""Forward-gradient baselines: training with forward-mode derivatives only, no backward pass.

A forward gradient is a directional derivative times its direction. For a random tangent t with
E[t t^T] = I, the JVP gives d = grad L . t in one forward run, and d t is an unbiased estimate of
grad L; averaging K tangents divides its variance by K. The three methods differ in *where* the
tangent lives:

- `fg-w` (Baydin et al. 2022): over all weights. One JVP through the whole net; the variance grows
  with the number of parameters.
- `fg-a` (Ren et al. 2023): over every weight layer's pre-activations, independently per example.
  The per-example JVP gives the activity estimate d_n u_n; each layer turns it into a weight
  estimate directly (outer product with the layer input, `conv2d_weight` for convolutions). The
  variance grows with the number of units, not weights. As in Ren et al. (Sec. 3.6 and their
  code), a unit whose following ReLU is inactive is not perturbed (its true gradient is zero,
  so the estimate stays unbiased at about half the variance; `relu_mask`), and the classifier
  layer that produces a loss's logits gets the exact gradient of that loss, computed locally
  from the logits' error (`head_grad`).
- `lg-fg-a` (Ren et al. 2023): `fg-a` on blocks that each end in a small auxiliary classifier with
  its own loss; a block's input is a constant (stop-gradient), so its estimate involves only its
  own units and parameters.

Every training step runs under `torch.no_grad()`: tangents are propagated by `torch.func.jvp`
(forward mode), vmapped over tangents, and nothing ever builds a reverse-mode graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .base import ConfigError, HParams, Method, Task, diagnostic_mode, layer_angles
from .nets import build_net, flat_steps


@dataclass
class ForwardGradientConfig(HParams):
    """Shared by the three variants: what to perturb is the method, the rest are these knobs."""

    arch: Literal["mlp", "cnn"] = "mlp"  # mlp by default: FG-W's variance grows with #params
    width: int = 256  # MLP hidden units (ignored by cnn)
    depth: int = 2  # MLP hidden layers (ignored by cnn)
    tangents: int = 1  # K random directions per step, averaged: variance ~ 1/K, tangent work ~ K
    tangent_chunk: int = 0  # tangents per vmapped JVP call; 0 = all K at once (fastest, most memory)
    distribution: Literal["normal", "rademacher"] = "normal"  # both have E[t t^T] = I: unbiased
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.width < 1 or self.depth < 0:
            raise ConfigError(f"width must be >= 1 and depth >= 0, got {self.width}, {self.depth}")
        if self.tangents < 1:
            raise ConfigError(f"tangents must be >= 1, got {self.tangents}")
        if self.tangent_chunk < 0:
            raise ConfigError(f"tangent_chunk must be >= 0 (0 = all tangents), got {self.tangent_chunk}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")


def _sample(shape: tuple[int, ...], distribution: str, device: torch.device) -> Tensor:
    """Random tangents with identity second moment, so that d * t is unbiased."""
    if distribution == "normal":
        return torch.randn(shape, device=device)
    return torch.empty(shape, device=device).bernoulli_(0.5).mul_(2).sub_(1)


def _jvp_chunks(
    fn: Callable[[dict[str, Tensor], dict[str, Tensor]], tuple[Tensor, Any]],
    primals: dict[str, Tensor],
    buffers: dict[str, Tensor],
    config: ForwardGradientConfig,
) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor, Any]]:
    """JVPs of `fn` at `primals` along `config.tangents` random tangents, vmapped in chunks.

    Yields, per chunk of k tangents: the tangents (k leading), the primal loss, its directional
    derivatives (k leading) and `fn`'s aux output (primal values, no tangent dimension). Chunks
    draw their own dropout masks, so callers combine each chunk with its own primal values.

    `fn(primals, buffers) -> (loss, aux)` may update `buffers` in place (BatchNorm running
    statistics). It gets fresh copies on every call: a transformed function may not mutate
    captured tensors, and K tangents must not apply K momentum updates. The first chunk's copies
    are written back, so running statistics advance exactly once per step, from the primal
    forward, whatever K and the chunk size.
    """
    def along(tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor, Any]:
        def with_copies(at: dict[str, Tensor]) -> tuple[Tensor, Any]:
            copies = {name: b.clone() for name, b in buffers.items()}
            loss, aux = fn(at, copies)
            return loss, (aux, copies)

        return jvp(with_copies, (primals,), (tangent,), has_aux=True)

    size = config.tangent_chunk or config.tangents
    for start in range(0, config.tangents, size):
        k = min(size, config.tangents - start)
        tangents = {
            name: _sample((k, *p.shape), config.distribution, p.device) for name, p in primals.items()
        }
        # randomness="same": every tangent sees the same dropout mask, i.e. the same function;
        # the primal outputs are then the same for all tangents and come back unbatched.
        loss, slope, (aux, copies) = vmap(along, out_dims=(None, 0, None), randomness="same")(
            tangents
        )
        if start == 0:
            for name, b in buffers.items():
                b.copy_(copies[name])
        yield tangents, loss, slope, aux




class _ForwardGradient(Method):
    """Estimate every parameter's gradient without a backward pass, then step the optimiser."""

    family = "forward-gradient"
    Config = ForwardGradientConfig
    # `default` is one tangent per step, the papers' estimator. `quick` (MLP, the default arch)
    # averages more tangents, since the quick suite allows only 64 steps (2 epochs of mnist-5k):
    # K and lr were picked on mnist-5k for accuracy within its ~15 s budget (docs/forward_gradient.md).
    # No `paper` preset: both papers' MNIST runs use other nets (Ren et al.: LocalMixer with layer
    # norm, warm-up + cosine schedule) and we could not verify their rates for an MLP; their released
    # ImageNet optimiser (SGD, momentum 0.9, lr 0.05) diverges on this unnormalised MLP.

    def __init__(self, task: Task, config: ForwardGradientConfig) -> None:
        super().__init__(task, config)
        self.net = build_net(
            config.arch, task.input_shape, task.num_classes, config.width, config.depth
        ).to(self.device)
        self.model = self._build_model(task)
        params = self.model.parameters()
        if config.optimizer == "sgd":
            opt = self.make_optimizer(torch.optim.SGD, params, lr=config.lr,
                                      momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
            opt = self.make_optimizer(cls, params, lr=config.lr, weight_decay=config.weight_decay)
        self.optimizers = {config.optimizer: opt}

    def capturable(self) -> bool:
        """The JVPs, the estimates and the optimiser step are the same kernels every step."""
        return True

    def _build_model(self, task: Task) -> nn.Module:
        """`self.net` plus whatever else the method trains."""
        return self.net

    def estimate(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Gradient estimates keyed by `self.model` parameter name, and detached diagnostics."""
        raise NotImplementedError

    @torch.no_grad()
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        grads, logs = self.estimate(x, y)
        for name, p in self.model.named_parameters():
            p.grad = grads[name]
        self.optimizers[self.config.optimizer].step()
        return logs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def reference_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss whose gradient `estimate` is an unbiased estimate of, built with autograd:
        the network's cross-entropy (local-greedy FG: the sum of the blocks' losses)."""
        return F.cross_entropy(self.net(x), y)

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """`angle_update/<layer>`: this step's forward-gradient estimate against the true
        gradient of the same loss, by reverse mode, on the same batch (dropout off, as for every
        method's diagnostics; see `methods.base.diagnostic_mode`)."""
        params = dict(self.model.named_parameters())
        with diagnostic_mode(self.model):
            with torch.no_grad():
                estimate, _ = self.estimate(x, y)
            reference = torch.autograd.grad(self.reference_loss(x, y), list(params.values()))
        angles = layer_angles(estimate, dict(zip(params, reference)))
        return {f"angle_update/{layer.removeprefix('net.')}": a for layer, a in angles.items()}


class WeightPerturbedFG(_ForwardGradient):
    name = "fg-w"
    description = "Forward gradient, weight perturbation (Baydin et al. 2022): JVP along random weight tangents"
    presets = {"default": {}, "quick": {"tangents": 32, "lr": 3e-3}}

    def estimate(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {name: p.detach() for name, p in self.net.named_parameters()}

        def loss(p: dict[str, Tensor], buffers: dict[str, Tensor]) -> tuple[Tensor, tuple]:
            return F.cross_entropy(functional_call(self.net, {**p, **buffers}, (x,)), y), ()

        total = {name: torch.zeros_like(p) for name, p in params.items()}
        values = []
        for tangents, value, slope, _ in _jvp_chunks(
            loss, params, dict(self.net.named_buffers()), self.config
        ):
            values.append(value)
            for name, t in tangents.items():
                total[name] += torch.tensordot(slope, t, dims=1)
        grads = {name: g / self.config.tangents for name, g in total.items()}
        return grads, {"loss": torch.stack(values).mean()}


# --- activity perturbation ------------------------------------------------------------------
SITES = (nn.Linear, nn.Conv2d, _BatchNorm)  # layers whose outputs are perturbed, and that learn


@torch.no_grad()
def _output_shapes(
    steps: list[nn.Module], input_shape: tuple[int, ...], device: torch.device
) -> list[torch.Size]:
    """Per-example output shape of every step; eval mode so no running statistic moves."""
    modes = [m.training for m in steps]
    x = torch.zeros(2, *input_shape, device=device)
    shapes = []
    for step in steps:
        step.eval()
        x = step(x)
        shapes.append(x.shape[1:])
    for step, mode in zip(steps, modes):
        step.train(mode)
    return shapes


class _Block(nn.Module):
    """Body steps then head steps, adding `noise[i]` to the output of every site step i.

    Returns the head's logits, the input of every site step (for its local weight estimate),
    the body's output (what the next block receives, as a constant) and the ReLU masks of the
    perturbed sites that have one (with `mask`, below).

    With `mask`, a perturbation at a site whose output goes straight into a ReLU is multiplied
    by that ReLU's activity pattern (1 where the unit is active, from the unperturbed primal
    values): the loss does not depend on an inactive unit's pre-activation (ReLU's derivative
    there is 0, also at exactly 0, as in autograd), so its perturbation adds only noise.
    """

    def __init__(
        self,
        body: list[nn.Module],
        head: list[nn.Module],
        input_shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        super().__init__()
        self.steps = nn.ModuleList(body + head)
        self.body_len = len(body)
        shapes = _output_shapes(list(self.steps), input_shape, device)
        self.site_shapes = {
            str(i): shapes[i] for i, step in enumerate(self.steps) if isinstance(step, SITES)
        }
        # Sites whose output is a ReLU's input: their perturbation can be masked.
        steps = list(self.steps)
        self.relu_sites = {
            site for site in self.site_shapes
            if int(site) + 1 < len(steps) and isinstance(steps[int(site) + 1], nn.ReLU)
        }
        # The step that produces the logits, when it is a linear classifier layer.
        last = str(len(steps) - 1)
        self.readout = last if isinstance(steps[-1], nn.Linear) else None

    def forward(
        self, x: Tensor, noise: dict[str, Tensor], mask: bool = False
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
        inputs, masks, out = {}, {}, x
        for i, step in enumerate(self.steps):
            site = str(i)
            if site in self.site_shapes:
                inputs[site] = x
            x = step(x)
            if site in noise:
                if mask and site in self.relu_sites:
                    masks[site] = (x > 0).to(x.dtype)  # of the primal: noise is zero there
                    x = x + noise[site] * masks[site]
                else:
                    x = x + noise[site]
            if i + 1 == self.body_len:
                out = x
        return x, inputs, out, masks

    def coupled(self, site: str) -> bool:
        """Whether a BatchNorm in training mode after this site mixes examples.

        Then example n's loss depends on other examples' perturbations, so d_n u_n is biased; the
        batch's total directional derivative times u_n stays unbiased (at higher variance).
        """
        return any(
            isinstance(s, _BatchNorm) and s.training for s in self.steps[int(site) + 1 :]
        )


def _layer_estimates(layer: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """A layer's weight estimates from its input `a` and the estimate `g` of dL/d(its output).

    The local parameter Jacobian applied directly: no autograd involved.
    """
    if isinstance(layer, nn.Linear):
        flat_g = g.flatten(0, -2)
        est = {"weight": flat_g.T @ a.flatten(0, -2), "bias": flat_g.sum(0)}
    elif isinstance(layer, nn.Conv2d):
        weight = torch.nn.grad.conv2d_weight(
            a, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation, layer.groups
        )
        est = {"weight": weight, "bias": g.sum((0, 2, 3))}
    else:  # BatchNorm: output = weight * normalised input + bias
        dims = [d for d in range(g.dim()) if d != 1]
        stats = (None, None) if layer.training else (layer.running_mean, layer.running_var)
        x_hat = F.batch_norm(a, *stats, training=layer.training, eps=layer.eps)
        est = {"weight": (g * x_hat).sum(dims), "bias": g.sum(dims)}
    return {k: v for k, v in est.items() if getattr(layer, k, None) is not None}


def _readout_gradient(logits: Tensor, y: Tensor) -> Tensor:
    """d(mean cross-entropy)/d(logits) = (softmax(logits) - onehot(y)) / N, in closed form."""
    target = torch.zeros_like(logits).scatter_(1, y[:, None], 1.0)
    return (logits.softmax(1) - target) / len(y)


def _block_estimates(
    block: _Block, x: Tensor, y: Tensor, config: ForwardGradientConfig, mask: bool = False,
    exact_readout: bool = False,
) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """(parameter, estimate) for every parameter of `block`, its mean loss and its output.

    `x` is a constant here: no tangent reaches the block from outside, which is the
    stop-gradient of local-greedy learning (and, for the whole net as one block, plain FG-A).
    `mask`: ReLU-masked perturbations (`_Block`). `exact_readout`: the layer producing the
    logits is not perturbed; it gets the exact gradient of the block's loss, which needs only
    its input and the logits' error (no backward pass through anything).
    """
    n = len(y)
    readout = block.readout if exact_readout else None

    def per_example_loss(noise: dict[str, Tensor], buffers: dict[str, Tensor]) -> tuple[Tensor, Any]:
        logits, inputs, out, masks = functional_call(block, buffers, (x, noise, mask))
        # Scaled so that the per-example losses sum to the batch-mean loss.
        return F.cross_entropy(logits, y, reduction="none") / n, (inputs, out, masks, logits)

    zeros = {site: x.new_zeros(n, *shape) for site, shape in block.site_shapes.items()
             if site != readout}
    if not zeros:  # nothing to perturb (a linear classifier on its own): the exact gradient
        logits, inputs, out, _ = block(x, {})
        loss = F.cross_entropy(logits, y)
        layer = block.steps[int(readout)]
        pairs = [(getattr(layer, key), est) for key, est in
                 _layer_estimates(layer, inputs[readout], _readout_gradient(logits, y)).items()]
        return pairs, loss, out
    sums: dict[tuple[str, str], Tensor] = {}  # (site, parameter name) -> sum over tangents
    losses, outs = [], []
    for tangents, loss, slope, (inputs, out, masks, logits) in _jvp_chunks(
        per_example_loss, zeros, dict(block.named_buffers()), config
    ):
        losses.append(loss.sum())
        outs.append(out)
        total = slope.sum(1, keepdim=True).expand_as(slope)
        for site, u in tangents.items():
            coeff = total if block.coupled(site) else slope
            activity = torch.einsum("kn,kn...->n...", coeff, u)
            if site in masks:  # the tangent that was applied is u * mask
                activity = activity * masks[site]
            for key, est in _layer_estimates(block.steps[int(site)], inputs[site], activity).items():
                sums[site, key] = est + sums.get((site, key), 0)
        if readout is not None:  # exact, on this chunk's function (its dropout masks)
            k = slope.shape[0]
            layer = block.steps[int(readout)]
            for key, est in _layer_estimates(layer, inputs[readout],
                                             _readout_gradient(logits, y)).items():
                sums[readout, key] = k * est + sums.get((readout, key), 0)
    pairs = [
        (getattr(block.steps[int(site)], key), est / config.tangents)
        for (site, key), est in sums.items()
    ]
    return pairs, torch.stack(losses).mean(), outs[0]


@dataclass
class ActivityConfig(ForwardGradientConfig):
    """As `ForwardGradientConfig`, with a smaller default lr: with one tangent per step, AdamW
    at 1e-3 was unstable on MNIST (the runs behind the choice: docs/forward_gradient.md).

    The two estimator options follow Ren et al. 2023 by default: `relu_mask` (Sec. 3.6 and
    their code) perturbs only units whose following ReLU is active; `head_grad=exact` (their
    code) trains every auxiliary head and the network's output layer with the exact gradient
    of its own loss. Turn them off for ablations (docs/forward_gradient.md)."""

    lr: float = 3e-4
    relu_mask: bool = True  # false: perturb every unit, inactive ReLUs too (unbiased, ~2x variance)
    # exact: the layers producing logits (heads, readout) get their exact local gradient;
    # forward: they are perturbed and estimated like every other layer
    head_grad: Literal["exact", "forward"] = "exact"


class _ActivityPerturbedFG(_ForwardGradient):
    """FG-A on a list of blocks; `local` decides whether the net is cut into greedy blocks."""

    Config = ActivityConfig
    local: ClassVar[bool] = False

    def _build_model(self, task: Task) -> nn.Module:
        """Cut the net into blocks; the auxiliary heads are trained too, so they join the model."""
        steps = flat_steps(self.net)
        weights = [i for i, s in enumerate(steps) if isinstance(s, (nn.Linear, nn.Conv2d))]
        # One weight layer per block, except that the last hidden layer and the output layer
        # share the last block, whose loss is the network's own.
        starts = [0] + (weights[1:-1] if self.local else [])
        cuts = list(zip(starts, starts[1:] + [len(steps)]))
        shapes = _output_shapes(steps, task.input_shape, self.device)
        heads = nn.ModuleList(
            nn.Sequential(*self._aux_head(shapes[end - 1], task.num_classes)) for _, end in cuts[:-1]
        ).to(self.device)
        model = nn.ModuleDict({"net": self.net, "heads": heads})
        self.blocks = [
            _Block(steps[a:b], list(head), task.input_shape if a == 0 else shapes[a - 1], self.device)
            for (a, b), head in zip(cuts, [*heads, nn.Sequential()])
        ]
        self._names = {p: name for name, p in model.named_parameters()}
        return model

    @staticmethod
    def _aux_head(shape: torch.Size, num_classes: int) -> list[nn.Module]:
        """A small linear classifier on a block's output (spatially averaged for feature maps)."""
        if len(shape) == 3:
            return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], num_classes)]
        return [nn.Linear(shape[0], num_classes)]

    def reference_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Sum of the blocks' losses, each block on the detached output of the one below: a
        block's parameters get exactly the gradient of their own loss, which is what the
        block's estimate is unbiased for (for `fg-a`, one block: the network's loss)."""
        total, h = torch.zeros((), device=x.device), x
        for block in self.blocks:
            logits, _, h, _ = block(h.detach(), {})
            total = total + F.cross_entropy(logits, y)
        return total

    def estimate(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        grads, losses, h = {}, [], x
        config = self.config
        for block in self.blocks:
            pairs, loss, h = _block_estimates(block, h, y, config, config.relu_mask,
                                              config.head_grad == "exact")
            grads.update((self._names[p], est) for p, est in pairs)
            losses.append(loss)
        logs = {"loss": losses[-1]}
        if len(losses) > 1:
            logs["aux_loss"] = torch.stack(losses[:-1]).mean()
        return grads, logs


class ActivityPerturbedFG(_ActivityPerturbedFG):
    name = "fg-a"
    description = "Forward gradient, activity perturbation (Ren et al. 2023): perturbed pre-activations, local weight estimates"
    presets = {"default": {}, "quick": {"tangents": 64, "lr": 1e-3}}


class LocalGreedyFG(_ActivityPerturbedFG):
    name = "lg-fg-a"
    description = "Local-greedy FG-A (Ren et al. 2023): per-block auxiliary heads and losses, stop-gradient between blocks"
    presets = {"default": {}, "quick": {"tangents": 64, "lr": 1e-3}}
    local = True
