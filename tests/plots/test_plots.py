"""Tests of gradlens.plots: every figure from a generated sweep, its data against numpy, its PNG
non-blank, tick labels that do not overlap at 40 tasks, no global matplotlib state touched."""

from __future__ import annotations

import dataclasses
import sys

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from gradlens import load_run, plots, stats
from gradlens._errors import GradlensError
from gradlens._types import TOTAL_LAYER
from gradlens.metrics import metrics_frame
from gradlens.plots._util import MIN_FONT, overlapping
from tests._sweepgen import make_run, make_sweep

SIZES = ((2, 32), (4, 128))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return make_sweep(root, sizes=SIZES, weights=(0.1, 0.3, 0.5, 0.7, 0.9), epochs=4)


@pytest.fixture(scope="module")
def table(sweep):
    return stats.runs_table(sweep)


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    return load_run(make_run(tmp_path_factory.mktemp("r6") / "run", n_tasks=6))


def _png_ok(path, min_bytes: int = 5_000) -> np.ndarray:
    """The saved PNG exists, is not tiny, and is not blank (pixel variance, non-white share)."""
    assert path.stat().st_size > min_bytes
    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] > 200
    assert img.shape[1] > 300
    assert img.std() > 0.05
    assert (img.min(axis=2) < 0.9).mean() > 0.02
    return img


def _visible(labels) -> list:
    return [lab for lab in labels if lab.get_visible() and lab.get_text()]


# --------------------------------------------------------------------------- heatmaps


def test_conflict_heatmap_values_match_numpy_and_png(run6, tmp_path):
    fig = plots.conflict_heatmap(run6)
    cos_img, freq_img = (ax.images[0].get_array() for ax in fig.axes[:2])
    G = run6.grams()  # (S, T, T)
    d = np.sqrt(np.einsum("sii->si", G))
    C = G / (d[:, :, None] * d[:, None, :])
    want_cos = C.mean(axis=0)
    want_freq = (C < 0).mean(axis=0)
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(np.asarray(cos_img)[off], want_cos[off], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(freq_img)[off], want_freq[off], rtol=1e-12)
    assert np.isnan(np.asarray(cos_img)[~off]).all()  # diagonal left grey
    lo, hi = fig.axes[0].images[0].get_clim()
    assert lo == -hi  # centred at 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(run6.tasks)
    assert len(fig.axes[0].texts) == 30  # annotated: 6 tasks <= 12
    _png_ok(plots.save(fig, tmp_path / "heat.png"))


def test_conflict_heatmap_pools_a_concatenated_frame_and_a_layer(run6):
    m = run6.metrics
    one = plots.conflict_heatmap(m, layer="block1")
    two = plots.conflict_heatmap(pd.concat([m, m]), layer="block1")
    np.testing.assert_allclose(
        np.asarray(one.axes[0].images[0].get_array()),
        np.asarray(two.axes[0].images[0].get_array()),
        rtol=1e-12,
    )
    assert "block1" in one.get_suptitle()


@pytest.mark.parametrize("names", ["plain", pytest.param("long", marks=pytest.mark.slow)])
def test_forty_tasks_tick_labels_do_not_overlap(tmp_path, names):
    rng = np.random.default_rng(0)
    T = 40
    tasks = [f"task{i:02d}" for i in range(T)]
    if names == "long":
        tasks = [f"Wearing_Necktie_attribute_{i:02d}" for i in range(T)]
    V = rng.normal(size=(3, 1, T, 8))
    G = V @ V.transpose(0, 1, 3, 2)
    fig = plots.conflict_heatmap(metrics_frame(G, tasks, layers=[TOTAL_LAYER]))
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = _visible(labels)
            assert len(shown) == T  # every task is named, none thinned out
            assert not overlapping(fig, shown, pad=0.0)
            assert min(lab.get_fontsize() for lab in shown) >= MIN_FONT
    assert not fig.axes[0].texts  # no cell numbers at T = 40
    _png_ok(plots.save(fig, tmp_path / f"heat40-{names}.png", dpi=60))


