"""End-to-end backpropagation: the reference every other method is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ConfigError, HParams, Method, Task
from .nets import build_net


def cross_entropy_step(logits: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """One end-to-end update on the cross-entropy of `logits`: the whole of backprop's learning
    rule, shared by every backprop baseline so that they differ only in architecture."""
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


@dataclass
class BackpropConfig(HParams):
    """AdamW on cross-entropy; the NoProp paper's optimiser settings (Table 4) by default."""

    arch: Literal["cnn", "mlp"] = "cnn"
    width: int = 256  # MLP hidden units (ignored by cnn)
    depth: int = 2  # MLP hidden layers (ignored by cnn)
    # MLP biases; False is the bias-free net of PEPITA's reference code, for its backprop twin
    bias: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-3

    def validate(self) -> None:
        super().validate()
        if self.width < 1 or self.depth < 0:
            raise ConfigError(f"width must be >= 1 and depth >= 0, got {self.width}, {self.depth}")
        if not self.bias and self.arch != "mlp":
            raise ConfigError("bias=false applies to arch=mlp only (the shared CNN keeps its biases)")


class Backprop(Method):
    name = "backprop"
    family = "backprop"
    description = "End-to-end backpropagation with AdamW on the shared CNN or MLP"
    Config = BackpropConfig
    presets = {"default": {}, "quick": {}, "paper": {"lr": 1e-3, "weight_decay": 1e-3}}

    def __init__(self, task: Task, config: BackpropConfig) -> None:
        super().__init__(task, config)
        self.model = build_net(
            config.arch, task.input_shape, task.num_classes, config.width, config.depth, config.bias
        ).to(self.device)
        self.optimizers = {
            "adamw": self.make_optimizer(
                torch.optim.AdamW, self.model.parameters(), lr=config.lr,
                weight_decay=config.weight_decay,
            )
        }

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return cross_entropy_step(self.model(x), y, self.optimizers["adamw"])

    def capturable(self) -> bool:
        return True

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)
