"""Fuzzing the engines: random models, every engine and route against the loop reference.

Hypothesis draws a shared trunk from the layers the rules serve and the ones they do not (Linear
with or without bias, frozen layers, LayerNorm with and without its affine parameters, GroupNorm,
BatchNorm in training and eval mode, convolutions plain, depthwise, over sequences and transposed,
embeddings with and without padding, multi-head attention with and without biases,
``nn.TransformerEncoderLayer`` post- and pre-norm, a GRU, residual blocks, a module called twice,
two modules holding one weight, activations with and without a legacy batching rule, ReLU in place
on a recorded output, dropout), its input (vectors, sequences, tokens, images), the heads (one per
task, or one shared head node split by task), the losses (squared, cross entropy, a head tied to a
shared weight, a second shared output computed from the first), the number of tasks, the loss
weights (zero and tiny ones included) or a Gram weighting (of the total Gram or per layer: the
weights must be those of the reference's Grams), a ``.grad`` already there half the time (it
accumulates), ``prof.observe`` (``.grad`` untouched, the graph kept for the caller's backward)
instead of ``prof.backward``, a loss scale (``grad_scale``: the Grams unscaled, ``.grad`` scaled)
and ``retain_graph``, a module frozen or unfrozen between the two probes, the engine, the gramian
engine's second-stage route (and the size above which its default loops a segment over the tasks),
the convolution rule's route (by cost, its kernel route always or never) and the memory budget
(small budgets force the chunked and per-task paths). Each probe must give
the loop reference's Grams, total and per layer, over the same layers, and ``.grad`` equal to the
weights' sum of the per-task gradients; two probes run on the same profiler, the second with
another batch size half the time (a new graph signature: nothing derived from the first graph may
serve it). Float64 throughout; a second test runs the same models in float32 under autocast (bf16,
fp16) against the documented tolerances.

It found three defects, fixed since and kept as plain tests (tests/engines/test_segments.py,
tests/engines/test_zoo_hf.py, tests/engines/test_capture.py, tests/test_amp.py): a trunk returning
a layer's output and a function of it (``z, f(z)``, as ``BertModel`` returns ``last_hidden_state``
and ``pooler_output``) had that layer's Gram miss or double the flow back through ``f`` under the
gramian engine (and so ``auto``); the features engine gave ``features=[z, f(z)]`` rows of two
kinds, by the task's weight; a half-precision loss under autocast with a layer on the generic path
raised a dtype error in the gramian engine.

The default runs draw 200, 60, 40, 40 and 25 cases (about 25 s); ``-m slow`` draws 2000 and 600. A
third test runs four steps on ``every=2``: the unprobed steps write the held weights; a fourth the
features engine; a fifth saves ``auto``'s decisions (``torch.save``, ``weights_only`` load) into a
fresh profiler, whose next probe must be served by the engine chosen, at the same step, exact.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradlens as gl
from gradlens.engines import gramian as gramian_mod
from gradlens.engines._base import resolve_shared
from gradlens.engines.rules import conv as conv_mod
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("loop", "batched", "gramian", "auto")
#: the gramian engine's second stage: default, vmapped everywhere, one backward per task
STAGES = (None, "vmap", "looped")
TOL = 1e-9
#: rounding noise of a layer's Gram, relative to the largest diagonal entry of the total Gram
NOISE = 1e-13


class _Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class _Twice(nn.Module):
    """One Linear called twice in a forward: a rule serves both calls."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


