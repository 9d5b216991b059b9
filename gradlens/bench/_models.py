"""The benchmark's own trunks (MLPs, a CNN, a small transformer), by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS"]

#: model name -> (trunk factory, input shape, feature dim)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {}


def _mlp(d_in: int, hidden: int, depth: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        return nn.Sequential(*layers)

    return make


def _cnn(width: int, blocks: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c = width
        for i in range(blocks):
            c2 = c * 2 if i % 2 == 1 else c
            stride = 2 if i % 2 == 1 else 1
            layers += [nn.Conv2d(c, c2, 3, padding=1, stride=stride), nn.BatchNorm2d(c2), nn.ReLU()]
            c = c2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 256), nn.ReLU()]
        return nn.Sequential(*layers)

    return make


class _Transformer(nn.Module):
    def __init__(self, d: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            ),
            layers,
            enable_nested_tensor=False,
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x))).mean(1)


MODELS.update(
    {
        "mlp-tiny": (_mlp(32, 64, 2), (32,), 64),
        "mlp-1m": (_mlp(512, 640, 3), (512,), 640),
        "mlp-10m": (_mlp(1024, 1536, 5), (1024,), 1536),
        "cnn-1m": (_cnn(48, 4), (3, 32, 32), 256),
        "cnn-10m": (_cnn(128, 5), (3, 32, 32), 256),
        "transformer": (lambda: _Transformer(192, 2, 32), (32, 16), 192),
    }
)
