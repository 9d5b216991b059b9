"""Tests of gradlens.metrics against explicit gradient vectors, closed forms and properties."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradlens import TOTAL_LAYER, GradlensError, Snapshot
from gradlens import metrics as M

PAIR_FUNCS = [M.cosine, M.conflict, M.conflict_strength, M.gms]


def _gram(J: np.ndarray) -> np.ndarray:
    return J @ np.swapaxes(J, -1, -2)


def _random_jac(rng: np.random.Generator, batch: tuple[int, ...], T: int, P: int) -> np.ndarray:
    return rng.standard_normal((*batch, T, P))


# --------------------------------------------------------------------------- independent references


def _ref_pairwise(J: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair metrics of one set of gradient vectors J (T, P), by explicit loops."""
    T = J.shape[0]
    out = {k: np.full((T, T), np.nan) for k in ("cosine", "conflict", "strength", "gms")}
    for s in range(T):
        for t in range(T):
            a, b = np.linalg.norm(J[s]), np.linalg.norm(J[t])
            if a == 0 or b == 0:
                continue
            c = float(np.dot(J[s], J[t]) / (a * b))
            out["cosine"][s, t] = c
            out["conflict"][s, t] = 1.0 if c < 0 else 0.0
            out["strength"][s, t] = max(0.0, -c)
            out["gms"][s, t] = 2 * a * b / (a**2 + b**2)
    return out


def _ref_update(J: np.ndarray, w: np.ndarray, lr: float) -> dict[str, np.ndarray]:
    """Update metrics from vectors: linear losses L_t(theta) = <g_t, theta> change exactly by
    <g_t, step>, which is the first-order change for any loss with gradient g_t."""
    T = J.shape[0]
    d = (w[:, None] * J).sum(axis=0)
    theta = np.linspace(-1.0, 1.0, J.shape[1])
    step = -lr * d
    change = np.array([J[t] @ (theta + step) - J[t] @ theta for t in range(T)])
    matrix = np.array([[J[t] @ (-lr * w[s] * J[s]) for s in range(T)] for t in range(T)])
    cos_u = np.array([J[t] @ d / (np.linalg.norm(J[t]) * np.linalg.norm(d)) for t in range(T)])
    return {"change": change, "matrix": matrix, "cos_u": cos_u}


# --------------------------------------------------------------------------- against vectors


