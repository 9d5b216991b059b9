"""The three model families: MLP, ResNet-style CNN, small ViT (trunks only; heads are linear)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__: list[str] = []


def _scaled(base: int, width: float, multiple: int = 1) -> int:
    """``base * width`` rounded to a positive multiple of ``multiple``."""
    return multiple * max(1, round(base * width / multiple))


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------

MLP_HIDDEN = 256


def _mlp_trunk(input_shape: tuple[int, ...], width: float, depth: int) -> tuple[nn.Module, int]:
    """Flatten, then ``depth`` blocks of Linear(h) + ReLU with ``h = round(256 * width)``."""
    hidden = _scaled(MLP_HIDDEN, width)
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(d_in, hidden), nn.ReLU()]
        d_in = hidden
    return nn.Sequential(*layers), hidden


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------

RESNET_BASE = 16


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet_trunk(input_shape: tuple[int, ...], width: float, depth: int) -> tuple[nn.Module, int]:
    """Stem, three stages of ``depth`` BasicBlocks (c, 2c, 4c channels, c = round(16 width)).

    Stages 2 and 3 halve the resolution. Inputs whose smaller side is >= 32 get an
    ImageNet-style stem (stride-2 conv and a max-pool, /4). Global average pooling gives ``4c``
    features.
    """
    c_in, h, w = input_shape
    c = _scaled(RESNET_BASE, width)
    big = min(h, w) >= 32
    stem: list[nn.Module] = [
        nn.Conv2d(c_in, c, 3, stride=2 if big else 1, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
    ]
    if big:
        stem.append(nn.MaxPool2d(3, stride=2, padding=1))
    layers: list[nn.Module] = [nn.Sequential(*stem)]
    channels = c
    for stage, c_out in enumerate((c, 2 * c, 4 * c)):
        blocks = [
            BasicBlock(channels if b == 0 else c_out, c_out, 2 if (stage > 0 and b == 0) else 1)
            for b in range(depth)
        ]
        layers.append(nn.Sequential(*blocks))
        channels = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


# --------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------

VIT_BASE = 64
VIT_HEADS = 4
VIT_MLP_RATIO = 2
VIT_MAX_TOKENS = 32


def vit_patch_size(h: int, w: int) -> int:
    """Patch size giving at most 32 patches: 8x8 -> 2, 8x16 -> 2, 32x32 -> 8, 64x64 -> 16.

    The smallest divisor of both sides that gets there; when no common divisor does (e.g.
    218x178), the smallest size that does, dropping the remainder pixels at the border.
    """
    fits = [p for p in range(1, min(h, w) + 1) if (h // p) * (w // p) <= VIT_MAX_TOKENS]
    exact = [p for p in fits if h % p == 0 and w % p == 0]
    return exact[0] if exact else fits[0]


class Attention(nn.Module):
    """Multi-head self-attention from two Linear layers (qkv and output projection)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the token axis of ``x`` (B, N, dim)."""
        B, N, D = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        )
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.n_heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One transformer block."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTTrunk(nn.Module):
    """Patch embedding, CLS token, learned positions, ``depth`` blocks, LayerNorm, CLS output."""

    def __init__(self, input_shape: tuple[int, ...], dim: int, depth: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.patch_size = p = vit_patch_size(h, w)
        n_tokens = (h // p) * (w // p)
        self.embed = nn.Conv2d(c, dim, p, stride=p)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, VIT_HEADS, VIT_MLP_RATIO) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, dim)``: the final CLS token."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.blocks(tokens))[:, 0]


def _vit_trunk(input_shape: tuple[int, ...], width: float, depth: int) -> tuple[nn.Module, int]:
    """ViT with ``dim = round(64 width)`` (a multiple of the 4 heads)."""
    dim = _scaled(VIT_BASE, width, VIT_HEADS)
    return ViTTrunk(input_shape, dim, depth), dim