def test_layer_step_heatmap_is_the_mean_pairwise_cosine(run6, tmp_path):
    fig = plots.layer_step_heatmap(run6)
    img = np.asarray(fig.axes[0].images[0].get_array())
    A = run6.all_grams()  # (S, L, T, T)
    d = np.sqrt(np.einsum("slii->sli", A))
    C = A / (d[..., :, None] * d[..., None, :])
    iu = np.triu_indices(6, 1)
    want = C[..., iu[0], iu[1]].mean(axis=-1).T  # (L, S)
    np.testing.assert_allclose(img, want, rtol=1e-12)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "all shared"
    assert labels[1:] == list(run6.layers[1:])
    _png_ok(plots.save(fig, tmp_path / "layers.png"))
    binned = plots.layer_step_heatmap(run6, metric="conflict", max_columns=7)
    bimg = np.asarray(binned.axes[0].images[0].get_array())
    assert bimg.shape == (len(run6.layers), 7)
    assert np.nanmin(bimg) >= 0
    assert np.nanmax(bimg) <= 1
    assert "averaged into 7 columns" in binned.axes[0].get_xlabel()


def test_layer_step_heatmap_many_layers_readable(tmp_path):
    rng = np.random.default_rng(1)
    layers = [TOTAL_LAYER, *[f"encoder.layers.{i}.self_attn.out_proj" for i in range(60)]]
    V = rng.normal(size=(5, len(layers), 3, 4))
    fig = plots.layer_step_heatmap(
        metrics_frame(V @ V.transpose(0, 1, 3, 2), ["a", "b", "c"], layers=layers)
    )
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not overlapping(fig, _visible(ax.get_yticklabels()), pad=0.0)
    assert len(_visible(ax.get_yticklabels())) >= 15


# --------------------------------------------------------------------------- one run over time


def test_conflict_timeline_panels_and_epochs(sweep, tmp_path):
    run = load_run(sweep / "d4-w128" / "p0.70-s0")
    fig = plots.conflict_timeline(run)
    ax_c, ax_v = fig.axes
    assert ax_v.get_ylabel() == "accuracy (val)"
    epochs = stats.epoch_table(run)
    black = [c for c in ax_c.collections if c.get_label() == "per epoch"]
    assert len(black) == 1
    assert len(black[0].get_segments()) == len(epochs)
    mean_line = next(ln for ln in ax_v.get_lines() if ln.get_label() == "mean over tasks")
    np.testing.assert_allclose(mean_line.get_ydata(), epochs["score"].to_numpy(), rtol=1e-12)
    _png_ok(plots.save(fig, tmp_path / "timeline.png"))


def test_conflict_timeline_without_epoch_evals_says_so(tmp_path):
    run = load_run(make_run(tmp_path / "r", n_tasks=3, epochs=1, n_steps=3))
    fig = plots.conflict_timeline(run, split="train")
    assert "no per-epoch evals" in fig.axes[1].texts[0].get_text()


def test_timeline_draws_the_data_it_is_given(sweep, tmp_path):
    # compute apart from draw: timeline_data holds what the figure shows, and a changed table
    # is drawn as given (the figure computes nothing of its own from a TimelineData)
    run = load_run(sweep / "d4-w128" / "p0.70-s0")
    data = plots.timeline_data(run)
    pd.testing.assert_frame_equal(data.epochs, stats.epoch_table(run))
    conflict = run.metrics[(run.metrics.metric == "conflict") & (run.metrics.layer == TOTAL_LAYER)]
    want = conflict.assign(c=conflict.value > 0).groupby("step")["c"].mean()
    np.testing.assert_allclose(data.per_probe.to_numpy(), want.to_numpy(), rtol=0, atol=1e-15)
    half = dataclasses.replace(data, per_probe=data.per_probe / 2)
    fig = plots.conflict_timeline(half, title="half the conflict")
    dots = next(c for c in fig.axes[0].collections if c.get_label() == "per probe")
    np.testing.assert_allclose(dots.get_offsets()[:, 1], want.to_numpy() / 2)
    assert fig.axes[1].get_ylabel() == "accuracy (val)"
    _png_ok(plots.save(fig, tmp_path / "timeline-half.png"))


