"""Architectures shared by the methods, so that methods differ only in how they learn.

`ImageBranch` is the NoProp paper's image encoder (Li, Teh, Pascanu 2025, Fig. 5): three
*unpadded* 3x3 convolutions (32, 64, 128 channels) with ReLU and dropout 0.2, 2x2 max-pooling
after the first and third, then a fully connected layer to 256 features and BatchNorm, with no
activation at the end. Unpadded convolutions are what reproduces the paper's Table 5 parameter
counts exactly (a one-hot MNIST block has 919,946 parameters).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def conv_output_hw(height: int, width: int) -> tuple[int, int]:
    """Spatial size after the image branch's conv/pool stack (unpadded 3x3, floor pooling)."""
    for pool in (True, False, True):
        height, width = height - 2, width - 2
        if pool:
            height, width = height // 2, width // 2
    return height, width


class FastDropout(nn.Dropout):
    """nn.Dropout with its mask drawn by torch.rand instead of bernoulli_: the same
    distribution (keep with probability 1 - p, scale kept values by 1 / (1 - p)), with a
    faster CPU kernel (the measurement is in docs/noprop.md, "Speed"). Needs p < 1."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return x * torch.rand_like(x).ge_(self.p).div_(1 - self.p)


class ImageBranch(nn.Module):
    """The paper's image encoder: (C, H, W) images -> `features` features (default 256).

    `batchnorm=False` ends with a ReLU instead of BatchNorm: the paper's continuous-time
    blocks (NoProp-CT/FM) use no BatchNorm. `fast_dropout=True` uses `FastDropout`.
    """

    def __init__(
        self, input_shape: tuple[int, ...], features: int = 256, dropout: float = 0.2,
        batchnorm: bool = True, fast_dropout: bool = False,
    ):
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = conv_output_hw(height, width)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {input_shape} is too small for the paper CNN (needs >= 14x14)")
        drop = FastDropout if fast_dropout else nn.Dropout
        self.layers = nn.Sequential(
            nn.Conv2d(channels, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            drop(dropout),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            drop(dropout),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            drop(dropout),
            nn.Flatten(),
            nn.Linear(128 * out_h * out_w, features),
            nn.BatchNorm1d(features) if batchnorm else nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """Image branch + ReLU + linear head: the plain classifier built on the paper's CNN.

    The ReLU is ours: the branch ends in BatchNorm with no activation (in NoProp it feeds a
    further MLP head), and a linear layer straight after it would add no capacity.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.features = ImageBranch(input_shape, dropout=dropout)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, then `depth` hidden layers of `width` ReLU units, then a linear output layer.

    `layers` holds only the nn.Linear modules, in order, so layer-local methods (forward
    gradient with activity perturbation, target propagation) can address each layer.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 256,
                 depth: int = 2, bias: bool = True):
        super().__init__()
        sizes = [math.prod(input_shape)] + [width] * depth + [num_classes]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = h.relu()
        return h


def flat_steps(net: nn.Module) -> list[nn.Module]:
    """A shared classifier (`MLP` or `CNN`) as one list of modules in forward order.

    Running the steps one after the other computes exactly `net(x)` (the MLP's flatten and
    ReLUs become modules of their own). Layer-local methods walk this list to treat each weight
    layer on its own; the modules are the net's own, so their parameters are the net's.
    """
    if isinstance(net, MLP):
        steps: list[nn.Module] = [nn.Flatten()]
        for i, layer in enumerate(net.layers):
            steps += [layer, nn.ReLU()] if i < len(net.layers) - 1 else [layer]
        return steps
    if isinstance(net, CNN):
        return [*net.features.layers, *net.head]
    raise TypeError(f"no flat form for {type(net).__name__}; expected methods.nets.MLP or CNN")


def build_net(arch: str, input_shape: tuple[int, ...], num_classes: int, width: int = 256,
              depth: int = 2, bias: bool = True) -> nn.Module:
    """The classifier named by a method's `arch` hyperparameter (`cnn` or `mlp`)."""
    if arch == "cnn":
        return CNN(input_shape, num_classes)
    if arch == "mlp":
        return MLP(input_shape, num_classes, width=width, depth=depth, bias=bias)
    raise ValueError(f"unknown arch {arch!r}; use cnn or mlp")


def network_id(arch: str, width: int = 256, depth: int = 2, bias: bool = True) -> str:
    """The stable name of a shared net, as records and published rows spell it.

    `cnn` is `CNN` (the NoProp image branch with a linear head); `mlp-<depth>x<width>-relu` is
    `MLP` with `depth` hidden layers of `width` ReLU units (`-nobias` when its linear layers
    have none). The input size is not part of the name: the dataset fixes it.
    """
    if arch == "cnn":
        return "cnn"
    if arch == "mlp":
        return f"mlp-{depth}x{width}-relu" + ("" if bias else "-nobias")
    raise ValueError(f"unknown arch {arch!r}; use cnn or mlp")
