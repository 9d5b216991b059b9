"""Simplex grids, Dirichlet draws and the PBT perturbation rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlens import GradlensError
from gradlens.search import dirichlet_weights, grid_size, perturb_weights, simplex_grid


@given(T=st.integers(1, 6), k=st.integers(2, 6))
@settings(max_examples=40)
def test_grid_is_every_lattice_point_of_the_simplex(T, k):
    G = simplex_grid(T, k)
    m = k - 1
    # brute force: every vector of multiples of 1/m in [0, 1] summing to one
    brute = sorted(c for c in itertools.product(range(m + 1), repeat=T) if sum(c) == m)
    assert G.shape == (len(brute), T) == (grid_size(T, k), T) == (math.comb(m + T - 1, T - 1), T)
    assert sorted(tuple(round(v) for v in row * m) for row in G) == brute
    np.testing.assert_allclose(G.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (G >= 0).all()


def test_two_task_grid_is_linspace():
    np.testing.assert_allclose(simplex_grid(2, 11)[:, 0], np.linspace(0, 1, 11), atol=1e-15)


def test_grid_sizes_of_the_cost_table():
    # T = 6 tasks: 3 / 4 / 5 points per axis
    assert [grid_size(6, k) for k in (3, 4, 5)] == [21, 56, 126]


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 3), "n_tasks"), ((2, 1), "points"), ((2.5, 3), "n_tasks"), ((True, 3), "n_tasks")],
)
def test_grid_bad_input(args, match):
    with pytest.raises(GradlensError, match=match):
        simplex_grid(*args)


def test_dirichlet_is_seeded_and_on_the_simplex():
    a = dirichlet_weights(5, 100, 3)
    b = dirichlet_weights(5, 100, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    assert (a > 0).all()
    # mean of a symmetric Dirichlet is uniform; with alpha large the draws concentrate there
    tight = dirichlet_weights(5, 2000, 0, alpha=1000.0)
    assert np.abs(tight - 0.2).max() < 0.05
    loose = dirichlet_weights(5, 2000, 0, alpha=1.0)
    np.testing.assert_allclose(loose.mean(axis=0), 0.2, atol=0.01)


def test_dirichlet_bad_alpha():
    with pytest.raises(GradlensError, match="alpha"):
        dirichlet_weights(3, 2, 0, alpha=0.0)


@given(
    w=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60)
def test_multiplicative_perturbation_law(w, seed):
    """w' = w * f / sum(w * f) with every f_i in factors, and never all f_i equal."""
    factors = (0.8, 1.25)
    new = perturb_weights(w, np.random.default_rng(seed), factors=factors)
    w = np.asarray(w) / np.sum(w)
    assert new.sum() == pytest.approx(1.0, abs=1e-12)
    ratio = new / w  # = f_i / Z
    f_over = ratio / ratio.min()  # = f_i / min f: 1 or 1.25 / 0.8
    ok = np.isclose(f_over, 1.0, rtol=1e-9) | np.isclose(f_over, 1.25 / 0.8, rtol=1e-9)
    assert ok.all()
    assert not np.allclose(f_over, f_over[0])  # the point moved


def test_single_factor_leaves_the_point():
    w = perturb_weights([1.0, 3.0], np.random.default_rng(0), factors=(2.0,))
    np.testing.assert_allclose(w, [0.25, 0.75], atol=1e-15)


def test_resample_draws_from_dirichlet_with_the_callers_generator():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    new = perturb_weights([0.5, 0.5, 0.0], rng_a, resample_probability=1.0, alpha=2.0)
    rng_b.random()  # the coin flip
    np.testing.assert_array_equal(new, dirichlet_weights(3, 1, rng_b, alpha=2.0)[0])


def test_zero_weight_stays_zero_under_the_multiplicative_rule():
    new = perturb_weights([0.0, 0.3, 0.7], np.random.default_rng(1))
    assert new[0] == 0.0


def test_resample_frequency_matches_the_probability():
    rng = np.random.default_rng(0)
    n, p = 4000, 0.1
    # with factors (1,) the multiplicative rule never moves the point; a resample always does
    moved = sum(
        not np.allclose(perturb_weights([0.5, 0.5], rng, factors=(1.0,), resample_probability=p),
                        [0.5, 0.5])
        for _ in range(n)
    )  # fmt: skip
    assert abs(moved / n - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [-0.1, 1.1]}, "weights"),
        ({"weights": [0.0, 0.0]}, "weights"),
        ({"weights": [float("nan"), 1.0]}, "weights"),
        ({"weights": [0.5, 0.5], "factors": ()}, "factors"),
        ({"weights": [0.5, 0.5], "factors": (0.0, 1.0)}, "factors"),
        ({"weights": [0.5, 0.5], "resample_probability": 1.5}, "resample_probability"),
    ],
)
def test_perturb_bad_input(kwargs, match):
    w = kwargs.pop("weights")
    with pytest.raises(GradlensError, match=match):
        perturb_weights(w, np.random.default_rng(0), **kwargs)