class _Attention(nn.Module):
    def __init__(self, d: int, bias: bool = True) -> None:
        super().__init__()
        heads = 2 if d % 2 == 0 else 1
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class _Tied(nn.Module):
    """Two Linear modules holding one weight (tying inside the shared part)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _SeqConv(nn.Module):
    """A Conv1d over the positions of a sequence (channels = features)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class _GRU(nn.Module):
    """A recurrent layer (no rule: the generic path), its output sequence."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gru = nn.GRU(d, d, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class _Pool(nn.Module):
    """Sequences and images to vectors (mean over positions / pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x  # the shared output may be a layer's own output
        return x.mean(dim=1) if x.ndim == 3 else x.mean(dim=(2, 3))


class _Trunk(nn.Module):
    """The drawn layers, then a pooled vector ``z``; ``second``: also a second output computed
    from ``z``, which one task's loss reads: ``"sin"`` (elementwise), ``"pooler"`` (a shared
    Linear and tanh, as Hugging Face's BertModel returns ``pooler_output`` beside
    ``last_hidden_state``) or ``"same"`` (``z`` itself, returned twice)."""

    def __init__(self, layers: list[nn.Module], second: str | None, d: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.pool = _Pool()
        self.second = second
        self.pooler = nn.Linear(d, d) if second == "pooler" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = self.pool(self.layers(x))
        if self.pooler is not None:
            return z, torch.tanh(self.pooler(z))
        if self.second == "same":  # the same tensor twice (``return z, z``)
            return z, z
        return z if self.second is None else (z, z.sin())


_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
    "dropout": lambda: nn.Dropout(0.5),
}  # fmt: skip


def _eval(m: nn.Module) -> nn.Module:
    """``m`` in eval mode for good (a probe's forward keeps it there)."""
    m.eval()
    m.train = lambda mode=True: m  # type: ignore[method-assign]  # Sequential.train() skips it
    return m


def _vector_layer(kind: str, d: int, seq: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, d)
    if kind == "linear-nobias":
        return nn.Linear(d, d, bias=False)
    if kind == "frozen":
        lin = nn.Linear(d, d)
        lin.requires_grad_(False)
        return lin
    if kind == "layernorm":
        return nn.LayerNorm(d)
    if kind == "residual":
        return _Residual(nn.Sequential(nn.Linear(d, d), nn.GELU()))
    if kind == "layernorm-plain":
        return nn.LayerNorm(d, elementwise_affine=False)
    if kind == "layernorm-nobias":
        return nn.LayerNorm(d, bias=False)
    if kind == "linear-relu-inplace":  # in place on a rule layer's recorded output
        return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True))
    if kind == "twice":
        return _Twice(d)
    if kind == "tied":
        return _Tied(d)
    if kind == "attention" and seq:
        return _Attention(d)
    if kind == "attention-nobias" and seq:
        return _Attention(d, bias=False)
    if kind == "conv1d" and seq:
        return _SeqConv(d)
    if kind in ("encoder-layer", "encoder-layer-prenorm") and seq:
        return nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
            norm_first=kind == "encoder-layer-prenorm",
        )  # fmt: skip
    if kind == "gru" and seq:
        return _GRU(d)
    return _ACTS.get(kind, nn.ReLU)()


def _image_layer(kind: str, c: int) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(c, c, 3, padding=1)
    if kind == "conv-nobias":
        return nn.Conv2d(c, c, 1, bias=False)
    if kind == "depthwise":
        return nn.Conv2d(c, c, 3, padding=1, groups=c)
    if kind == "batchnorm":
        return nn.BatchNorm2d(c)
    if kind == "conv-bn-relu-inplace":  # the torchvision block
        conv = nn.Conv2d(c, c, 3, padding=1)
        return nn.Sequential(conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True))
    if kind == "batchnorm-eval":
        return _eval(nn.BatchNorm2d(c))
    if kind == "transposed":  # no rule: the generic path
        return nn.ConvTranspose2d(c, c, 3, padding=1)
    if kind == "groupnorm":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c)
    if kind == "residual":
        return _Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()))
    return _ACTS.get(kind, nn.ReLU)()


VECTOR_KINDS = [
    "linear", "linear-nobias", "frozen", "layernorm", "layernorm-plain", "layernorm-nobias",
    "residual", "twice", "tied", "attention", "attention-nobias", "conv1d",
    "linear-relu-inplace", "encoder-layer", "encoder-layer-prenorm", "gru", *_ACTS,
]  # fmt: skip
IMAGE_KINDS = [
    "conv", "conv-nobias", "depthwise", "batchnorm", "batchnorm-eval", "groupnorm", "transposed",
    "conv-bn-relu-inplace", "residual", *_ACTS,
]  # fmt: skip


