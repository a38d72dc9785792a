"""Target propagation: every layer learns to move towards a target instead of along a gradient.

The output target is a small step down the loss gradient, t_L = h_L - beta * dL/dh_L; hidden
targets are computed from it through learned feedback mappings, and each forward layer then
minimises 0.5 * ||f_l(sg(h_{l-1})) - sg(t_l)||^2 on its own. No error ever flows through a
forward weight matrix, so the only "backward pass" is through the feedback mappings.

- `dtp`, difference target propagation (Lee et al. 2015): a feedback layer g_l per forward
  layer inverts f_l, trained to reconstruct noise-corrupted inputs; targets go down layer by
  layer with the difference correction t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l).
- `ddtp-linear`, direct DTP with linear feedback (Meulemans et al. 2020): one matrix Q_l per
  hidden layer maps the output straight back to it, t_l = h_l + Q_l (t_L - h_L), trained with
  the difference reconstruction loss, whose minimiser makes these approximate Gauss-Newton
  targets (Q_l -> pseudo-inverse of the output's Jacobian with respect to h_l).

Both run on the shared MLP (`methods.nets.MLP`), so they train the very network `backprop
--set arch=mlp` trains. docs/target_prop.md explains the choices and the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, HParams, Method, Task, diagnostic_mode, layer_angles
from .nets import MLP


def _per_layer(spec: str, default: float, count: int, key: str) -> list[float]:
    """Per-layer values from `spec`: empty means `default` everywhere, else `count` floats.

    A comma-separated string (not a tuple) so that `--set key=a,b,c` works from the CLI.
    """
    if not spec:
        return [default] * count
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{key}={spec!r} is not a comma-separated list of numbers") from None
    if len(values) != count or min(values) <= 0:
        raise ConfigError(f"{key} needs {count} positive values (one per layer), got {spec!r}")
    return values


@dataclass
class TargetPropConfig(HParams):
    """Hyperparameters shared by both variants; `lr` and `weight_decay` drive the forward AdamW."""

    # `cnn` is a value only to be rejected with the reason (see validate), so that
    # `--set arch=...` reads the same for every method.
    arch: Literal["cnn", "mlp"] = "mlp"
    width: int = 256  # hidden units, as in backprop's MLP
    depth: int = 2  # hidden layers, as in backprop's MLP
    # Defaults tuned on a validation split of mnist-5k, 2 epochs (docs/target_prop.md).
    lr: float = 1e-3
    beta: float = 0.1  # output target step along the per-sample loss gradient
    feedback_lr: float = 1e-2  # Adam learning rate of the feedback parameters
    noise: float = 0.5  # std of the Gaussian corruption in the reconstruction loss
    feedback_iterations: int = 3  # feedback updates per batch, before the forward update
    feedback_weight_decay: float = 0.0  # L2 on feedback parameters (DRL's damping term)
    layer_lrs: str = ""  # per-layer forward lrs, input layer first ("" = lr everywhere)
    layer_noise: str = ""  # per-feedback-layer noise stds, lowest first ("" = noise everywhere)

    def validate(self) -> None:
        super().validate()
        if self.arch == "cnn":
            raise ConfigError(
                "target propagation runs on arch=mlp only: the shared CNN's BatchNorm couples "
                "samples, its dropout makes layers random and its max-pooling has no inverse "
                "(see docs/target_prop.md)"
            )
        if self.width < 1 or self.depth < 1:
            raise ConfigError(f"width and depth must be >= 1, got {self.width}, {self.depth}")
        if self.beta <= 0 or self.feedback_lr <= 0 or self.noise <= 0:
            raise ConfigError(
                f"beta, feedback_lr and noise must be > 0, got "
                f"{self.beta}, {self.feedback_lr}, {self.noise}"
            )
        if self.feedback_iterations < 1 or self.feedback_weight_decay < 0:
            raise ConfigError(
                "feedback_iterations must be >= 1 and feedback_weight_decay >= 0, got "
                f"{self.feedback_iterations}, {self.feedback_weight_decay}"
            )
        self.forward_lrs()
        self.noise_scales()

    def forward_lrs(self) -> list[float]:
        """The forward learning rate of each of the depth + 1 linear layers."""
        return _per_layer(self.layer_lrs, self.lr, self.depth + 1, "layer_lrs")

    def noise_scales(self) -> list[float]:
        """The corruption std of each of the `depth` feedback mappings, lowest layer first."""
        return _per_layer(self.layer_noise, self.noise, self.depth, "layer_noise")


def _half_sq(a: Tensor, b: Tensor) -> Tensor:
    """0.5 * squared distance summed over units, averaged over the batch (per-sample scale)."""
    return 0.5 * (a - b).pow(2).sum(1).mean()


class TargetPropagation(Method):
    """What the variants share: layer-local forward updates towards targets, and the schedule.

    Subclasses define the feedback mappings (`build_feedback`), how targets travel down
    (`targets`) and what the feedback minimises (`reconstruction_loss`).
    """

    family = "target-propagation"
    Config = TargetPropConfig
    # Every batch: `feedback_iterations` feedback updates, then the forward update (Bartunov
    # et al. 2018's "parallel" training of inverses, not the original code's alternating epochs).
    schedule = "parallel"

    def __init__(self, task: Task, config: TargetPropConfig) -> None:
        super().__init__(task, config)
        net = MLP(task.input_shape, task.num_classes, config.width, config.depth)
        self.model = nn.ModuleDict({"net": net, "feedback": self.build_feedback(net)})
        self.model.to(self.device)
        groups = [
            {"params": layer.parameters(), "lr": lr}
            for layer, lr in zip(net.layers, config.forward_lrs())
        ]
        self.optimizers = {
            "forward": torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay),
            # Adam's coupled L2 (not AdamW's decoupled decay): it stands for a term of the
            # feedback loss itself, DRL's damping lambda * ||Q||^2.
            "feedback": torch.optim.Adam(
                self.model["feedback"].parameters(),
                lr=config.feedback_lr,
                weight_decay=config.feedback_weight_decay,
            ),
        }

    # --- what a variant defines ----------------------------------------------------------
    def build_feedback(self, net: MLP) -> nn.ModuleList:
        raise NotImplementedError

    def targets(self, hs: list[Tensor], output_target: Tensor) -> list[Tensor]:
        """Targets t_1..t_L for the detached activations hs = [h_0, ..., h_L]."""
        raise NotImplementedError

    def reconstruction_loss(self, hs: list[Tensor]) -> Tensor:
        """The feedback objective on detached activations, with fresh noise."""
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model["net"].layers

    def layer(self, index: int, h: Tensor) -> Tensor:
        """f_index (1-based): linear layer `index`, with ReLU unless it is the output layer."""
        out = self.layers[index - 1](h)
        return out if index == len(self.layers) else out.relu()

    def activations(self, x: Tensor) -> list[Tensor]:
        """h_0..h_L, each layer fed the *detached* output of the one below.

        The stop-gradient is what makes learning local: the graph of h_l reaches layer l's
        parameters and nothing else, so a loss on h_l can only ever train layer l.
        """
        hs = [x.flatten(1)]
        for index in range(1, len(self.layers) + 1):
            hs.append(self.layer(index, hs[-1].detach()))
        return hs

    def output_target(self, logits: Tensor, y: Tensor) -> Tensor:
        """t_L = h_L - beta * d(loss of each sample)/d(h_L).

        The per-sample gradient (softmax minus one-hot), not that of the batch mean, so beta
        means the same at every batch size.
        """
        grad = logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return logits - self.config.beta * grad

    def local_loss(self, hs: list[Tensor], targets: list[Tensor]) -> Tensor:
        """Sum over layers of 0.5 * ||h_l - sg(t_l)||^2, with hs from `activations`."""
        return sum(_half_sq(h, t.detach()) for h, t in zip(hs[1:], targets))

    def update_feedback(self, hs: list[Tensor]) -> Tensor:
        """One optimiser step of the feedback parameters; returns the loss it stepped on."""
        loss = self.reconstruction_loss(hs)
        feedback = self.optimizers["feedback"]
        feedback.zero_grad(set_to_none=True)
        loss.backward()
        feedback.step()
        return loss.detach()

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Feedback first (so targets use the freshest inverses), then every layer at once."""
        hs = self.activations(x)
        fixed = [h.detach() for h in hs]
        for _ in range(self.config.feedback_iterations):
            reconstruction = self.update_feedback(fixed)
        with torch.no_grad():
            targets = self.targets(fixed, self.output_target(fixed[-1], y))
        local = self.local_loss(hs, targets)
        forward = self.optimizers["forward"]
        forward.zero_grad(set_to_none=True)
        local.backward()
        forward.step()
        return {
            "loss": F.cross_entropy(fixed[-1], y),
            "local_loss": local.detach(),
            "reconstruction": reconstruction,
        }

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model["net"](x)

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """`angle_update/<layer>`: the gradient of the layer's local loss (its step towards its
        target) against backprop's gradient of the output cross-entropy, on the same batch; the
        angle Meulemans et al. 2020 report. Targets come from the feedback as it stands (a
        training step would first update the feedback on this batch; that step is left out so
        that nothing changes)."""
        net = self.model["net"]
        params = dict(net.named_parameters())
        with diagnostic_mode(self.model):
            hs = self.activations(x)
            fixed = [h.detach() for h in hs]
            with torch.no_grad():
                targets = self.targets(fixed, self.output_target(fixed[-1], y))
            update = torch.autograd.grad(self.local_loss(hs, targets), list(params.values()))
            reference = torch.autograd.grad(F.cross_entropy(net(x), y), list(params.values()))
        angles = layer_angles(dict(zip(params, update)), dict(zip(params, reference)))
        return {f"angle_update/{layer}": a for layer, a in angles.items()}


