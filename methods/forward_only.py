"""Forward-only learning: two forward passes instead of a forward and a backward pass.

- `ff`, Forward-Forward (Hinton 2022, "The Forward-Forward Algorithm: Some Preliminary
  Investigations", the supervised MNIST example). The label is written into the first
  `num_classes` input values. Every hidden layer has its own objective: a high *goodness*
  (its summed squared ReLU activities) for positive data (the image with its true label) and
  a low one for negative data (the same image with a wrong label), through a logistic of the
  goodness minus a threshold. Each layer passes on only the *direction* of its activity
  (root-mean-square normalised), and its input is detached: no gradient ever crosses a layer.
  A prediction runs the net once per candidate label and takes the label with the largest
  goodness accumulated over the layers, so it costs `num_classes` forward passes.
- `pepita` (Dellaferrera & Kreiman, ICML 2022, "Error-driven Input Modulation: Solving the
  Credit Assignment Problem without a Backward Pass"). A standard forward pass gives the
  error e = softmax(output) - onehot(y); a second forward pass runs on the input modulated
  by the error, x + F e, through a fixed random matrix F. Each hidden layer moves by the
  difference of its activities between the two passes times its modulated input, the output
  layer by the modulated pass's error times its modulated input. No backward pass, no
  transport of weights, no autograd at all.

Both run on the fully connected shape of `methods.nets.MLP` (`width`, `depth`), trained on
their own rule. docs/forward_only.md gives each choice the papers leave open, with its source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, HParams, Method, Task
from .nets import MLP

CNN_REASON = (
    "runs on arch=mlp only: neither paper's fully connected rule maps onto the shared CNN "
    "(BatchNorm couples examples, dropout differs between passes); see docs/forward_only.md"
)


class SmoothedSGD(torch.optim.Optimizer):
    """The update of Hinton's Forward-Forward Matlab code (ffcode, `ffnew.m`).

    The gradient is smoothed over minibatches, s <- m s + (1 - m) g (`delay` = m = 0.9 there),
    and the weight cost is applied outside the smoothing: w <- w - lr (s + weight_decay w).
    torch's SGD with dampening would smooth the weight cost too.
    """

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        for group in self.param_groups:
            m, wd = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "smoothed" not in state:
                    state["smoothed"] = torch.zeros_like(p)
                smoothed = state["smoothed"].mul_(m).add_(p.grad, alpha=1 - m)
                p.sub_(smoothed + wd * p if wd else smoothed, alpha=group["lr"])


class EpochSchedule:
    """Multiplies every learning rate of the method's optimisers by gain(epoch), epoch 1-based,
    with epochs counted in `train_step` calls (`Task.steps_per_epoch`, filled by the harness).

    Its state (the step count) is saved with the method, so a resumed run continues the
    schedule exactly. Without `steps_per_epoch` (tests, `bpfree cost`) the lr stays constant.
    """

    def __init__(
        self, optimizers: dict[str, torch.optim.Optimizer], steps_per_epoch: int | None,
        gain: Callable[[int], float] | None,
    ) -> None:
        self.optimizers = optimizers
        self.base = [g["lr"] for g in self.groups()]
        self.steps_per_epoch, self.gain = steps_per_epoch, gain
        self.steps = 0

    def step(self) -> None:
        """After an optimiser step: set the lr of the next one."""
        self.steps += 1
        if self.gain is None or not self.steps_per_epoch:
            return
        gain = self.gain(self.steps // self.steps_per_epoch + 1)
        for group, base in zip(self.groups(), self.base):
            group["lr"] = base * gain

    def groups(self) -> list[dict[str, Any]]:
        # Looked up every time: loading an optimiser's state replaces its group dicts.
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = state["steps"]


class _ForwardOnly(Method):
    """What both share: the family, the MLP-only check, and per-epoch lr schedules kept in
    the method's state so that resuming continues the schedule exactly."""

    family = "forward-only"
    schedule: EpochSchedule

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The optimisers' states carry the scheduled lr of the next step; the schedule its count.
        super().load_state_dict(state)
        self.schedule.load_state_dict(state["schedule"])

    def _step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()
        self.schedule.step()


# --- Forward-Forward ------------------------------------------------------------------------