@pytest.mark.parametrize("T", [2, 3, 6])
def test_pairwise_metrics_match_explicit_vectors(T):
    rng = np.random.default_rng(T)
    J = _random_jac(rng, (), T, 11)
    G = _gram(J)
    ref = _ref_pairwise(J)
    np.testing.assert_allclose(M.norms(G), np.linalg.norm(J, axis=1), rtol=1e-12)
    np.testing.assert_allclose(M.cosine(G), ref["cosine"], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(M.conflict(G), ref["conflict"])
    np.testing.assert_allclose(M.conflict_strength(G), ref["strength"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(M.gms(G), ref["gms"], rtol=1e-12)
    n = np.linalg.norm(J, axis=1)
    assert M.norm_ratio(G) == pytest.approx(n.max() / n.min(), rel=1e-12)
    assert M.norm_cv(G) == pytest.approx(np.std(n) / np.mean(n), rel=1e-12)
    assert not M.zero_tasks(G).any()


@pytest.mark.parametrize("T", [2, 4])
def test_update_metrics_match_explicit_vectors(T):
    rng = np.random.default_rng(10 + T)
    J = _random_jac(rng, (), T, 9)
    G = _gram(J)
    w = rng.random(T) + 0.1
    lr = 0.03
    ref = _ref_update(J, w, lr)
    np.testing.assert_allclose(M.cos_to_update(G, w), ref["cos_u"], rtol=1e-12)
    np.testing.assert_allclose(M.loss_change(G, w, lr), ref["change"], rtol=1e-10, atol=1e-15)
    matrix = M.loss_change_matrix(G, w, lr)
    np.testing.assert_allclose(matrix, ref["matrix"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(matrix.sum(axis=-1), M.loss_change(G, w, lr), rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(matrix), -lr * w * np.linalg.norm(J, axis=1) ** 2)


def test_batch_dims_equal_per_slice_and_broadcast_weights():
    rng = np.random.default_rng(1)
    S, L, T = 3, 4, 5
    J = _random_jac(rng, (S, L), T, 7)
    G = _gram(J)
    w = rng.random((S, 1, T))
    lr = rng.random((S, 1)) / 10
    for f in PAIR_FUNCS:
        batched = f(G)
        assert batched.shape == (S, L, T, T)
        for s in range(S):
            for l in range(L):
                np.testing.assert_allclose(batched[s, l], f(G[s, l]), rtol=1e-14)
    for f, shape in ((M.norms, (S, L, T)), (M.norm_ratio, (S, L)), (M.norm_cv, (S, L))):
        assert f(G).shape == shape
        assert np.allclose(f(G)[2, 1], f(G[2, 1]))
    for f, args in ((M.cos_to_update, ()), (M.loss_change, (lr,)), (M.loss_change_matrix, (lr,))):
        batched = f(G, w, *args)
        for s in range(S):
            for l in range(L):
                one = f(G[s, l], w[s, 0], *(a[s, 0] for a in args))
                np.testing.assert_allclose(batched[s, l], one, rtol=1e-14)
    # (T,) weights broadcast over every batch entry
    np.testing.assert_allclose(
        M.cos_to_update(G, w[0, 0]), M.cos_to_update(G, np.tile(w[0], (S, L, 1)))
    )


def test_total_is_the_sum_of_layers():
    rng = np.random.default_rng(2)
    J_layers = _random_jac(rng, (3,), 4, 5)  # three layers, parameters disjoint
    J_total = np.concatenate(list(J_layers), axis=1)
    np.testing.assert_allclose(
        M.cosine(_gram(J_layers).sum(axis=0)), _ref_pairwise(J_total)["cosine"], rtol=1e-12
    )


# --------------------------------------------------------------------------- closed forms


def test_orthogonal_gradients():
    G = np.diag([1.0, 4.0, 9.0])
    cos = M.cosine(G)
    np.testing.assert_array_equal(cos, np.eye(3))
    np.testing.assert_array_equal(M.conflict(G), np.zeros((3, 3)))
    np.testing.assert_array_equal(M.conflict_strength(G), np.zeros((3, 3)))
    # equal weights on orthogonal unit gradients: each has cosine 1/sqrt(T) with the update
    np.testing.assert_allclose(M.cos_to_update(np.eye(4), np.ones(4)), np.full(4, 0.5))
    np.testing.assert_allclose(M.loss_change_matrix(G, np.ones(3), 1.0), -G)


def test_opposite_gradients():
    J = np.array([[1.0, 2.0, -1.0], [-3.0, -6.0, 3.0]])
    G = _gram(J)
    assert M.cosine(G)[0, 1] == -1.0
    assert M.conflict(G)[0, 1] == 1.0
    assert M.conflict_strength(G)[0, 1] == 1.0
    assert M.gms(G)[0, 1] == pytest.approx(2 * 3 / (1 + 9))
    # weights that cancel the update exactly: no direction, NaN; the loss change is 0
    w = np.array([3.0, 1.0])
    assert np.isnan(M.cos_to_update(G, w)).all()
    np.testing.assert_allclose(M.loss_change(G, w, 0.1), 0.0, atol=1e-14)


@pytest.mark.parametrize("c", [0.5, 1.0, 3.0, 1e3])
def test_scaled_copies(c):
    g = np.array([0.3, -1.2, 2.0, 0.5])
    G = _gram(np.stack([g, c * g]))
    assert M.cosine(G)[0, 1] == pytest.approx(1.0, abs=1e-15)
    assert M.conflict(G)[0, 1] == 0.0
    assert M.gms(G)[0, 1] == pytest.approx(2 * c / (1 + c**2), rel=1e-12)
    assert M.norm_ratio(G) == pytest.approx(max(c, 1 / c), rel=1e-12)
    assert M.norm_cv(G) == pytest.approx(abs(c - 1) / (c + 1), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(M.cos_to_update(G, np.array([1.0, 2.0])), [1.0, 1.0])


# --------------------------------------------------------------------------- properties

_entry = st.floats(-10, 10, allow_nan=False, allow_subnormal=False).map(
    lambda x: 0.0 if abs(x) < 1e-3 else x
)


@st.composite
def _jacobians(draw: st.DrawFn, min_tasks: int = 2) -> np.ndarray:
    T = draw(st.integers(min_tasks, 5))
    P = draw(st.integers(1, 6))
    return draw(hnp.arrays(np.float64, (T, P), elements=_entry))


@settings(max_examples=60)
@given(J=_jacobians(), data=st.data())
def test_permutation_equivariance(J, data):
    T = J.shape[0]
    perm = np.array(data.draw(st.permutations(range(T))))
    w = data.draw(hnp.arrays(np.float64, (T,), elements=st.floats(0, 5, allow_subnormal=False)))
    G, Gp = _gram(J), _gram(J[perm])
    for f in PAIR_FUNCS:
        np.testing.assert_allclose(f(Gp), f(G)[np.ix_(perm, perm)], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(M.zero_tasks(Gp), M.zero_tasks(G)[perm])
    np.testing.assert_allclose(M.norms(Gp), M.norms(G)[perm])
    np.testing.assert_allclose(M.norm_ratio(Gp), M.norm_ratio(G), rtol=1e-12)
    np.testing.assert_allclose(M.norm_cv(Gp), M.norm_cv(G), rtol=1e-12)
    np.testing.assert_allclose(
        M.cos_to_update(Gp, w[perm]), M.cos_to_update(G, w)[perm], rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(
        M.loss_change_matrix(Gp, w[perm], 0.1),
        M.loss_change_matrix(G, w, 0.1)[np.ix_(perm, perm)],
        rtol=1e-12,
    )


@settings(max_examples=60)
@given(J=_jacobians(), data=st.data())
def test_cosine_scale_invariance(J, data):
    T = J.shape[0]
    scale = data.draw(hnp.arrays(np.float64, (T,), elements=st.floats(0.01, 100)))
    G, Gs = _gram(J), _gram(scale[:, None] * J)
    np.testing.assert_allclose(M.cosine(Gs), M.cosine(G), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(M.conflict(Gs), M.conflict(G))
    # a common scale leaves GMS and the norm imbalance unchanged too
    c = float(scale[0])
    np.testing.assert_allclose(M.gms(c**2 * G), M.gms(G), rtol=1e-12)
    np.testing.assert_allclose(M.norm_ratio(c**2 * G), M.norm_ratio(G), rtol=1e-12)
    np.testing.assert_allclose(M.norm_cv(c**2 * G), M.norm_cv(G), rtol=1e-9)


@settings(max_examples=60)
@given(J=_jacobians(min_tasks=1), w=st.floats(0.0, 3.0, allow_subnormal=False))
def test_ranges_and_nan_only_for_zero_tasks(J, w):
    G = _gram(J)
    zero = M.zero_tasks(G)
    undefined = zero[:, None] | zero[None, :]
    for f, lo, hi in ((M.cosine, -1, 1), (M.gms, 0, 1), (M.conflict_strength, 0, 1)):
        v = f(G)
        np.testing.assert_array_equal(np.isnan(v), undefined)
        assert ((v[~undefined] >= lo) & (v[~undefined] <= hi)).all()
    assert set(np.unique(M.conflict(G)[~undefined])) <= {0.0, 1.0}
    assert np.isnan(M.norm_ratio(G)) == zero.any()
    assert zero.any() or M.norm_ratio(G) >= 1
    weights = np.full(J.shape[0], w)
    np.testing.assert_allclose(
        M.loss_change_matrix(G, weights, 0.5).sum(axis=-1), M.loss_change(G, weights, 0.5)
    )


# --------------------------------------------------------------------------- zero gradients


def _with_zero_task() -> np.ndarray:
    J = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 3.0]])
    return _gram(J)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_zero_gradient_task_is_nan_and_flagged_without_warnings(as_tensor):
    G = _with_zero_task()
    Gin = torch.from_numpy(G) if as_tensor else G
    w = np.array([1.0, 1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {f.__name__: np.asarray(f(Gin)) for f in [*PAIR_FUNCS, M.norm_ratio, M.norm_cv]}
        cos_u = np.asarray(M.cos_to_update(Gin, w))
        change = np.asarray(M.loss_change(Gin, w, 0.1))
        flags = np.asarray(M.zero_tasks(Gin))
        norms = np.asarray(M.norms(Gin))
    np.testing.assert_array_equal(flags, [False, True, False])
    for name in ("cosine", "conflict", "conflict_strength", "gms"):
        v = out[name]
        assert np.isnan(v[1]).all(), name
        assert np.isnan(v[:, 1]).all(), name
        assert not np.isnan(v[np.ix_([0, 2], [0, 2])]).any(), name
    assert out["cosine"][0, 0] == 1.0
    assert np.isnan(out["norm_ratio"])
    n = np.array([np.sqrt(5.0), 0.0, np.sqrt(10.25)])
    assert out["norm_cv"] == pytest.approx(np.std(n) / np.mean(n))
    assert norms[1] == 0.0
    assert np.isnan(cos_u[1])
    assert not np.isnan(cos_u[[0, 2]]).any()
    assert change[1] == 0.0


def test_all_zero_gram():
    G = np.zeros((2, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(M.cosine(G)).all()
        assert np.isnan(M.gms(G)).all()
        assert np.isnan(M.norm_cv(G)).all()
        assert np.isnan(M.cos_to_update(G, np.ones(3))).all()
        assert M.zero_tasks(G).all()


def test_rounding_negative_diagonal_counts_as_zero():
    G = np.array([[1.0, 0.0], [0.0, -1e-20]])
    assert M.zero_tasks(G).tolist() == [False, True]
    assert M.norms(G).tolist() == [1.0, 0.0]
    assert np.isnan(M.cosine(G)[0, 1])


# --------------------------------------------------------------------------- array types, errors


def test_tensor_in_tensor_out():
    rng = np.random.default_rng(3)
    G = _gram(_random_jac(rng, (2,), 3, 4))
    Gt = torch.from_numpy(G).float().requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 0.5])
    for f, args in [
        *((f, ()) for f in [*PAIR_FUNCS, M.norms, M.norm_ratio, M.norm_cv]),
        (M.cos_to_update, (w,)),
        (M.loss_change, (w, 0.1)),
        (M.loss_change_matrix, (w, 0.1)),
    ]:
        out_t = f(Gt, *args)
        out_n = f(G, *(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
        assert isinstance(out_t, torch.Tensor), f.__name__
        assert out_t.dtype == torch.float64, f.__name__
        assert isinstance(out_n, np.ndarray), f.__name__
        assert out_n.dtype == np.float64, f.__name__
        np.testing.assert_allclose(out_t.numpy(), out_n, rtol=1e-6, atol=1e-6)
    flags = M.zero_tasks(Gt)
    assert isinstance(flags, torch.Tensor)
    assert flags.dtype == torch.bool
    assert M.zero_tasks(G).dtype == np.bool_


def test_snapshot_delegates_to_metrics():
    G = torch.from_numpy(_with_zero_task())
    snap = Snapshot(
        step=0, tasks=("a", "b", "c"), gram=G, layer_grams={"l": G}, weights=torch.ones(3)
    )
    torch.testing.assert_close(snap.cosine(), M.cosine(G), equal_nan=True)
    torch.testing.assert_close(snap.cosine("l"), M.cosine(G), equal_nan=True)
    torch.testing.assert_close(snap.norms(), M.norms(G))
    assert snap.zero_tasks == ("b",)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: M.cosine(np.ones(3)),
            r"`G` should have shape \(\.\.\., T, T\).*found shape \(3,\)",
        ),
        (lambda: M.gms(np.ones((2, 3))), r"`G` should have shape.*found shape \(2, 3\)"),
        (lambda: M.cosine("abc"), r"`G` should be a torch.Tensor or numpy.ndarray.*found str"),
        (
            lambda: M.cos_to_update(np.eye(3), np.ones(2)),
            r"`w` should have shape \(\.\.\., T\) with T = 3.*\(2,\)",
        ),
        (
            lambda: M.loss_change(np.eye(3), np.ones(()), 0.1),
            r"`w` should have shape.*found shape \(\)",
        ),
        (
            lambda: M.loss_change(np.ones((4, 3, 3)), np.ones((2, 3)), 0.1),
            r"`w` leading dimensions \(2,\) do not broadcast",
        ),
        (
            lambda: M.loss_change(np.ones((4, 3, 3)), np.ones(3), np.ones(2)),
            r"`lr` should be a number or an array.*\(2,\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(GradlensError, match=match):
        call()


# --------------------------------------------------------------------------- metrics_frame


def test_metrics_frame_values_layout_and_dtypes():
    rng = np.random.default_rng(4)
    S, L, T = 3, 2, 4
    G = _gram(_random_jac(rng, (S, L), T, 6))
    G[1, 0, 2] = G[1, 0, :, 2] = 0.0  # task "c" has a zero gradient in layer "l1" at step 11
    w = rng.random((S, T))
    tasks, layers, steps = ["a", "b", "c", "d"], ["l1", TOTAL_LAYER], [10, 11, 20]
    df = M.metrics_frame(torch.from_numpy(G), tasks, weights=w, steps=steps, layers=layers)
    assert list(df.columns) == ["step", "layer", "metric", "task_i", "task_j", "value"]
    assert df["step"].dtype == np.int64
    assert df["value"].dtype == np.float64
    for col in ("layer", "metric", "task_i", "task_j"):
        assert pd.api.types.is_string_dtype(df[col]), col
    P = T * (T - 1) // 2
    assert len(df) == S * L * (3 * P + 2 * T + 2)
    assert df.metric.unique().tolist() == [
        "cosine",
        "conflict",
        "gms",
        "norm",
        "cos_to_update",
        "norm_ratio",
        "norm_cv",
    ]
    iu, ju = np.triu_indices(T, k=1)
    by_pair = {"cosine": M.cosine(G), "conflict": M.conflict(G), "gms": M.gms(G)}
    by_task = {"norm": M.norms(G), "cos_to_update": M.cos_to_update(G, w[:, None, :])}
    whole = {"norm_ratio": M.norm_ratio(G), "norm_cv": M.norm_cv(G)}
    for s, step in enumerate(steps):
        for l, layer in enumerate(layers):
            part = df[(df.step == step) & (df.layer == layer)]
            for name, arr in by_pair.items():
                rows = part[part.metric == name]
                assert rows.task_i.tolist() == [tasks[i] for i in iu]
                assert rows.task_j.tolist() == [tasks[j] for j in ju]
                np.testing.assert_array_equal(rows.value.to_numpy(), arr[s, l][iu, ju])
            for name, arr in by_task.items():
                rows = part[part.metric == name]
                assert rows.task_i.tolist() == tasks
                assert rows.task_j.tolist() == [""] * T
                np.testing.assert_array_equal(rows.value.to_numpy(), arr[s, l])
            for name, arr in whole.items():
                rows = part[part.metric == name]
                assert rows.task_i.tolist() == [""]
                assert rows.task_j.tolist() == [""]
                np.testing.assert_array_equal(rows.value.to_numpy(), [arr[s, l]])
    zero = df[(df.step == 11) & (df.layer == "l1") & (df.metric == "cosine")]
    assert zero[(zero.task_i == "c") | (zero.task_j == "c")].value.isna().all()
    assert df.step.is_monotonic_increasing


def test_metrics_frame_defaults_and_constant_weights():
    rng = np.random.default_rng(5)
    G = _gram(_random_jac(rng, (2, 3), 3, 4))
    df = M.metrics_frame(G, ["x", "y", "z"])
    assert "cos_to_update" not in set(df.metric)
    assert df.step.unique().tolist() == [0, 1]
    assert df.layer.unique().tolist() == ["0", "1", "2"]
    w = np.array([1.0, 2.0, 3.0])
    a = M.metrics_frame(G, ["x", "y", "z"], weights=w)
    b = M.metrics_frame(G, ["x", "y", "z"], weights=np.tile(w, (2, 1)))
    pd.testing.assert_frame_equal(a, b)


def test_metrics_frame_edge_sizes():
    empty = M.metrics_frame(np.zeros((0, 2, 3, 3)), ["a", "b", "c"])
    assert len(empty) == 0
    assert empty["value"].dtype == np.float64
    one = M.metrics_frame(np.ones((2, 1, 1, 1)), ["only"])
    assert one.metric.tolist() == ["norm", "norm_ratio", "norm_cv"] * 2
    assert one.value.tolist() == [1.0, 1.0, 0.0] * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"grams": np.ones((2, 3, 3))},
            r"`grams` should have shape \(S, L, T, T\).*found shape \(2, 3, 3\)",
        ),
        ({"tasks": ["a", "b"]}, r"`tasks` should name the 3 tasks.*found 2"),
        ({"tasks": ["a", "a", "b"]}, r"`tasks` should hold distinct names"),
        ({"layers": ["x"]}, r"`layers` should name the 2 layers.*found 1"),
        ({"steps": [0, 1, 2]}, r"`steps` should hold 2 integers.*shape \(3,\)"),
        ({"steps": [0.5, 1.0]}, r"`steps` should hold 2 integers.*float64"),
        (
            {"weights": np.ones((3, 3))},
            r"`weights` should have shape \(2, 3\).*found shape \(3, 3\)",
        ),
    ],
)
def test_metrics_frame_bad_input(kwargs, match):
    args = {"grams": np.ones((2, 2, 3, 3)), "tasks": ["a", "b", "c"], **kwargs}
    with pytest.raises(GradlensError, match=match):
        M.metrics_frame(**args)


# --------------------------------------------------------------------------- streaming summary

BINS = 400


def _stream(tasks, layers, grams, steps, **kw) -> M.StreamingSummary:
    s = M.StreamingSummary(tasks, layers, **kw)
    for g, step in zip(grams, steps):
        s.update(g, step=step)
    return s


def _batch_reference(grams: np.ndarray, steps: np.ndarray, halflife: float) -> dict:
    """Everything StreamingSummary reports, computed from all steps at once (shape (L, P))."""
    T = grams.shape[-1]
    iu, ju = np.triu_indices(T, k=1)
    cos = np.stack([_ref_pairwise_from_gram(g) for g in grams])[..., iu, ju]  # (N, L, P)
    ok = ~np.isnan(cos)
    beta = 2.0 ** (-1.0 / halflife)
    wts = beta ** (steps.max() - steps)[:, None, None] * ok
    with np.errstate(invalid="ignore"):
        return {
            "cos": cos,
            "count": ok.sum(axis=0),
            "undefined": (~ok).sum(axis=0),
            # NaN where a (layer, pair) has no defined cosine (np.nanmean would warn there)
            "mean": np.where(ok, cos, 0.0).sum(axis=0) / ok.sum(axis=0),
            "conflict_freq": (cos < 0).sum(axis=0) / ok.sum(axis=0),
            "ema": (wts * np.nan_to_num(cos)).sum(axis=0) / wts.sum(axis=0),
            "ema_conflict": (wts * (cos < 0)).sum(axis=0) / wts.sum(axis=0),
        }


def _ref_pairwise_from_gram(g: np.ndarray) -> np.ndarray:
    """Cosines of a (L, T, T) stack, independently of gradlens."""
    d = np.diagonal(g, axis1=-2, axis2=-1)
    out = np.full(g.shape, np.nan)
    L, T, _ = g.shape
    for l in range(L):
        for s in range(T):
            for t in range(T):
                if d[l, s] > 0 and d[l, t] > 0:
                    out[l, s, t] = g[l, s, t] / np.sqrt(d[l, s] * d[l, t])
    return out


def _random_stream(seed: int, N: int, L: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((N, L, T, 5))
    J[rng.random((N, L, T)) < 0.05] = 0.0  # some zero-gradient tasks
    steps = np.cumsum(rng.integers(0, 4, size=N))
    return _gram(J), steps


def test_streaming_equals_batch():
    grams, steps = _random_stream(0, 300, 2, 4)
    s = _stream(["a", "b", "c", "d"], ["l1", "l2"], grams, steps, bins=BINS, halflife=20.0)
    ref = _batch_reference(grams, steps, 20.0)
    res = s.result()
    shape = ref["count"].shape
    assert (ref["undefined"] > 0).any()
    np.testing.assert_array_equal(res["count"].to_numpy().reshape(shape), ref["count"])
    np.testing.assert_array_equal(res["undefined"].to_numpy().reshape(shape), ref["undefined"])
    for key in ("mean", "conflict_freq", "ema", "ema_conflict"):
        np.testing.assert_allclose(res[key].to_numpy().reshape(shape), ref[key], rtol=1e-12)
    for q in M.QUANTILES:
        col = res[f"q{round(q * 100):02d}"].to_numpy().reshape(shape)
        for l in range(shape[0]):
            for p in range(shape[1]):
                c = ref["cos"][:, l, p]
                exact = np.quantile(c[~np.isnan(c)], q, method="inverted_cdf")
                assert abs(col[l, p] - exact) <= 2.0 / BINS + 1e-12
    assert res.layer.tolist() == ["l1"] * 6 + ["l2"] * 6
    assert res.task_i.tolist()[:6] == ["a", "a", "a", "b", "b", "c"]
    assert s.last_step == steps[-1]


def test_streaming_quantiles_interpolate_inside_bins():
    s = M.StreamingSummary(["a", "b"], bins=4)  # bins [-1,-.5), [-.5,0), [0,.5), [.5,1]
    for k, c in enumerate([-0.9, -0.2, 0.1, 0.3, 0.7]):
        s.update(np.array([[1.0, c], [c, 1.0]]), step=k)
    res = s.result().iloc[0]
    # q05: rank 0.25 in bin 0 (1 obs) -> -1 + 0.25 * 0.5; q50: rank 2.5, bin 2 holds obs 3 and 4
    assert res.q05 == pytest.approx(-0.875)
    assert res.q50 == pytest.approx(0.0 + 0.5 * 0.25)
    assert res.q95 == pytest.approx(0.5 + 0.75 * 0.5)
    assert res["mean"] == pytest.approx(0.0)
    assert res.conflict_freq == pytest.approx(0.4)


def test_ranks_at_the_same_steps_average_the_moving_average():
    rng = np.random.default_rng(6)
    N, T = 40, 3
    a, b = _gram(rng.standard_normal((N, T, 4))), _gram(rng.standard_normal((N, T, 4)))
    steps = np.arange(N) * 10
    merged = _stream("xyz", None, a, steps, halflife=50.0).merge(
        _stream("xyz", None, b, steps, halflife=50.0)
    )
    mean_cos = (M.cosine(a) + M.cosine(b)) / 2
    beta = 2 ** (-1 / 50.0)
    wts = beta ** (steps[-1] - steps)
    iu, ju = np.triu_indices(T, 1)
    expected = (wts[:, None] * mean_cos[:, iu, ju]).sum(axis=0) / wts.sum()
    np.testing.assert_allclose(merged.result()["ema"].to_numpy(), expected, rtol=1e-12)


def _assert_same(a: M.StreamingSummary, b: M.StreamingSummary) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key in (
        "count",
        "undefined",
        "conflicts",
        "hist_index",
        "hist_count",
        "last_step",
        "tasks",
    ):
        assert da[key] == db[key], key
    for key in ("sum", "ema_num", "ema_conflict", "ema_den"):
        np.testing.assert_allclose(da[key], db[key], rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)),
    offsets=st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)),
)
def test_merge_is_associative_order_free_and_equals_batch(seed, sizes, offsets):
    tasks, layers = ["a", "b", "c"], ["l1", "l2"]
    parts, all_grams, all_steps = [], [], []
    for k, (n, off) in enumerate(zip(sizes, offsets)):
        grams, steps = _random_stream(seed * 3 + k, n, 2, 3)
        steps = steps + off
        parts.append(_stream(tasks, layers, grams, steps, bins=64, halflife=7.0))
        all_grams.append(grams)
        all_steps.append(steps)
    a, b, c = parts
    left = a.merge(b).merge(c)
    _assert_same(left, a.merge(b.merge(c)))
    _assert_same(left, c.merge(a).merge(b))
    _assert_same(left, b.merge(c.merge(a)))
    # the merged summary is the batch computation over the union of the observations
    grams, steps = np.concatenate(all_grams), np.concatenate(all_steps)
    res = left.result()
    if len(steps) == 0:
        assert (res["count"] == 0).all()
        assert res["mean"].isna().all()
        assert left.last_step is None
        return
    ref = _batch_reference(grams, steps, 7.0)
    shape = ref["count"].shape
    np.testing.assert_array_equal(res["count"].to_numpy().reshape(shape), ref["count"])
    with np.errstate(invalid="ignore"):
        ref_mean = np.nansum(ref["cos"], axis=0) / ref["count"]
    for key, expected in (
        ("mean", ref_mean),
        ("ema", ref["ema"]),
        ("conflict_freq", ref["conflict_freq"]),
    ):
        np.testing.assert_allclose(
            res[key].to_numpy().reshape(shape), expected, rtol=1e-10, atol=1e-12
        )
    one = M.StreamingSummary(tasks, layers, bins=64, halflife=7.0)
    for i in np.argsort(steps, kind="stable"):
        one.update(grams[i], step=int(steps[i]))
    _assert_same(left, one)


def test_merge_is_pure_and_checks_compatibility():
    grams, steps = _random_stream(7, 5, 1, 2)
    a = _stream(["a", "b"], None, grams[:, 0], steps)
    before = a.to_dict()
    a.merge(a)
    assert a.to_dict() == before
    assert a.merge(M.StreamingSummary(["a", "b"])).to_dict() == before
    with pytest.raises(GradlensError, match=r"`other` should have the same \(tasks, layers, bins"):
        a.merge(M.StreamingSummary(["a", "b"], bins=10))
    with pytest.raises(GradlensError, match=r"`other` should be a StreamingSummary; found dict"):
        a.merge({})  # type: ignore[arg-type]


def test_to_dict_json_round_trip():
    grams, steps = _random_stream(8, 30, 3, 3)
    s = _stream(["a", "b", "c"], ["x", "y", "z"], grams, steps, bins=50, halflife=3.0)
    t = M.StreamingSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert t.to_dict() == s.to_dict()
    pd.testing.assert_frame_equal(t.result(), s.result())
    t.update(grams[0], step=int(steps[-1]) + 1)  # the rebuilt summary keeps accumulating
    assert t.result()["count"].sum() > s.result()["count"].sum()
    with pytest.raises(GradlensError, match=r"`data` should be a dict written by StreamingSummary"):
        M.StreamingSummary.from_dict({"format": "other"})
    broken = s.to_dict() | {"count": [[1, 2]]}
    with pytest.raises(GradlensError, match=r"`data` should be a complete .*ValueError"):
        M.StreamingSummary.from_dict(broken)


def test_summary_update_accepts_tensors_and_default_steps():
    s = M.StreamingSummary(["a", "b"])
    s.update(torch.eye(2, dtype=torch.float32))
    s.update(torch.ones(2, 2))
    assert s.last_step == 1
    res = s.result()
    assert res.layer.tolist() == [TOTAL_LAYER]
    assert res["mean"].item() == pytest.approx(0.5)
    single = M.StreamingSummary(["a", "b"], layers=["only"])
    single.update(np.eye(2))
    single.update(np.eye(2)[None])
    assert single.result()["count"].item() == 2


def test_summary_zero_task_counts_as_undefined():
    s = M.StreamingSummary(["a", "b", "c"])
    s.update(_with_zero_task())
    res = s.result()
    assert res["undefined"].tolist() == [1, 0, 1]
    assert res["count"].tolist() == [0, 1, 0]
    assert res.loc[res["count"] == 0, ["mean", "q50", "conflict_freq", "ema"]].isna().all().all()
    assert M.StreamingSummary(["solo"]).result().empty


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.StreamingSummary([]), r"`tasks` should be a non-empty sequence of distinct"),
        (lambda: M.StreamingSummary(["a", "a"]), r"`tasks` should be .*found \['a', 'a'\]"),
        (lambda: M.StreamingSummary(["a"], layers=[]), r"`layers` should be a non-empty"),
        (lambda: M.StreamingSummary(["a"], bins=1), r"`bins` should be an int >= 2; found 1"),
        (
            lambda: M.StreamingSummary(["a"], halflife=0.0),
            r"`halflife` should be a finite number > 0; found 0.0",
        ),
        (
            lambda: M.StreamingSummary(["a", "b"]).update(np.eye(3)),
            r"`G` should have shape \(2, 2\).*found shape \(3, 3\)",
        ),
        (
            lambda: M.StreamingSummary(["a", "b"], ["x", "y"]).update(np.eye(2)),
            r"`G` should have shape \(2, 2, 2\).*layers",
        ),
        (
            lambda: M.StreamingSummary(["a", "b"]).update(np.eye(2), step=1.5),
            r"`step` should be an integer or None; found 1.5",
        ),
    ],
)
def test_summary_bad_input(call, match):
    with pytest.raises(GradlensError, match=match):
        call()


def test_summary_steps_must_not_decrease():
    s = M.StreamingSummary(["a", "b"])
    s.update(np.eye(2), step=5)
    s.update(np.eye(2), step=5)
    with pytest.raises(GradlensError, match=r"`step` should not decrease.*found 4 after 5"):
        s.update(np.eye(2), step=4)