@dataclass
class _Case:
    trunk: _Trunk
    heads: nn.ModuleList
    make_x: Callable[[int], torch.Tensor]
    loss: str
    shared_head: bool
    tie: bool
    T: int

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.losses_from(self.trunk(x))

    def losses_from(self, out: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        z, z2 = out if isinstance(out, tuple) else (out, None)
        if self.shared_head:  # one node for all tasks: the heads share it
            ys = self.heads[0](z).unbind(1)
        else:
            ys = tuple(h(z).squeeze(1) for h in self.heads)
        losses = {}
        for t, y in enumerate(ys):
            if self.loss == "ce":
                target = torch.arange(y.shape[0]) % 2
                v = F.cross_entropy(torch.stack([y, -y], 1), target)
            else:
                v = ((y - 0.5 * t) ** 2).mean()
            if z2 is not None and t == self.T - 1:
                v = v + z2.square().mean()
            if self.tie and t == 0:  # a loss reaching a shared weight outside the outputs
                first = next(p for p in self.trunk.parameters() if p.requires_grad)
                v = v + 0.3 * first.square().sum()
            losses[f"t{t}"] = v * (1 + t)
        return losses


@st.composite
def _cases(draw: st.DrawFn) -> _Case:
    kind = draw(st.sampled_from(["vector", "sequence", "tokens", "image"]))
    d = draw(st.sampled_from([4, 6]))
    n = draw(st.integers(1, 4))
    layers: list[nn.Module] = []
    if kind == "image":
        layers.append(nn.Conv2d(3, d, 3, padding=1))
        layers += [_image_layer(draw(st.sampled_from(IMAGE_KINDS)), d) for _ in range(n)]
    else:
        if kind == "tokens":  # index 0 is padding half the time: its row gets no gradient
            layers.append(nn.Embedding(11, d, padding_idx=0 if draw(st.booleans()) else None))
        else:
            layers.append(nn.Linear(5, d))
        seq = kind != "vector"
        layers += [_vector_layer(draw(st.sampled_from(VECTOR_KINDS)), d, seq) for _ in range(n)]
    trunk = _Trunk(layers, draw(st.sampled_from([None, "sin", "pooler", "same"])), d)
    T = draw(st.integers(1, 4))
    shared_head = T > 1 and draw(st.booleans())
    heads = nn.ModuleList([nn.Linear(d, T)] if shared_head else [nn.Linear(d, 1) for _ in range(T)])

    def make_x(batch: int) -> torch.Tensor:
        if kind == "vector":
            return torch.randn(batch, 5, dtype=torch.float64)
        if kind == "sequence":
            return torch.randn(batch, 3, 5, dtype=torch.float64)
        if kind == "tokens":
            return torch.randint(0, 11, (batch, 3))
        return torch.randn(batch, 3, 4, 4, dtype=torch.float64)

    return _Case(
        trunk.double(), heads.double(), make_x, draw(st.sampled_from(["sq", "ce"])),
        shared_head, draw(st.booleans()), T,
    )  # fmt: skip


def _inverse_size(G: torch.Tensor) -> torch.Tensor:
    """A Gram weighting for the fuzz: smooth in the Gram, so rounding cannot move it."""
    return 1.0 / (1.0 + torch.diagonal(G))


def _check(
    case: _Case,
    engine: str,
    *,
    loop_above: int | None = None,
    conv_share: float | None = None,
    **probes: Any,
) -> None:
    """:func:`_check_probes` with the module constants a draw sets: segments above
    ``loop_above`` bytes loop over the tasks; the conv rule's kernel route where its flops are
    at most ``conv_share`` of the weight gradients' (0: never, 1e9: always)."""
    with _set(gramian_mod, "LOOP_ABOVE", loop_above), _set(conv_mod, "KERNEL_SHARE", conv_share):
        _check_probes(case, engine, **probes)


@contextlib.contextmanager
def _set(module: Any, name: str, value: object) -> Iterator[None]:
    """``module.name = value`` for the block (nothing for None)."""
    old = getattr(module, name)
    if value is not None:
        setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _check_probes(
    case: _Case,
    engine: str,
    stage: str | None,
    budget: int,
    rebatch: bool,
    ws: list[float],
    weighting: str | None = None,
    accumulate: bool = False,
    toggle: int | None = None,
    observe: bool = False,
    scale: float | None = None,
    retain: bool = False,
) -> None:
    tasks = [f"t{t}" for t in range(case.T)]
    fixed = {t: ws[i % len(ws)] for i, t in enumerate(tasks)}
    arg = {None: fixed, "total": _inverse_size, "per-layer": gl.per_layer(_inverse_size)}
    params = [p for m in (case.trunk, case.heads) for p in m.parameters() if p.requires_grad]
    layer_of = resolve_shared(case.trunk).layer_of
    with gl.Profiler(case.trunk, tasks, engine=engine, memory_budget=budget) as prof:
        if engine == "gramian":
            prof._engine.stage = stage  # type: ignore[attr-defined]  # the route under test
        for probe, batch in enumerate([3, 2 if rebatch else 3]):
            if probe == 1 and toggle is not None:  # a layer frozen or unfrozen between probes
                _toggle(case.trunk, toggle)
                params = [
                    p for m in (case.trunk, case.heads) for p in m.parameters() if p.requires_grad
                ]
            losses = case.losses(case.make_x(batch))
            ref = reference_grams(losses, case.trunk)
            each = [
                torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                for v in losses.values()
            ]
            # .grad accumulates into what is there, as a plain backward does
            prior = [torch.randn_like(p) if accumulate else None for p in params]
            for p, g in zip(params, prior):
                p.grad = None if g is None else g.clone()
            with warnings.catch_warnings():  # a task with a zero gradient (ReLU, dropout)
                warnings.simplefilter("ignore", gl.GradlensWarning)
                if observe:
                    snap = prof.observe(losses, arg[weighting], grad_scale=scale)
                else:
                    snap = prof.backward(
                        losses, arg[weighting], grad_scale=scale, retain_graph=retain
                    )
            assert snap is not None
            where = f"probe {probe}, engine {snap.engine}, weighting {snap.weighting_path}"
            assert list(snap.layer_grams) == list(ref.layer_grams) == list(prof.layers), where
            assert_gram_close(snap.gram, ref.gram, TOL)
            floor = NOISE * float(torch.diagonal(ref.gram).max())
            for layer, g in ref.layer_grams.items():
                _assert_layer_close(snap.layer_grams[layer], g, floor, f"{where}, layer {layer}")
            if weighting is not None:  # the weights are those of the reference's Grams
                want_w = _inverse_size(ref.gram)
                torch.testing.assert_close(snap.weights.double(), want_w, rtol=1e-8, atol=0)
            if observe:  # .grad untouched, and the graph kept for the caller's own backward
                for p, g in zip(params, prior):
                    assert (p.grad is None) if g is None else torch.equal(p.grad, g), where
                sum(losses.values()).backward()
                continue
            for i, p in enumerate(params):
                layer = layer_of.get(id(p))
                w = snap.layer_weights.get(layer, snap.weights)
                k = 1.0 if scale is None else scale  # .grad as scaler.scale(loss).backward()
                want = sum(
                    (k * float(w[t]) * g[i] for t, g in enumerate(each) if g[i] is not None),
                    torch.zeros_like(p) if prior[i] is None else prior[i],
                )
                got = torch.zeros_like(p) if p.grad is None else p.grad
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * k, msg=where)
            if retain:  # the graph kept for another backward
                torch.autograd.grad(sum(losses.values()), params, allow_unused=True)