def rms_normalise(h: Tensor, eps: float = 1e-8) -> Tensor:
    """h / sqrt(mean(h^2)) per example: the direction of h at a fixed length sqrt(units).

    Hinton's `ffnormrows`: "makes every a have a sum of squared activities that averages 1 per
    neuron", applied to the input and to every hidden layer's output before the next layer.
    """
    return h / (h.pow(2).mean(-1, keepdim=True).sqrt() + eps)


def embed_label(x: Tensor, labels: Tensor, num_classes: int, strength: float) -> Tensor:
    """Flattened inputs with their first `num_classes` values replaced by `strength` * one-hot.

    `labels` holds class indices, or (for the neutral label) a float row of per-class values.
    """
    flat = x.flatten(1).clone()
    if labels.dtype.is_floating_point:
        flat[:, :num_classes] = strength * labels
    else:
        flat[:, :num_classes] = strength * F.one_hot(labels, num_classes).to(flat.dtype)
    return flat


@dataclass
class FFConfig(HParams):
    """Forward-Forward. The defaults are Hinton's official Matlab code (`ffnew.m`): 3 x 1000
    ReLUs, sum-of-squares goodness against a threshold of one per unit, hard negatives,
    peer normalisation, its smoothed SGD. `paper` is the paper's 4 x 2000, 60-epoch run."""

    # `cnn` is a value only to be rejected with the reason, so `--set arch=...` reads the same
    # for every method.
    arch: Literal["mlp", "cnn"] = "mlp"
    width: int = 1000  # units per hidden layer (Matlab code: 1000)
    depth: int = 3  # hidden layers (Matlab code: 3; paper: 4 x 2000); FF has no output layer
    # Goodness of a layer: the sum (Hinton) or the mean of its squared ReLU activities. The
    # threshold is per unit: p(positive) = sigmoid(sum h^2 - threshold * units) for `sum`
    # (Hinton's code: threshold = number of units), sigmoid(mean h^2 - threshold) for `mean`.
    goodness: Literal["sum", "mean"] = "sum"
    threshold: float = 1.0
    # Negative labels. `hard` (Hinton's code): a linear softmax on the normalised activities of
    # a pass with the neutral label (1/C everywhere) predicts the label; the negative is drawn
    # from its prediction with the true label's probability set to 0. `random`: uniform over
    # the C - 1 wrong labels. Neither can pick the true label.
    negatives: Literal["hard", "random"] = "hard"
    # First hidden layer (0-based) whose goodness is accumulated for a prediction, and whose
    # activities feed the hard-negative softmax: 1 = "all but the first hidden layer" (paper;
    # Matlab minlevelenergy = minlevelsup = 3, i.e. the second hidden layer).
    goodness_from: int = 1
    label_strength: float = 1.0  # value of the label's "on" pixel (Matlab labelstrength = 1)
    # Peer normalisation (Matlab lambdamean = 0.03): pushes each unit's running mean activity
    # (momentum 0.9) towards its layer's average, so no unit stays dead or always on.
    peer_norm: float = 0.03
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd = Hinton's smoothed SGD (SmoothedSGD)
    lr: float = 0.01  # Matlab epsilon
    momentum: float = 0.9  # Matlab delay: smoothing of the gradient over minibatches (sgd only)
    weight_decay: float = 0.001  # Matlab wc, on weights only (not biases)
    head_lr: float = 0.1  # hard-negative softmax: Matlab epsilonsup
    head_weight_decay: float = 0.003  # Matlab supwc
    # lr schedule by epoch (Matlab code): constant for the first half of `schedule_epochs`,
    # then falling linearly to 1/schedule_epochs of it at the last epoch; 0 = constant lr.
    schedule_epochs: int = 0

    def validate(self) -> None:
        super().validate()
        if self.arch == "cnn":
            raise ConfigError(f"ff {CNN_REASON}")
        if self.width < 1 or self.depth < 1:
            raise ConfigError(f"width and depth must be >= 1, got {self.width}, {self.depth}")
        if not 0 <= self.goodness_from < self.depth:
            raise ConfigError(
                f"goodness_from must be a hidden layer index in [0, depth), got "
                f"{self.goodness_from} with depth {self.depth}"
            )
        if self.threshold < 0 or self.label_strength <= 0 or self.peer_norm < 0:
            raise ConfigError(
                "threshold and peer_norm must be >= 0 and label_strength > 0, got "
                f"{self.threshold}, {self.peer_norm}, {self.label_strength}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.head_lr <= 0 or self.head_weight_decay < 0 or self.schedule_epochs < 0:
            raise ConfigError(
                "head_lr must be > 0, head_weight_decay and schedule_epochs >= 0, got "
                f"{self.head_lr}, {self.head_weight_decay}, {self.schedule_epochs}"
            )


def hinton_gain(epochs: int) -> Callable[[int], float]:
    """Matlab `ffnew.m`: 1 up to epoch epochs/2, then (1 + 2 (epochs - epoch)) / epochs, which
    ends at 1/epochs; held there if the run is longer than the schedule."""

    def gain(epoch: int) -> float:
        epoch = min(epoch, epochs)
        return 1.0 if epoch <= epochs / 2 else (1 + 2 * (epochs - epoch)) / epochs

    return gain


class _FFModel(nn.Module):
    """The hidden layers of the shared MLP shape (FF has no output layer: the label enters
    through the input), the hard-negative softmax, and the running mean activity of every
    unit for peer normalisation (a buffer, so it is checkpointed)."""

    def __init__(self, sizes: list[int], head_in: int, num_classes: int, hard: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            # Matlab: randn / sqrt(fan-in), zero biases.
            nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
        # Matlab: the softmax weights start at zero (so the first negatives are uniform) and
        # its bias is never updated, i.e. there is none.
        self.head = nn.Linear(head_in, num_classes, bias=False) if hard else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
        self.register_buffer("mean_activity", torch.full((len(sizes) - 1, sizes[1]), 0.5))


class ForwardForward(_ForwardOnly):
    name = "ff"
    description = "Forward-Forward (Hinton 2022): per-layer goodness of label-in-input data, no gradient across layers"
    Config = FFConfig
    presets = {
        "default": {},
        # Sized for the quick suite (2 epochs of mnist-5k, 64 steps) and the contract task
        # (150 steps): `small`'s recipe at width 256, with the threshold and lr that learned
        # best and most reliably over three seeds on mnist-5k (docs/forward_only.md). Hard
        # negatives and peer normalisation both hurt this early in training.
        "quick": {
            "width": 256, "depth": 2, "goodness": "mean", "threshold": 0.5,
            "negatives": "random", "goodness_from": 0, "peer_norm": 0.0,
            "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
        },
        # Hinton 2022, supervised MNIST: 4 x 2000 ReLUs, 60 epochs, goodness of all but the
        # first hidden layer, hard negatives from a neutral-label pass (1.36% test error).
        # Everything the paper does not state is the official Matlab code's (ffnew.m).
        "paper": {
            "width": 2000, "depth": 4, "goodness": "sum", "threshold": 1.0,
            "negatives": "hard", "goodness_from": 1, "label_strength": 1.0,
            "peer_norm": 0.03, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
            "weight_decay": 0.001, "head_lr": 0.1, "head_weight_decay": 0.003,
            "schedule_epochs": 60,
        },
        # A small published configuration that converges on a CPU: 784-500-500, Adam 3e-3,
        # mean goodness against 2.0, uniform wrong labels, goodness of every layer summed;
        # batch 128, 30 epochs; 3.60% MNIST test error (cybertronai/hinton-problems,
        # ff-label-in-input).
        "small": {
            "width": 500, "depth": 2, "goodness": "mean", "threshold": 2.0,
            "negatives": "random", "goodness_from": 0, "peer_norm": 0.0,
            "optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0,
        },
    }
    search_space = {
        "lr": ("loguniform", 1e-4, 1e-2),
        "threshold": ("choice", [0.5, 1.0, 2.0]),
    }

    def __init__(self, task: Task, config: FFConfig) -> None:
        super().__init__(task, config)
        self.num_classes = task.num_classes
        inputs = math.prod(task.input_shape)
        if inputs < task.num_classes:
            raise ConfigError(
                f"ff writes the label into the first {task.num_classes} input values, but the "
                f"input has only {inputs}"
            )
        sizes = [inputs] + [config.width] * config.depth
        head_in = config.width * (config.depth - config.goodness_from)
        self.model = _FFModel(sizes, head_in, task.num_classes, config.negatives == "hard")
        self.model.to(self.device)
        self.optimizers = {"layers": self._optimizer(self.model.layers, config.lr,
                                                     config.weight_decay)}
        if self.model.head is not None:
            self.optimizers["head"] = self._optimizer(self.model.head, config.head_lr,
                                                      config.head_weight_decay)
        gain = hinton_gain(config.schedule_epochs) if config.schedule_epochs else None
        self.schedule = EpochSchedule(self.optimizers, task.steps_per_epoch, gain)

    def _optimizer(self, module: nn.Module, lr: float, decay: float) -> torch.optim.Optimizer:
        """Weight cost on weights only, as in the Matlab code (biases have none)."""
        weights = [p for name, p in module.named_parameters() if name.endswith("weight")]
        biases = [p for name, p in module.named_parameters() if not name.endswith("weight")]
        groups = [{"params": weights, "weight_decay": decay}]
        if biases:
            groups.append({"params": biases, "weight_decay": 0.0})
        if self.config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=lr)
        return SmoothedSGD(groups, lr=lr, momentum=self.config.momentum)

    # --- the pieces, exposed so the tests can check each ------------------------------------
    def goodness(self, h: Tensor) -> Tensor:
        """Per-example goodness of a layer's ReLU activities."""
        squares = h.pow(2)
        return squares.sum(-1) if self.config.goodness == "sum" else squares.mean(-1)

    def logit(self, h: Tensor) -> Tensor:
        """log-odds that the layer's input was positive data: goodness minus threshold."""
        units = h.shape[-1] if self.config.goodness == "sum" else 1
        return self.goodness(h) - self.config.threshold * units

    def layer_inputs(self, x: Tensor, labels: Tensor) -> Tensor:
        """The first layer's input: the label written into the image, RMS-normalised."""
        strength = self.config.label_strength
        return rms_normalise(embed_label(x, labels, self.num_classes, strength))

    def pre_activations(self, h: Tensor) -> list[Tensor]:
        """Every hidden layer's pre-activation, each layer fed the *detached*, normalised ReLU
        activity of the one below: a loss on layer l's output reaches layer l only."""
        out = []
        for layer in self.model.layers:
            z = layer(h.detach())
            out.append(z)
            h = rms_normalise(z.relu())
        return out

    def layer_losses(self, pos: list[Tensor], neg: list[Tensor]) -> list[Tensor]:
        """Each layer's logistic loss on its positive and negative pre-activations, averaged
        over the 2B examples (its gradient is then exactly the Matlab code's)."""
        return [
            0.5 * (F.softplus(-self.logit(p.relu())).mean()
                   + F.softplus(self.logit(n.relu())).mean())
            for p, n in zip(pos, neg)
        ]

    def head_features(self, x: Tensor) -> Tensor:
        """Normalised activities of the layers from `goodness_from` on, for the neutral label."""
        neutral = torch.full((self.num_classes,), 1 / self.num_classes, device=x.device)
        with torch.no_grad():
            pre = self.pre_activations(self.layer_inputs(x, neutral.expand(len(x), -1)))
        return torch.cat([rms_normalise(z.relu()) for z in pre[self.config.goodness_from:]], 1)

    def negative_labels(self, y: Tensor, head_logits: Tensor | None = None) -> Tensor:
        """A wrong label per example: drawn from the softmax of `head_logits` with the true
        label excluded (hard), or uniformly among the C - 1 wrong labels (random)."""
        if head_logits is None:
            shift = torch.randint(1, self.num_classes, y.shape, device=y.device)
            return (y + shift) % self.num_classes
        # Gumbel-max: an exact draw from softmax(logits) without a host sync.
        masked = head_logits.detach().scatter(1, y[:, None], float("-inf"))
        uniform = torch.rand_like(masked).clamp_(min=torch.finfo(masked.dtype).tiny)
        return (masked - uniform.log().neg().log()).argmax(1)

    # --- the Method interface ---------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        logs: dict[str, Tensor] = {}
        head_logits = None
        if self.model.head is not None:
            head_logits = self.model.head(self.head_features(x))
            head_loss = F.cross_entropy(head_logits, y)
            head_loss.backward()
            logs["head_loss"] = head_loss.detach()
        negatives = self.negative_labels(y, head_logits)
        h_pos, h_neg = self.layer_inputs(x, y), self.layer_inputs(x, negatives)
        losses = []
        # Layer by layer, each backward before the next layer runs: its graph (this layer's
        # inputs and outputs) is all that autograd ever holds.
        for index, layer in enumerate(self.model.layers):
            z_pos, z_neg = layer(h_pos), layer(h_neg)  # h_pos, h_neg carry no graph
            (loss,) = self.layer_losses([z_pos], [z_neg])
            objective = loss + self.peer_term(index, z_pos) if self.config.peer_norm else loss
            objective.backward()  # reaches this layer's parameters only
            losses.append(loss.detach())
            with torch.no_grad():
                h_pos, h_neg = rms_normalise(z_pos.relu()), rms_normalise(z_neg.relu())
        self._step()
        logs["loss"] = torch.stack(losses).sum()
        return logs

    def peer_term(self, index: int, z: Tensor) -> Tensor:
        """Hinton's peer normalisation as a surrogate loss whose gradient with respect to the
        pre-activations z is his, -lambda * (layer mean - unit mean) per unit and example,
        on positive data: not gated by the ReLU ("we pretend there is a gradient even when
        hidden units are off"). Also advances the unit's running mean activity."""
        mean = self.model.mean_activity[index]
        with torch.no_grad():
            mean.mul_(0.9).add_(z.relu().mean(0), alpha=0.1)
            pull = self.config.peer_norm * (mean.mean() - mean)
        return -(z * pull).sum(1).mean()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Goodness accumulated over layers `goodness_from`.. for every candidate label:
        `num_classes` forward passes per image, by design of the method."""
        n, classes = len(x), self.num_classes
        labels = torch.arange(classes, device=x.device).repeat_interleave(n)
        h = self.layer_inputs(x.flatten(1).repeat(classes, 1), labels)
        scores = torch.zeros(classes * n, device=x.device)
        for index, layer in enumerate(self.model.layers):
            a = layer(h).relu()
            if index >= self.config.goodness_from:
                scores += self.goodness(a)
            h = rms_normalise(a)
        return scores.view(classes, n).T


# --- PEPITA -----------------------------------------------------------------------------------


@dataclass
class PepitaConfig(HParams):
    """PEPITA. The defaults are the paper's MNIST settings as run by the authors' reference
    code (GiorgiaD/PEPITA): 1 x 1024 ReLU without biases, He-uniform weights, F uniform with
    0.05 x He's bound, SGD with momentum 0.9 at lr 0.1, batch 64, 10% dropout, lr x 0.1 after
    epochs 60 and 90, 100 epochs."""

    arch: Literal["mlp", "cnn"] = "mlp"
    width: int = 1024
    depth: int = 1
    bias: bool = False  # the reference networks have none; with biases, they get the same deltas
    lr: float = 0.1
    momentum: float = 0.9
    dropout: float = 0.1  # drop probability of hidden units, one mask for both passes
    # F ~ U(-b, b) with b = f_scale * sqrt(6 / input size): He-uniform's bound times 0.05.
    f_scale: float = 0.05
    decay_epochs: str = "60,90"  # lr x decay_factor after each of these epochs ("" = none)
    decay_factor: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.arch == "cnn":
            raise ConfigError(f"pepita {CNN_REASON}")
        if self.width < 1 or self.depth < 1:
            raise ConfigError(f"width and depth must be >= 1, got {self.width}, {self.depth}")
        if not 0 <= self.momentum < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"momentum and dropout must be in [0, 1), got {self.momentum}, {self.dropout}"
            )
        if self.f_scale <= 0 or not 0 < self.decay_factor <= 1:
            raise ConfigError(
                f"f_scale must be > 0 and decay_factor in (0, 1], got "
                f"{self.f_scale}, {self.decay_factor}"
            )
        self.decay_after()

    def decay_after(self) -> list[int]:
        """The epochs after which the lr is multiplied by `decay_factor`."""
        try:
            epochs = [int(e) for e in self.decay_epochs.split(",")] if self.decay_epochs else []
        except ValueError:
            raise ConfigError(
                f"decay_epochs={self.decay_epochs!r} is not a comma-separated list of epochs"
            ) from None
        if any(e < 1 for e in epochs):
            raise ConfigError(f"decay_epochs must be >= 1, got {self.decay_epochs!r}")
        return sorted(epochs)


class _PepitaModel(nn.Module):
    """The shared MLP and the fixed projection F (input size x classes) as a buffer: it is
    checkpointed with the model and never trained."""

    def __init__(self, net: MLP, projection: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("projection", projection)


class Pepita(_ForwardOnly):
    name = "pepita"
    description = "PEPITA (Dellaferrera & Kreiman 2022): second forward pass on error-modulated input, no backward pass"
    Config = PepitaConfig
    presets = {
        "default": {},
        # Sized for the quick suite (2 epochs of mnist-5k, 64 steps) and the contract task;
        # chosen on mnist-5k (docs/forward_only.md).
        "quick": {"width": 256},
        # Dellaferrera & Kreiman 2022, MNIST, fully connected, 100 epochs at batch 64: 98.01%
        # test accuracy (Table 1). Values from the authors' reference code (README's MNIST
        # command, functions.py); the dataclass defaults are the same.
        "paper": {
            "width": 1024, "depth": 1, "bias": False, "lr": 0.1, "momentum": 0.9,
            "dropout": 0.1, "f_scale": 0.05, "decay_epochs": "60,90", "decay_factor": 0.1,
            "weight_decay": 0.0,
        },
    }
    search_space = {"lr": ("loguniform", 1e-3, 3e-1), "f_scale": ("loguniform", 0.01, 1.0)}

    def __init__(self, task: Task, config: PepitaConfig) -> None:
        super().__init__(task, config)
        net = MLP(task.input_shape, task.num_classes, config.width, config.depth)
        for layer in net.layers:
            # He uniform, U(-sqrt(6 / fan-in), +sqrt(6 / fan-in)), as the reference code.
            bound = math.sqrt(6 / layer.in_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            if config.bias:
                nn.init.zeros_(layer.bias)
            else:
                layer.bias = None
        inputs = net.layers[0].in_features
        bound = config.f_scale * math.sqrt(6 / inputs)
        projection = torch.empty(inputs, task.num_classes).uniform_(-bound, bound)
        self.model = _PepitaModel(net, projection).to(self.device)
        self.optimizers = {
            "sgd": torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                   momentum=config.momentum, weight_decay=config.weight_decay)
        }
        decays, factor = config.decay_after(), config.decay_factor
        gain = (lambda epoch: factor ** sum(epoch > e for e in decays)) if decays else None
        self.schedule = EpochSchedule(self.optimizers, task.steps_per_epoch, gain)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.net.layers

    def forward_pass(self, x: Tensor, masks: list[Tensor] | None) -> tuple[list[Tensor], Tensor]:
        """Hidden activities (after ReLU and the dropout mask) and the output logits."""
        hs, h = [], x
        for index, layer in enumerate(self.layers[:-1]):
            h = layer(h).relu()
            if masks is not None:
                h = h * masks[index]
            hs.append(h)
        return hs, self.layers[-1](h)

    @torch.no_grad()
    def updates(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Each parameter's update direction (the optimiser steps against it, like against a
        gradient), and the first pass's logits. Two forward passes, nothing else:

        e = softmax(W_L h_{L-1}) - onehot(y), x' = x + F e (second pass: h'_l, e'),
        hidden l: (h_l - h'_l) h'_{l-1}^T / B, output: e' h'_{L-1}^T / B (h'_0 = x').
        """
        x = x.flatten(1)
        p = self.config.dropout
        masks = None
        if self.model.training and p > 0:
            masks = [torch.rand(len(x), layer.out_features, device=x.device).ge_(p).div_(1 - p)
                     for layer in self.layers[:-1]]
        target = F.one_hot(y, self.task.num_classes).to(x.dtype)
        hs, logits = self.forward_pass(x, masks)
        modulated = x + (logits.softmax(1) - target) @ self.model.projection.T
        hs_mod, logits_mod = self.forward_pass(modulated, masks)
        deltas = [h - h_mod for h, h_mod in zip(hs, hs_mod)] + [logits_mod.softmax(1) - target]
        inputs = [modulated] + hs_mod
        n = len(x)
        grads = []
        for layer, delta, a in zip(self.layers, deltas, inputs):
            grads.append(delta.T @ a / n)
            if layer.bias is not None:
                grads.append(delta.sum(0) / n)
        return grads, logits

    @torch.no_grad()
    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        grads, logits = self.updates(x, y)
        for p, g in zip(self.model.parameters(), grads):
            p.grad = g
        self._step()
        # What the reference code monitors: the cross-entropy of the first pass's output.
        return {"loss": F.cross_entropy(logits, y)}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.forward_pass(x.flatten(1), None)[1]
