"""Feedback alignment and its relatives: backprop's backward pass without weight transport.

Backprop sends the error down through W_l^T, the transpose of the very weights of the forward
pass. These methods keep everything else of backprop and replace only that transport:

- `fa`, feedback alignment (Lillicrap et al. 2016): a fixed random matrix B_l in place of W_l^T.
  The forward weights come to align with B, so that B's error becomes a useful descent
  direction.
- `dfa`, direct feedback alignment (Nokland 2016): no layer-to-layer error at all; every hidden
  layer receives the output error e = dL/d(logits) straight through its own fixed random
  matrix, delta_l = (B_l e) * f'(a_l). The output layer learns from e exactly as in backprop.
- `usf`, `brsf`, `frsf`, sign symmetry (Liao, Leibo, Poggio 2016; as in biotorch, Sanfiz and
  Akrout 2021): the feedback is sign(W_l) scaled elementwise, so it shares W's signs but not
  its magnitudes. uSF scales by one constant per layer, brSF by |M| with M redrawn every
  batch, frSF by |M| with M drawn once.

The feedback of a weight layer is kept in W's shape, (out, in) or a conv kernel, and the
backward pass computes grad_input = grad_output @ B (a transposed convolution with kernel B)
where backprop uses W. Feedback tensors are buffers of `self.model`: never parameters, so no
optimiser and no weight decay ever sees them, and checkpoints carry them. The first weight
layer needs no feedback (nothing lies below it to receive an error) and has none.

Inside a layer everything backpropagates as usual: ReLU, max-pooling, dropout and BatchNorm
(whose scale and shift learn from the error that reaches them) use their ordinary backward;
only the error's passage through a weight matrix changes. docs/feedback_alignment.md gives
every choice and its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    ConfigError,
    HParams,
    Method,
    Task,
    angle_degrees,
    diagnostic_mode,
    layer_angles,
)
from .nets import build_net, flat_steps

# Steps per epoch assumed by `milestones` when the caller does not say (Task.steps_per_epoch
# is None): MNIST's 60,000 training images in batches of 64, biotorch's setting.
DEFAULT_STEPS_PER_EPOCH = 938

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class FeedbackAlignmentConfig(HParams):
    """Shared by the five methods: the network, the optimiser and its learning-rate schedule.

    Defaults are backprop's (`methods.backprop`): the shared CNN under AdamW at lr 1e-3 and
    weight decay 1e-3, so that `fa` and `backprop` at their defaults differ only in the
    backward pass.
    """

    arch: Literal["cnn", "mlp"] = "cnn"
    width: int = 256  # MLP hidden units (ignored by cnn)
    depth: int = 2  # MLP hidden layers (ignored by cnn)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-3
    # Epochs after which the learning rate is multiplied by `gamma`, comma-separated ("50,75");
    # empty for a constant rate. Converted to steps with Task.steps_per_epoch.
    milestones: str = ""
    gamma: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.width < 1 or self.depth < 0:
            raise ConfigError(f"width must be >= 1 and depth >= 0, got {self.width}, {self.depth}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        self.milestone_epochs()

    def milestone_epochs(self) -> list[int]:
        """`milestones` as a sorted list of positive epoch numbers."""
        if not self.milestones.strip():
            return []
        try:
            epochs = [int(v) for v in self.milestones.split(",")]
        except ValueError:
            raise ConfigError(
                f"milestones={self.milestones!r} is not a comma-separated list of epochs "
                "(e.g. 50,75)"
            ) from None
        if min(epochs) < 1:
            raise ConfigError(f"milestones must be epochs >= 1, got {self.milestones!r}")
        return sorted(epochs)


# --- the replaced weight transport ------------------------------------------------------------
class _FeedbackLinear(torch.autograd.Function):
    """`F.linear` forward; the backward sends the error through `feedback` (W's shape) in place
    of W, and computes the weight and bias gradients exactly as autograd's linear does.

    The feedback is persistent state like W itself (a buffer, or a function of W), not an
    activation, so it is kept on ctx rather than saved: the harness's `act_bytes` count what is
    held for backward, parameters excluded, and counting B would charge FA for a second copy of
    W that backprop is not charged for.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                feedback: Tensor | None) -> Tensor:
        ctx.save_for_backward(x)
        ctx.feedback = feedback
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.feedback is None:
                raise RuntimeError("a layer without feedback was asked for its input's gradient")
            grad_x = grad.mm(ctx.feedback)
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