def _toggle(trunk: nn.Module, k: int) -> None:
    """Flip ``requires_grad`` of the parameters of the k-th module holding some (modulo their
    number), unless that would leave the shared part with no trainable parameter."""
    mods = [m for m in trunk.modules() if any(q is not None for q in m._parameters.values())]
    own = [q for q in mods[k % len(mods)]._parameters.values() if q is not None]
    if all(q.requires_grad for q in own) and not any(
        q.requires_grad for q in trunk.parameters() if all(q is not o for o in own)
    ):
        return
    for q in own:
        q.requires_grad_(not q.requires_grad)


def _assert_layer_close(got: torch.Tensor, ref: torch.Tensor, floor: float, where: str) -> None:
    """As ``assert_gram_close``, with an absolute floor: a layer whose true gradient vanishes
    (the affine parameters of a norm layer followed by another norm layer) holds rounding noise
    of the layers around it, different in every exact computation."""
    d = torch.sqrt(torch.clamp(torch.diagonal(ref), min=0))
    bound = TOL * d[:, None] * d[None, :] + floor
    excess = ((got - ref).abs() - bound).max().item()
    assert excess <= 0, f"{where}: Gram error above the bound by {excess:.3g}"


_DRAW: dict[str, st.SearchStrategy[Any]] = dict(
    case=_cases(),
    engine=st.sampled_from(ENGINES),
    stage=st.sampled_from(STAGES),
    budget=st.sampled_from([256 * 2**20, 2**14, 2**10]),
    rebatch=st.booleans(),
    # loss weights: zero and tiny weights take the capture's per-task route (``task_scales``)
    ws=st.lists(st.sampled_from([0.0, 1e-9, 0.2, 0.5, 1.0, 3.0]), min_size=1, max_size=4),
    # or a Gram weighting, of the total Gram or of each layer's (gl.per_layer)
    weighting=st.sampled_from([None, None, "total", "per-layer"]),
    accumulate=st.booleans(),
    # before the second probe, the parameters of one module change requires_grad
    toggle=st.one_of(st.none(), st.integers(0, 7)),
    # prof.observe: measure only
    observe=st.booleans(),
    # the gramian engine's default second stage: every segment looped (0), some (64 bytes)
    loop_above=st.sampled_from([None, 0, 64]),
    # mixed precision's loss scale (float64 here: exact), the caller's retain_graph
    scale=st.sampled_from([None, None, 1024.0]),
    retain=st.booleans(),
    # the conv rule's route: by cost (the default), the kernel route always, never
    conv_share=st.sampled_from([None, 1e9, 0.0]),
)