def test_only_the_tables_module_calls_stats():
    # the figure modules draw; the statistics they show are computed in plots/tables.py
    import ast
    from pathlib import Path

    callers = []
    for path in sorted(Path(plots.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and "stats" in (node.module + " " + " ".join(a.name for a in node.names))
            ):
                callers.append(path.name)
    assert set(callers) == {"tables.py"}


# --------------------------------------------------------------------------- across runs


def test_weight_vs_interference_one_colour_and_band_per_size(table, tmp_path):
    joint = table[table.n_tasks == 2]
    fig = plots.weight_vs_interference(joint, weight_col="weights.left")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == len(SIZES)
    assert all("params" in t for t in legend)
    assert len(ax.get_lines()) >= len(SIZES)  # a regression line per size
    from matplotlib.collections import PolyCollection

    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(SIZES)
    # the lines rise: the sweep plants more conflict at larger weights of the first task
    for line in ax.get_lines()[: len(SIZES)]:
        y = line.get_ydata()
        assert y[-1] > y[0]
    _png_ok(plots.save(fig, tmp_path / "wvi.png"))


def test_accuracy_vs_weight_marks_the_optimum(table, tmp_path):
    joint = table[table.n_tasks == 2]
    opt = stats.optimal_weight(joint, weight_col="weights.left", n_boot=100)
    fig = plots.accuracy_vs_weight(joint, weight_col="weights.left", optimum=opt)
    ax = fig.axes[0]
    from matplotlib.collections import PathCollection

    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    stars = [c for c in points if c.get_sizes().size and c.get_sizes()[0] == 180]
    got = sorted(tuple(c.get_offsets()[0]) for c in stars)
    want = sorted(zip(opt.p_star, opt.score_at_p_star))
    np.testing.assert_allclose(got, want)
    assert all(abs(p - 0.3) < 1e-12 for p, _ in got)  # the planted optimum
    _png_ok(plots.save(fig, tmp_path / "avw.png"))
    default = plots.accuracy_vs_weight(joint, weight_col="weights.left")
    assert "p* = 0.3" in default.axes[0].get_legend().get_texts()[0].get_text()


def test_accuracy_vs_weight_interval_not_containing_the_estimate(tmp_path):
    # a percentile interval of an argmax need not contain p*: matplotlib rejected the negative
    # error-bar length ("xerr must not contain negative values"); each side is clipped at zero
    w = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 2)
    t = pd.DataFrame({"w": w, "acc": 0.8 - (w - 0.3) ** 2, "size": [1, 2] * 5})
    opt = pd.DataFrame({"size": [1, 2], "p_star": [0.3, 0.3], "score_at_p_star": [0.8, 0.8],
                        "ci_low": [0.5, 0.1], "ci_high": [0.7, 0.2]})  # fmt: skip
    fig = plots.accuracy_vs_weight(t, weight_col="w", score_col="acc", size_col="size",
                                   optimum=opt)  # fmt: skip
    ax = fig.axes[0]
    spans = []
    for container in ax.containers:
        (seg,) = container.lines[2][0].get_segments()
        spans.append((float(seg[0][0]), float(seg[1][0])))
    # the bar covers [min(ci_low, p*), max(ci_high, p*)]
    np.testing.assert_allclose(sorted(spans), [(0.1, 0.3), (0.3, 0.7)], rtol=0, atol=1e-12)
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert legend == ["size=1: p* = 0.3 [0.5, 0.7]", "size=2: p* = 0.3 [0.1, 0.2]"]
    _png_ok(plots.save(fig, tmp_path / "outside.png"))