class DTP(TargetPropagation):
    """Lee et al. 2015: learned layer-wise inverses g_l and the difference correction.

    g_l(h) = V_l h + c_l maps layer l's output back to its input, for l = 2..L (the input
    itself needs no target). Affine rather than Lee's tanh: ReLU layers are affine on their
    active units, so an affine map is the form their local inverse takes.
    """

    name = "dtp"
    description = "Difference target propagation (Lee et al. 2015) on the shared MLP"
    presets = {
        "default": {},
        "quick": {},
        # Meulemans et al. 2020's MNIST values for DTP (supplementary hyperparameter tables; the
        # authors' final_configs/mnist_DTP.py): 5 x 256 tanh, Adam, batch 128, one feedback
        # update per batch. Their lr 6.19e-5 is divided by the target step (normalize_lr) ->
        # 2.82e-4; their step 0.2195 acts on a batch-mean loss, i.e. 0.2195 / 128 = 1.71e-3 per
        # sample. Lee et al.'s own values (authors' conti_dtp.py: RMSprop with momentum, lr
        # 0.0149, on tanh units) are not used: under AdamW on ReLU units they stay at chance.
        "paper": {
            "depth": 5,
            "width": 256,
            "lr": 2.82e-4,
            "beta": 1.71e-3,
            "feedback_lr": 1.96e-3,
            "noise": 0.0837,
            "feedback_iterations": 1,
        },
    }

    def build_feedback(self, net: MLP) -> nn.ModuleList:
        return nn.ModuleList(
            nn.Linear(layer.out_features, layer.in_features) for layer in net.layers[1:]
        )

    def inverse(self, index: int, h: Tensor) -> Tensor:
        """g_index: from the output of layer `index` (2..L) back to its input."""
        return self.model["feedback"][index - 2](h)

    def targets(self, hs: list[Tensor], output_target: Tensor) -> list[Tensor]:
        targets = [output_target]
        for index in range(len(self.layers), 1, -1):
            # Difference correction: g's reconstruction error g(f(h)) - h cancels, so a
            # target equal to the activation stays equal however imperfect g is.
            above = targets[0]
            below = hs[index - 1] + self.inverse(index, above) - self.inverse(index, hs[index])
            targets.insert(0, below)
        return targets

    def reconstruction_loss(self, hs: list[Tensor]) -> Tensor:
        """sum_l 0.5 * ||g_l(f_l(h_{l-1} + e)) - (h_{l-1} + e)||^2, e ~ N(0, s_l^2)."""
        loss = torch.zeros((), device=hs[0].device)
        for index, std in zip(range(2, len(self.layers) + 1), self.config.noise_scales()):
            corrupted = hs[index - 1] + std * torch.randn_like(hs[index - 1])
            with torch.no_grad():
                forward = self.layer(index, corrupted)
            loss = loss + _half_sq(self.inverse(index, forward), corrupted)
        return loss