@settings(max_examples=200)
@given(draw=st.fixed_dictionaries(_DRAW))
def test_random_models_match_the_loop_reference(draw):
    _check(**draw)


@pytest.mark.slow
@settings(max_examples=2000)
@given(draw=st.fixed_dictionaries(_DRAW))
def test_random_models_match_the_loop_reference_exhaustively(draw):
    _check(**draw)


# -- under autocast ------------------------------------------------------------------------------

#: Per-layer agreement with the loop reference on the same autocast forward. The engines that
#: backpropagate as the loop does round as it does (loop: measured <= 3e-7 over 1,500 random
#: models); the batched engine's vmapped kernels may round a few half-precision entries
#: differently (measured <= 2e-7 there, and 1.1e-4 in a later run with fp16 and a tied weight);
#: the gramian engine's rules form each weight gradient in float32 from the half-precision
#: inputs and output gradients where autograd rounds it to the half type, so it agrees to that
#: rounding, which the Grams of these tiny layers barely average out (measured <= 7.5e-3 bf16,
#: <= 2.9e-3 fp16; docs/real_setups.md).
AMP_TOL = {
    ("gramian", torch.bfloat16): 2e-2, ("gramian", torch.float16): 5e-3,
    ("loop", torch.bfloat16): 1e-4, ("loop", torch.float16): 1e-4,
    ("batched", torch.bfloat16): 1e-3, ("batched", torch.float16): 1e-3,
}  # fmt: skip