class _FeedbackConv2d(torch.autograd.Function):
    """`F.conv2d` forward; the backward's input gradient is the transposed convolution of the
    error with the kernel `feedback` (W's shape) instead of W. The weight and bias gradients
    come from the same aten kernel autograd uses, so with feedback = W this is backprop."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                stride: Any, padding: Any, dilation: Any, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.feedback = feedback
        ctx.has_bias = bias is not None
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        if mask[0] and ctx.feedback is None:
            raise RuntimeError("a layer without feedback was asked for its input's gradient")
        # convolution_backward uses its `weight` only for the input gradient (and for shapes).
        kernel = ctx.feedback if ctx.feedback is not None else weight
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, kernel, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
            dilation, False, [0, 0], groups, mask,
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _Inject(torch.autograd.Function):
    """A zero whose backward delivers `gradient` to `h`: adding `_Inject.apply(h, g)` to a loss
    makes backward send exactly g into h, on top of whatever else reaches it. (Adding
    <h, g> instead would save g for backward, as an activation it is not.)"""

    @staticmethod
    def forward(ctx: Any, h: Tensor, gradient: Tensor) -> Tensor:
        ctx.gradient = gradient
        return h.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.gradient, None


def feedback_forward(step: nn.Module, h: Tensor, feedback: Tensor | None) -> Tensor:
    """Weight layer `step` applied to `h`, its backward using `feedback` in place of W."""
    if isinstance(step, nn.Linear):
        return _FeedbackLinear.apply(h, step.weight, step.bias, feedback)
    return _FeedbackConv2d.apply(h, step.weight, step.bias, feedback, step.stride, step.padding,
                                 step.dilation, step.groups)


def init_bound(fan_in: int) -> float:
    """The bound of PyTorch's default Linear/Conv2d weight init, U(-b, b) with b = 1/sqrt(fan_in)
    (kaiming_uniform with a = sqrt(5)): feedback is drawn like the forward weights it stands
    for, so the error it sends has backprop's scale at initialisation."""
    return 1.0 / math.sqrt(fan_in)


def _uniform(shape: torch.Size | tuple[int, ...], bound: float, device: torch.device) -> Tensor:
    return torch.empty(shape, device=device).uniform_(-bound, bound)


def _fan_in(weight: Tensor) -> int:
    return math.prod(weight.shape[1:])


# --- the methods --------------------------------------------------------------------------------
def _presets(paper_lr: float) -> dict[str, dict[str, Any]]:
    """The family's presets; only the paper learning rate differs between methods.

    - `default`: the dataclass (backprop's settings on the shared CNN).
    - `quick`: the MLP, for the quick suite (2 epochs of mnist-5k) and the contract tests (150
      steps): seconds on a CPU, and every method of the family learns there.
    - `paper`: biotorch's MNIST / Fashion-MNIST LeNet benchmark (its Benchmarks.md) on the
      shared CNN: SGD, momentum 0.9, weight decay 1e-3, the rate divided by 10 after epochs 50
      and 75 of 100. Run it with `--epochs 100 --batch-size 64`: the batch size is the
      harness's, not a method's, and the milestones count epochs of whatever batch size the
      harness uses. biotorch publishes no MNIST learning rate; `paper_lr` is the rate of the
      method's CIFAR-10 LeNet SGD config, the only LeNet rates it publishes.
    """
    return {
        "default": {},
        "quick": {"arch": "mlp"},
        "paper": {"arch": "cnn", "optimizer": "sgd", "lr": paper_lr, "momentum": 0.9,
                  "weight_decay": 1e-3, "milestones": "50,75", "gamma": 0.1},
    }


