"""Tests of gradlens.models: the MLP / ResNet / ViT families and the MultiTaskModel container."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradlens._errors import GradlensError
from gradlens.models import DEFAULT_DEPTH, FAMILIES, GRID, MultiTaskModel, build_model

HEADS = {"left": 10, "right": 3}
SHAPES = {
    "mlp": [(1, 8, 16), (16,)],
    "resnet": [(1, 8, 8), (1, 8, 16), (3, 32, 32)],
    "vit": [(1, 8, 8), (1, 8, 16), (3, 32, 32)],
}
CASES = [(f, s) for f in FAMILIES for s in SHAPES[f]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.mark.parametrize(("family", "shape"), CASES)
@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("depth", [1, 2])
def test_output_shapes_config_and_backward(family, shape, width, depth):
    m = build_model(family, HEADS, shape, width=width, depth=depth, seed=0)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    z = m.trunk(x)
    assert z.shape == (5, m.config["feature_dim"])
    out = m(x)
    assert {t: tuple(y.shape) for t, y in out.items()} == {"left": (5, 10), "right": (5, 3)}
    assert m.tasks == ("left", "right")
    assert set(m.heads) == set(HEADS)
    assert m.config == {
        "family": family,
        "width": width,
        "depth": depth,
        "input_shape": shape,
        "heads": HEADS,
        "feature_dim": m.config["feature_dim"],
    }
    sum(y.square().mean() for y in out.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    trunk_grad = sum(float(p.grad.abs().sum()) for p in m.trunk.parameters())
    assert trunk_grad > 0


def _mlp_count(shape, width, depth, heads):
    h = round(256 * width)
    n = math.prod(shape) * h + h + (depth - 1) * (h * h + h)
    return n, sum(h * k + k for k in heads.values())


def _resnet_count(shape, width, depth, heads):
    c_in = shape[0]
    c = round(16 * width)

    def block(ci, co):
        n = 9 * ci * co + 2 * co + 9 * co * co + 2 * co
        return n + (ci * co + 2 * co if ci != co else 0)

    n = 9 * c_in * c + 2 * c
    ch = c
    for co in (c, 2 * c, 4 * c):
        n += block(ch, co) + (depth - 1) * block(co, co)
        ch = co
    return n, sum(ch * k + k for k in heads.values())


def _vit_count(shape, width, depth, heads, patch):
    d = 4 * round(16 * width)
    tokens = (shape[1] // patch) * (shape[2] // patch)
    n = shape[0] * patch * patch * d + d + d + (tokens + 1) * d + 2 * d
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * d + 2 * d) + (2 * d * d + d)
    return n + depth * per_block, sum(d * k + k for k in heads.values())


@pytest.mark.parametrize(("family", "shape"), CASES)
def test_parameter_counts_match_closed_forms(family, shape):
    for width in GRID[family]["widths"]:
        for depth in GRID[family]["depths"]:
            m = build_model(family, HEADS, shape, width=width, depth=depth)
            counts = m.n_params()
            if family == "mlp":
                trunk, heads = _mlp_count(shape, width, depth, HEADS)
            elif family == "resnet":
                trunk, heads = _resnet_count(shape, width, depth, HEADS)
            else:
                trunk, heads = _vit_count(shape, width, depth, HEADS, m.trunk.patch_size)
            assert counts == {"trunk": trunk, "heads": heads, "total": trunk + heads}
            assert counts["total"] == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_grows_with_width_and_depth(family):
    shape = SHAPES[family][0]
    widths, depths = GRID[family]["widths"], GRID[family]["depths"]
    table = [
        [build_model(family, HEADS, shape, width=w, depth=d).n_params()["total"] for d in depths]
        for w in widths
    ]
    for row in table:
        assert row == sorted(set(row))  # strictly increasing in depth
    for col in zip(*table):
        assert list(col) == sorted(set(col))  # strictly increasing in width


@settings(max_examples=20)
@given(w1=st.floats(0.05, 4.0), w2=st.floats(0.05, 4.0), family=st.sampled_from(FAMILIES))
def test_parameter_count_monotone_in_width(w1, w2, family):
    lo, hi = sorted((w1, w2))
    shape = SHAPES[family][0]
    n_lo = build_model(family, HEADS, shape, width=lo, depth=1).n_params()["total"]
    n_hi = build_model(family, HEADS, shape, width=hi, depth=1).n_params()["total"]
    assert n_lo <= n_hi


def test_vit_patch_sizes_and_resnet_components():
    assert build_model("vit", HEADS, (1, 8, 8)).trunk.patch_size == 2
    assert build_model("vit", HEADS, (1, 8, 16)).trunk.patch_size == 2
    assert build_model("vit", HEADS, (3, 64, 64)).trunk.patch_size == 16
    resnet = build_model("resnet", HEADS, (1, 8, 8))
    kinds = {type(mod).__name__ for mod in resnet.modules()}
    assert {"BatchNorm2d", "BasicBlock", "Conv2d"} <= kinds
    vit = build_model("vit", HEADS, (1, 8, 8))
    kinds = {type(mod).__name__ for mod in vit.modules()}
    assert {"LayerNorm", "GELU", "Attention", "Linear"} <= kinds
    assert {
        f: build_model(f, HEADS, SHAPES[f][0]).config["depth"] for f in FAMILIES
    } == DEFAULT_DEPTH


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_determinism_without_touching_global_rng(family):
    shape = SHAPES[family][0]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(family, HEADS, shape, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # building with a seed leaves the global stream alone
    b = build_model(family, HEADS, shape, seed=7)
    c = build_model(family, HEADS, shape, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(4, *shape)
    a.eval()
    b.eval()
    assert all(torch.equal(a(x)[t], b(x)[t]) for t in HEADS)


def test_multitask_model_wraps_any_trunk():
    m = MultiTaskModel(nn.Linear(3, 4), {"a": nn.Linear(4, 2), "b": nn.Linear(4, 1)})
    out = m(torch.zeros(2, 3))
    assert out["a"].shape == (2, 2)
    assert out["b"].shape == (2, 1)
    assert m.n_params() == {"trunk": 16, "heads": 15, "total": 31}
    with pytest.raises(GradlensError, match="at least one task"):
        MultiTaskModel(nn.Linear(3, 4), {})


def test_build_model_errors():
    with pytest.raises(
        GradlensError, match=r"`family` should be one of \['mlp', 'resnet', 'vit'\]"
    ):
        build_model("transformer", HEADS, (1, 8, 8))
    with pytest.raises(GradlensError, match=r"`input_shape` for 'resnet' should be \(channels"):
        build_model("resnet", HEADS, (64,))
    with pytest.raises(GradlensError, match="`input_shape` should be a tuple of positive ints"):
        build_model("mlp", HEADS, (1, 0, 8))
    with pytest.raises(GradlensError, match="`width` should be a finite number > 0"):
        build_model("mlp", HEADS, (4,), width=0.0)
    with pytest.raises(GradlensError, match="`depth` should be an int >= 1; found 0"):
        build_model("vit", HEADS, (1, 8, 8), depth=0)
    with pytest.raises(GradlensError, match=r"`heads\['a'\]` should be an int >= 1"):
        build_model("mlp", {"a": 0}, (4,))
    with pytest.raises(GradlensError, match=r"without '\.'"):
        build_model("mlp", {"a.b": 2}, (4,))
    with pytest.raises(GradlensError, match="`seed` should be an int or None"):
        build_model("mlp", HEADS, (4,), seed=1.5)