def _check_amp(case: _Case, engine: str, half: torch.dtype) -> None:
    torch.manual_seed(0)  # the same inputs when hypothesis replays a case
    case.trunk.float()
    case.heads.float()
    tasks = [f"t{t}" for t in range(case.T)]
    w = {t: 0.2 + 0.3 * i for i, t in enumerate(tasks)}
    with gl.Profiler(case.trunk, tasks, engine=engine) as prof:
        for probe in range(2):
            x = case.make_x(3)
            x = x.float() if x.is_floating_point() else x
            with torch.autocast("cpu", dtype=half):
                losses = case.losses(x)
            ref = reference_grams(losses, case.trunk)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gl.GradlensWarning)
                snap = prof.backward(losses, w)
            tol = AMP_TOL[(snap.engine, half)]
            floor = NOISE * float(torch.diagonal(ref.gram).max())
            for layer, g in ref.layer_grams.items():
                got = snap.layer_grams[layer]
                d = torch.sqrt(torch.clamp(torch.diagonal(g), min=0))
                excess = ((got - g).abs() - tol * d[:, None] * d[None, :] - floor).max().item()
                assert excess <= 0, f"probe {probe}, {snap.engine}, layer {layer}: {excess:.3g}"


_AMP = dict(
    case=_cases(),
    engine=st.sampled_from(ENGINES),
    half=st.sampled_from([torch.bfloat16, torch.float16]),
)


@settings(max_examples=60)
@given(**_AMP)
def test_random_models_under_autocast_match_the_loop_reference(case, engine, half):
    _check_amp(case, engine, half)


@pytest.mark.slow
@settings(max_examples=600)
@given(**_AMP)
def test_random_models_under_autocast_match_the_loop_reference_exhaustively(case, engine, half):
    _check_amp(case, engine, half)


# -- a schedule: unprobed steps between probes -------------------------------------------------


def _check_schedule(case: _Case, engine: str, weighting: str | None) -> None:
    """``every=2``: the unprobed steps write the plain weighted gradient, with a Gram
    weighting's weights held from the last probe (per layer with ``gl.per_layer``)."""
    tasks = [f"t{t}" for t in range(case.T)]
    fixed = {t: 0.3 + 0.2 * i for i, t in enumerate(tasks)}
    arg = {None: fixed, "total": _inverse_size, "per-layer": gl.per_layer(_inverse_size)}
    params = [p for m in (case.trunk, case.heads) for p in m.parameters() if p.requires_grad]
    layer_of = resolve_shared(case.trunk).layer_of
    held: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
    with gl.Profiler(case.trunk, tasks, engine=engine, every=2) as prof:
        for step in range(4):
            losses = case.losses(case.make_x(3))
            each = [
                torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
                for v in losses.values()
            ]
            for p in params:
                p.grad = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gl.GradlensWarning)
                snap = prof.backward(losses, arg[weighting])
            assert (snap is not None) == (step % 2 == 0), step
            if snap is not None:
                held = (snap.weights, dict(snap.layer_weights))
            if weighting is None:
                held = (torch.tensor([fixed[t] for t in tasks], dtype=torch.float64), {})
            assert held is not None
            for i, p in enumerate(params):
                w = held[1].get(layer_of.get(id(p)), held[0])  # type: ignore[arg-type]
                want = sum(
                    (float(w[t]) * g[i] for t, g in enumerate(each) if g[i] is not None),
                    torch.zeros_like(p),
                )
                got = torch.zeros_like(p) if p.grad is None else p.grad
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"step {step}")


@settings(max_examples=40)
@given(
    case=_cases(),
    engine=st.sampled_from(ENGINES),
    weighting=st.sampled_from([None, "total", "per-layer"]),
)
def test_random_models_on_a_schedule_write_the_held_weights(case, engine, weighting):
    _check_schedule(case, engine, weighting)


# -- the features engine: representation-level Grams -----------------------------------------