class _FeedbackMethod(Method):
    """The shared network, its optimiser and schedule, and the diagnostics; subclasses choose
    the feedback (`build_feedback`, `feedbacks`) or, for DFA, the whole objective."""

    family = "feedback-alignment"
    Config = FeedbackAlignmentConfig
    # Whether each weight layer's feedback has W's shape, so that W^T and B can be compared.
    feedback_like_weights: ClassVar[bool] = True

    def __init__(self, task: Task, config: FeedbackAlignmentConfig) -> None:
        super().__init__(task, config)
        net = build_net(config.arch, task.input_shape, task.num_classes, config.width, config.depth)
        self.model = nn.Module()
        self.model.net = net
        self.model.feedback = nn.Module()  # buffers only, filled by build_feedback
        self.model.to(self.device)
        self.steps = flat_steps(net)
        self.weight_layers = [s for s in self.steps if isinstance(s, WEIGHT_LAYERS)]
        names = {module: name for name, module in net.named_modules()}
        self.layer_names = [names[s] for s in self.weight_layers]
        self.build_feedback(task)
        self.optimizers = {config.optimizer: self._make_optimizer(net.parameters())}
        per_epoch = task.steps_per_epoch or DEFAULT_STEPS_PER_EPOCH
        self.milestone_steps = [e * per_epoch for e in config.milestone_epochs()]
        self.step_count = 0  # optimiser steps taken: where the schedule stands

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum,
                                   weight_decay=c.weight_decay)
        cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=c.lr, weight_decay=c.weight_decay)

    # --- what a variant defines --------------------------------------------------------
    def build_feedback(self, task: Task) -> None:
        """Register the fixed feedback state as buffers of `self.model.feedback`."""

    def feedbacks(self) -> list[Tensor | None]:
        """The feedback of every weight layer for this step, in W's shape; None for the first."""
        raise NotImplementedError

    def objective(self, x: Tensor, y: Tensor, feedbacks: list[Tensor | None] | None = None
                  ) -> tuple[Tensor, Tensor]:
        """(surrogate, loss): the gradient of `surrogate` with respect to the parameters is the
        method's update direction; `loss` is the cross-entropy that is reported."""
        feedbacks = self.feedbacks() if feedbacks is None else feedbacks
        h, k = x, 0
        for step in self.steps:
            if isinstance(step, WEIGHT_LAYERS):
                h = feedback_forward(step, h, feedbacks[k])
                k += 1
            else:
                h = step(h)
        loss = F.cross_entropy(h, y)
        return loss, loss

    # --- shared machinery --------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        return self.model.net

    def learning_rate(self) -> float:
        """The scheduled rate of the next step: lr times gamma per milestone passed."""
        passed = sum(self.step_count >= m for m in self.milestone_steps)
        return self.config.lr * self.config.gamma**passed

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        surrogate, loss = self.objective(x, y)
        optimizer = self.optimizers[self.config.optimizer]
        optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate()
        optimizer.step()
        self.step_count += 1
        return {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the schedule's step count, so a resumed run continues it."""
        return {**super().state_dict(), "schedule": {"step_count": self.step_count}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step_count = int(state["schedule"]["step_count"])

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """`angle_update/<layer>`: the method's update direction against backprop's gradient of
        the same cross-entropy on the same batch; `angle_feedback/<layer>`: W against its
        feedback B (both in W's shape, i.e. W^T against B), where a layer has one."""
        params = dict(self.net.named_parameters())
        with diagnostic_mode(self.model):
            feedbacks = self.feedbacks()
            surrogate, _ = self.objective(x, y, feedbacks)
            estimate = torch.autograd.grad(surrogate, list(params.values()))
            reference = torch.autograd.grad(F.cross_entropy(self.net(x), y), list(params.values()))
        angles = layer_angles(dict(zip(params, estimate)), dict(zip(params, reference)))
        out = {f"angle_update/{layer}": angle for layer, angle in angles.items()}
        for name, layer, feedback in zip(self.layer_names, self.weight_layers, feedbacks):
            if feedback is not None and self.feedback_like_weights:
                out[f"angle_feedback/{name}"] = angle_degrees(layer.weight, feedback)
        return out


class FeedbackAlignment(_FeedbackMethod):
    name = "fa"
    description = "Feedback alignment (Lillicrap et al. 2016): fixed random B_l in place of W_l^T"
    presets = _presets(paper_lr=1e-3)  # lr: biotorch's CIFAR-10 LeNet SGD config

    def build_feedback(self, task: Task) -> None:
        """B_l drawn once like W_l's own initialisation (`init_bound`), for layers 2..L."""
        for k, layer in enumerate(self.weight_layers[1:], 1):
            bound = init_bound(_fan_in(layer.weight))
            self.model.feedback.register_buffer(
                f"w{k}", _uniform(layer.weight.shape, bound, self.device))

    def feedbacks(self) -> list[Tensor | None]:
        return [None] + [getattr(self.model.feedback, f"w{k}")
                         for k in range(1, len(self.weight_layers))]


class UniformSignFeedback(_FeedbackMethod):
    """uSF: B_l = s_l sign(W_l), s_l the standard deviation of W_l's initialisation,
    1/sqrt(3 fan_in) (biotorch's scale for PyTorch's default init), recomputed every step from
    the current W_l."""

    name = "usf"
    description = "Uniform sign-concordant feedback (Liao et al. 2016): B_l = s_l sign(W_l)"
    presets = _presets(paper_lr=0.1)  # lr: biotorch's CIFAR-10 LeNet SGD config

    def scale(self, layer: nn.Module) -> float:
        return init_bound(_fan_in(layer.weight)) / math.sqrt(3)

    def feedbacks(self) -> list[Tensor | None]:
        return [None] + [self.scale(layer) * layer.weight.detach().sign()
                         for layer in self.weight_layers[1:]]


class BatchRandomSignFeedback(_FeedbackMethod):
    """brSF: B_l = |M_l| * sign(W_l) elementwise, M_l redrawn every step from W_l's
    initialisation distribution (the global RNG, so seeded runs repeat)."""

    name = "brsf"
    description = "Batchwise random-magnitude sign-concordant feedback (Liao et al. 2016)"
    presets = _presets(paper_lr=0.1)  # lr: biotorch's CIFAR-10 LeNet SGD config

    def feedbacks(self) -> list[Tensor | None]:
        out: list[Tensor | None] = [None]
        for layer in self.weight_layers[1:]:
            w = layer.weight.detach()
            out.append(_uniform(w.shape, init_bound(_fan_in(w)), w.device).abs_() * w.sign())
        return out


class FixedRandomSignFeedback(_FeedbackMethod):
    """frSF: B_l = |M_l| * sign(W_l) elementwise, |M_l| drawn once from W_l's initialisation
    distribution and kept as a buffer."""

    name = "frsf"
    description = "Fixed random-magnitude sign-concordant feedback (Liao et al. 2016)"
    presets = _presets(paper_lr=0.1)  # lr: biotorch's CIFAR-10 LeNet SGD config

    def build_feedback(self, task: Task) -> None:
        for k, layer in enumerate(self.weight_layers[1:], 1):
            bound = init_bound(_fan_in(layer.weight))
            self.model.feedback.register_buffer(
                f"m{k}", _uniform(layer.weight.shape, bound, self.device).abs_())

    def feedbacks(self) -> list[Tensor | None]:
        return [None] + [getattr(self.model.feedback, f"m{k}") * layer.weight.detach().sign()
                         for k, layer in enumerate(self.weight_layers[1:], 1)]


class DirectFeedbackAlignment(_FeedbackMethod):
    """DFA: the net is cut before every weight layer into blocks (a weight layer and the
    nonlinearity, pooling, dropout and BatchNorm after it). Hidden block l gets, at its output
    h_l, the gradient B_l e reshaped to h_l's shape, and backpropagates it inside itself only
    (so through f'(a_l)); the output block gets the true cross-entropy gradient. B_l (classes x
    units of h_l) is drawn as if it were the weight of a linear layer from h_l to the output,
    U(+-1/sqrt(units)), so that the top hidden layer's feedback has exactly FA's distribution.
    """

    name = "dfa"
    feedback_like_weights = False
    description = "Direct feedback alignment (Nokland 2016): delta_l = (B_l e) * f'(a_l)"
    presets = _presets(paper_lr=1e-4)  # lr: biotorch's CIFAR-10 LeNet SGD config

    def build_feedback(self, task: Task) -> None:
        starts = [i for i, s in enumerate(self.steps) if isinstance(s, WEIGHT_LAYERS)]
        cuts = [0, *starts[1:], len(self.steps)]
        self.blocks = [nn.Sequential(*self.steps[a:b]) for a, b in zip(cuts, cuts[1:])]
        for k, shape in enumerate(self._hidden_shapes(task)):
            units = math.prod(shape)
            self.model.feedback.register_buffer(
                f"b{k}", _uniform((task.num_classes, units), init_bound(units), self.device))

    @torch.no_grad()
    def _hidden_shapes(self, task: Task) -> list[torch.Size]:
        """Per-example shape of every hidden block's output; eval mode, so nothing moves."""
        mode = self.net.training
        self.net.eval()
        h, shapes = torch.zeros(2, *task.input_shape, device=self.device), []
        for block in self.blocks[:-1]:
            h = block(h)
            shapes.append(h.shape[1:])
        self.net.train(mode)
        return shapes

    def feedbacks(self) -> list[Tensor | None]:
        return [getattr(self.model.feedback, f"b{k}") for k in range(len(self.blocks) - 1)]

    def objective(self, x: Tensor, y: Tensor, feedbacks: list[Tensor | None] | None = None,
                  error: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Every block runs on the detached output of the one below; the surrogate is the
        cross-entropy plus, for each hidden block, a zero whose backward injects B_l e at h_l
        (`_Inject`): its gradient in block l's parameters is block l's own backward of B_l e. `error` (dL/d logits) defaults to the batch's own;
        passing it shows that a hidden layer learns from the output only through it."""
        feedbacks = self.feedbacks() if feedbacks is None else feedbacks
        hidden, h = [], x
        for block in self.blocks:
            h = block(h.detach())
            hidden.append(h)
        logits = hidden.pop()
        loss = F.cross_entropy(logits, y)
        if error is None:
            with torch.no_grad():
                one_hot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
                error = (logits.softmax(1) - one_hot) / len(y)
        surrogate = loss
        for h, b in zip(hidden, feedbacks):
            surrogate = surrogate + _Inject.apply(h, (error @ b).view_as(h))
        return surrogate, loss