class DDTPLinear(TargetPropagation):
    """Meulemans et al. 2020: direct linear feedback Q_l from the output to each hidden layer.

    Q_l has no bias: targets and the difference reconstruction loss only ever see Q_l applied
    to differences of outputs, where a bias would cancel and never learn.
    """

    name = "ddtp-linear"
    description = "Direct difference target propagation, linear feedback (Meulemans et al. 2020)"
    presets = {
        "default": {},
        "quick": {},
        # Meulemans et al. 2020, MNIST DDTP-linear (supplementary hyperparameter tables; the
        # authors' final_configs/mnist_DDTPlinear.py): 5 x 256 tanh, Adam, batch 128. Their lr
        # 2.04e-5 is divided by the target step size (normalize_lr) -> 3.34e-4; their step
        # 0.0610 acts on a batch-mean loss, i.e. 0.0610 / 128 = 4.76e-4 per sample. Their extra
        # feedback-only epoch after each epoch is approximated by 2 feedback iterations per
        # batch; their 6 epochs of feedback pre-training are not reproduced.
        "paper": {
            "depth": 5,
            "width": 256,
            "lr": 3.34e-4,
            "beta": 4.76e-4,
            "feedback_lr": 1.64e-4,
            "noise": 0.0908,
            "feedback_weight_decay": 5.84e-7,
            "feedback_iterations": 2,
        },
    }

    def build_feedback(self, net: MLP) -> nn.ModuleList:
        classes = net.layers[-1].out_features
        return nn.ModuleList(
            nn.Linear(classes, layer.out_features, bias=False) for layer in net.layers[:-1]
        )

    def targets(self, hs: list[Tensor], output_target: Tensor) -> list[Tensor]:
        step = output_target - hs[-1]
        return [h + q(step) for h, q in zip(hs[1:-1], self.model["feedback"])] + [output_target]

    def reconstruction_loss(self, hs: list[Tensor]) -> Tensor:
        """Difference reconstruction loss: Q_l must map the output change that a perturbation
        of h_l causes back to that perturbation, (0.5 / s^2) ||Q_l (f(h_l + s e) - h_L) - s e||^2.

        Its minimiser over Q_l is the pseudo-inverse of the Jacobian of h_L with respect to
        h_l (averaged over the batch), which is what makes the targets Gauss-Newton-like.
        """
        loss = torch.zeros((), device=hs[0].device)
        top = len(self.layers)
        for index, (q, std) in enumerate(zip(self.model["feedback"], self.config.noise_scales()), 1):
            shift = std * torch.randn_like(hs[index])
            with torch.no_grad():
                out = hs[index] + shift
                for upper in range(index + 1, top + 1):
                    out = self.layer(upper, out)
            loss = loss + _half_sq(q(out - hs[-1]), shift) / std**2
        return loss