def _check_features(case: _Case, ws: list[float]) -> None:
    """``engine="features"``: the Gram of the tasks' gradients at the shared outputs given as
    ``features`` (all of them, concatenated), and ``.grad`` the plain weighted backward's."""
    tasks = [f"t{t}" for t in range(case.T)]
    w = {t: ws[i % len(ws)] for i, t in enumerate(tasks)}
    params = [p for m in (case.trunk, case.heads) for p in m.parameters() if p.requires_grad]
    with gl.Profiler(case.trunk, tasks, engine="features") as prof:
        for _ in range(2):
            x = case.make_x(3)
            out = case.trunk(x)
            zs = list(out) if isinstance(out, tuple) else [out]
            if len(zs) == 2 and zs[0] is zs[1]:  # one tensor given twice: one feature
                zs = zs[:1]
            losses = case.losses_from(out)
            # each task's gradient with respect to the features as the heads' inputs (a second
            # feature computed from the first is an input of its own: MGDA-UB's bound holds
            # for the representation as a whole)
            cut = [z.detach().requires_grad_() for z in zs]
            fed = (cut * 2)[:2] if isinstance(out, tuple) and len(cut) == 1 else cut
            parts = case.losses_from(tuple(fed) if isinstance(out, tuple) else cut[0])
            rows = []
            for v in parts.values():
                gs = torch.autograd.grad(v, cut, allow_unused=True, retain_graph=True)
                rows.append(torch.cat([
                    (torch.zeros_like(z) if g is None else g).flatten() for z, g in zip(cut, gs)
                ]))  # fmt: skip
            J = torch.stack(rows)
            plain = torch.autograd.grad(
                sum(w[t] * v for t, v in losses.items()), params, retain_graph=True,
                allow_unused=True,
            )  # fmt: skip
            for p in params:
                p.grad = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", gl.GradlensWarning)
                given = list(out) if isinstance(out, tuple) else out  # ``[z, z]`` as is
                snap = prof.backward(losses, w, features=given)
            assert snap is not None
            assert snap.level == "features"
            assert_gram_close(snap.gram, J @ J.T, TOL)
            for p, want in zip(params, plain):
                got = torch.zeros_like(p) if p.grad is None else p.grad
                want = torch.zeros_like(p) if want is None else want
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@settings(max_examples=40)
@given(
    case=_cases(),
    ws=st.lists(st.sampled_from([0.0, 1e-9, 0.2, 1.0, 3.0]), min_size=1, max_size=4),
)
def test_random_models_under_the_features_engine(case, ws):
    _check_features(case, ws)


# -- auto's decisions saved and restored -------------------------------------------------------


def _check_resume(case: _Case, weighting: str | None) -> None:
    """A profiler run until ``auto`` has decided, its state saved (``torch.save``, loaded back
    with ``weights_only=True``) and loaded into a fresh profiler: the next probe is served by the
    engine chosen, without timing again, at the same step, and exact."""
    tasks = [f"t{t}" for t in range(case.T)]
    arg = {None: None, "total": _inverse_size, "per-layer": gl.per_layer(_inverse_size)}[weighting]
    x = case.make_x(3)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gl.GradlensWarning)
        with gl.Profiler(case.trunk, tasks) as prof:
            for _ in range(40):
                snap = prof.backward(case.losses(x), arg)
            assert snap is not None
            chosen = snap.engine
            torch.save(prof.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        assert any(d.get("winner") for d in state["auto"]["decisions"]), "decided in 40 probes"
        with gl.Profiler(case.trunk, tasks) as resumed:
            resumed.load_state_dict(state)
            losses = case.losses(x)
            ref = reference_grams(losses, case.trunk)
            snap = resumed.backward(losses, arg)
    assert snap is not None
    assert snap.step == 40
    assert snap.engine == chosen
    assert not any(n.startswith("auto-chose") for n in snap.notes)
    assert_gram_close(snap.gram, ref.gram, TOL)


@settings(max_examples=25)
@given(case=_cases(), weighting=st.sampled_from([None, "total", "per-layer"]))
def test_random_models_resume_auto_s_decisions(case, weighting):
    _check_resume(case, weighting)
