"""The two 3-vs-7 classifiers of fast.ai chapter 4.

Both map a batch of flattened pixels scaled to [0, 1], shape [N, 784], to one logit per
image: the log-odds that the digit is a 7. `torch.sigmoid(logit)` is P(7).
"""

from __future__ import annotations

import torch
from torch import nn

from serving.contract import PIXELS

ARCHITECTURES = ("linear", "mlp")


def init_params(*size: int, std: float = 0.01) -> nn.Parameter:
    """Small random weights, drawn from torch's (seeded) global generator."""
    return nn.Parameter(torch.randn(*size) * std)


class Linear(nn.Module):
    """`linear1`: one weight per pixel plus a bias, `pixels @ weights + bias`."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = init_params(PIXELS)
        self.bias = init_params(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels @ self.weights + self.bias


class MLP(nn.Module):
    """`simple_net`: linear -> ReLU -> linear, with `hidden` units in between."""

    def __init__(self, hidden: int = 30) -> None:
        super().__init__()
        self.hidden = hidden
        self.w1 = init_params(PIXELS, hidden, std=PIXELS**-0.5)
        self.b1 = init_params(hidden)
        self.w2 = init_params(hidden, std=hidden**-0.5)
        self.b2 = init_params(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        activations = (pixels @ self.w1 + self.b1).clamp(min=0)
        return activations @ self.w2 + self.b2


def build_model(arch: str, hidden: int = 30) -> nn.Module:
    """The model for an architecture name (`linear` or `mlp`)."""
    if arch == "linear":
        return Linear()
    if arch == "mlp":
        return MLP(hidden)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