def test_gain_grid_cells_and_errors(table, tmp_path):
    gain = stats.joint_gain(table, size_cols=["model.depth", "model.width"], n_boot=100)
    at = gain[gain["weights.left"] == 0.3]
    fig = plots.gain_grid(at, panel="task", scale=100, digits=1, unit="points")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["task = left", "task = right"]
    left = at[at.task == "left"].set_index(["model.depth", "model.width"])
    texts = {t.get_text().split("\n")[0] for t in fig.axes[0].texts}
    assert texts == {f"{100 * g:+.1f}" for g in left["gain"]}
    img = np.asarray(fig.axes[0].images[0].get_array())
    assert np.isnan(img).sum() == 2  # (2, 128) and (4, 32) were not trained: grey cells
    _png_ok(plots.save(fig, tmp_path / "gain.png"))
    with pytest.raises(GradlensError, match="one row per"):
        plots.gain_grid(gain, panel="task")  # several weights per cell
    with pytest.raises(GradlensError, match="should have the columns"):
        plots.gain_grid(at, row="depth")


def test_pbt_schedules_stack_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for m in range(5):
        for e in range(6):
            w = rng.dirichlet(np.ones(3))
            rows += [{"member": m, "epoch": e, "task": t, "weight": x} for t, x in zip("abc", w)]
    sched = pd.DataFrame(rows)
    fig = plots.pbt_schedules(sched, max_cols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [f"member {m}" for m in range(5)]
    top = visible[0].collections[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)  # the weights of a member sum to 1 and are stacked
    _png_ok(plots.save(fig, tmp_path / "pbt.png"))
    with pytest.raises(GradlensError, match="non-negative"):
        plots.pbt_schedules(sched.assign(weight=-1.0))


# --------------------------------------------------------------------------- hygiene and errors


def test_no_global_matplotlib_state(run6):
    backend = matplotlib.get_backend()
    plots.conflict_heatmap(run6)
    plots.layer_step_heatmap(run6)
    assert matplotlib.get_backend() == backend
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        assert pyplot.get_fignums() == []


def test_user_strings_are_not_mathtext(tmp_path):
    G = np.tile(np.array([[1.0, -0.4], [-0.4, 1.0]]), (2, 1, 1, 1))
    fig = plots.conflict_heatmap(metrics_frame(G, ["$x^2$", "cost $"], layers=[TOTAL_LAYER]))
    _png_ok(plots.save(fig, tmp_path / "dollars.png"), min_bytes=2_000)
    assert fig.axes[0].get_xticklabels()[0].get_text() == r"\$x^2\$"


def test_bad_inputs_raise_clear_errors(run6):
    with pytest.raises(GradlensError, match="`run_or_metrics` should be a gradlens Run"):
        plots.conflict_heatmap([1, 2])
    with pytest.raises(GradlensError, match="`layer` should be one of"):
        plots.conflict_heatmap(run6, layer="nope")
    one = metrics_frame(np.ones((2, 1, 1, 1)), ["a"], layers=[TOTAL_LAYER])
    with pytest.raises(GradlensError, match="at least 2 tasks"):
        plots.conflict_heatmap(one)
    with pytest.raises(GradlensError, match="`metric` should be one of"):
        plots.layer_step_heatmap(run6, metric="norm")
    with pytest.raises(GradlensError, match="`max_columns` should be"):
        plots.layer_step_heatmap(run6, max_columns=1)
    with pytest.raises(GradlensError, match="should have the columns"):
        plots.weight_vs_interference(pd.DataFrame({"w": [1]}), weight_col="weights.a")
    with pytest.raises(GradlensError, match="at least one row"):
        plots.accuracy_vs_weight(
            pd.DataFrame(columns=["w", "accuracy.mean", "model.n_params"]), weight_col="w"
        )
    with pytest.raises(GradlensError, match="`fig` should be a matplotlib Figure"):
        plots.save("not a figure", "x.png")
