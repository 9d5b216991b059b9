"""A zoo of small shared trunks with task heads, for engine equivalence tests.

Each entry builds ``(trunk, heads, make_batch)``; ``losses(trunk, heads, x, ys)`` gives one scalar
per task. Kept tiny so that the whole grid (models x engines x T x dtypes) runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

import gradlens as gl
from gradlens.testing import reference_grams


class TwiceMLP(nn.Module):
    """A Linear module used twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.relu(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


class Tied(nn.Module):
    """A Linear whose weight is also used functionally outside its forward (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.nn.functional.linear(h, self.a.weight)  # second use of a.weight
        return self.b(h)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(h)))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = nn.TransformerEncoderLayer(
            8, nhead=2, dim_feedforward=16, dropout=0.0, activation="gelu", batch_first=True
        )
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.block(self.embed(x))).mean(1))


class EmbedGRU(nn.Module):
    """Modules without a rule (Embedding, GRU) next to a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.gru = nn.GRU(6, 7, batch_first=True)
        self.fc = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.emb(x))
        return self.fc(out[:, -1])


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 5)
    )


def _cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, dilation=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), ResBlock(4), ResBlock(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )


def _frozen() -> nn.Module:
    m = _mlp()
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    return m


def _dropout() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 5), nn.Dropout(0.3)
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv1d(4, 4, 3, stride=2),
        nn.Flatten(), nn.Linear(4 * 5, 5),
    )


#: name -> (trunk factory, input factory (batch) -> x)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (_mlp, lambda b: torch.randn(b, 6)),
    "cnn_bn": (_cnn_bn, lambda b: torch.randn(b, 2, 7, 7)),
    "resnet": (_resnet, lambda b: torch.randn(b, 2, 6, 6)),
    "transformer": (Transformer, lambda b: torch.randn(b, 3, 4)),
    "twice": (TwiceMLP, lambda b: torch.randn(b, 6)),
    "frozen": (_frozen, lambda b: torch.randn(b, 6)),
    "dropout": (_dropout, lambda b: torch.randn(b, 6)),
    "tied": (Tied, lambda b: torch.randn(b, 6)),
    "embed_gru": (EmbedGRU, lambda b: torch.randint(0, 11, (b, 4))),
    "conv1d": (_conv1d, lambda b: torch.randn(b, 2, 12)),
}


def build(name: str, n_tasks: int, dtype: torch.dtype = torch.float64, batch: int = 6):
    """``(trunk, heads, x, ys)`` for one zoo entry; heads map the 5-dim features to 1 output."""
    make, make_x = ZOO[name]
    trunk = make().to(dtype)
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(n_tasks)]).to(dtype)
    x = make_x(batch)
    if x.is_floating_point():
        x = x.to(dtype)
    ys = torch.randn(n_tasks, batch, dtype=dtype)
    return trunk, heads, x, ys


def task_losses(trunk: nn.Module, heads: nn.ModuleList, x: torch.Tensor, ys: torch.Tensor,
                features: bool = False):
    """One forward; losses of varied scale and sign structure, keyed "t0", "t1", ..."""
    z = trunk(x)
    losses = {}
    for t, head in enumerate(heads):
        out = head(z).squeeze(1)
        losses[f"t{t}"] = ((out - ys[t]) ** 2).mean() * (1 + t % 3) + 0.1 * t * out.mean()
    return (losses, z) if features else losses


def assert_gram_close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Entrywise error relative to sqrt(G_ss G_tt): cosines agree to ``tol``."""
    d = torch.sqrt(torch.clamp(torch.diagonal(ref), min=0))
    scale = torch.clamp(d[:, None] * d[None, :], min=1e-300)
    err = ((got - ref).abs() / scale).max().item()
    assert err <= tol, f"relative Gram error {err:.3g} > {tol}"


def probe_matches_reference(
    prof: gl.Profiler,
    trunk: nn.Module,
    losses: Mapping[str, torch.Tensor],
    w: Mapping[str, float],
    params: Sequence[torch.Tensor],
) -> gl.Snapshot:
    """Probe ``losses`` with weights ``w`` (``params`` without ``.grad``) and assert the loop
    reference's Grams, total and per layer over the same layers, to 1e-10, and ``.grad`` equal
    to the plain weighted backward; returns the Snapshot."""
    ref = reference_grams(dict(losses), trunk)
    plain = torch.autograd.grad(
        sum(w[n] * v for n, v in losses.items()), list(params), retain_graph=True
    )
    snap = prof.backward(dict(losses), dict(w))
    assert snap is not None
    assert list(snap.layer_grams) == list(ref.layer_grams)
    assert_gram_close(snap.gram, ref.gram, 1e-10)
    for layer, g in ref.layer_grams.items():
        assert_gram_close(snap.layer_grams[layer], g, 1e-10)
    for p, g in zip(params, plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    return snap
