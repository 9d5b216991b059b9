"""Tests of gradlens.train: config validation, determinism, baselines, resampling, weights,
checkpoints, early stopping and the planted gradient angle of the synthetic data."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradlens.train as gtrain
from gradlens import load_run
from gradlens._errors import GradlensError
from gradlens.data import expected_gradient_cosine, expected_gradient_gram
from gradlens.train import TrainConfig, Trainer, TrainResult, score, train
from gradlens.train._data import multidomain_losses
from tests._auto import fake_costs, force_auto
from tests._tiny import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def domains(**kw):
    """A two-domain DomainDigits run (imbalanced domain sizes)."""
    cfg = {
        "dataset": "domain_digits",
        "dataset_options": {"domains": ["original", "inverted"], "sizes": [300, 60]},
        "model": "mlp",
        "width": 0.125,
        "depth": 1,
        "batch_size": 40,
        "epochs": 1,
        "every": 1,
    }
    cfg.update(kw)
    return cfg


# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    cfg = TrainConfig()
    assert (cfg.dataset, cfg.model, cfg.optimizer, cfg.batch_size, cfg.engine, cfg.every) == (
        "multidigits",
        "mlp",
        "adam",
        128,
        "auto",
        10,
    )
    assert cfg.tasks is None
    assert cfg.weights is None
    assert cfg.depth is None
    full = TrainConfig(
        dataset="synthetic",
        dataset_options={"n": 100, "scales": (1.0, 2.0)},
        tasks=("task0",),
        width=1,
        weights={"task0": 2},
        weight_schedule=[{"epoch": 2, "weights": {"task0": 1}}, {"epoch": 1, "weights": {"a": 1}}],
        every="log:3",
        early_stopping=2,
        config={"note": "x", "grid": [1, 2]},
    )
    d = full.to_dict()
    assert TrainConfig.from_dict(d) == full
    assert isinstance(full.width, float)
    assert full.tasks == ["task0"]
    assert [e["epoch"] for e in full.weight_schedule] == [1, 2]  # sorted by epoch
    assert d["dataset_options"]["scales"] == [1.0, 2.0]  # JSON-able
    assert TrainConfig.from_dict(full) == full


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"epoch": 3}, r"Unknown TrainConfig field\(s\) \['epoch'\]; valid fields: .*'epochs'"),
        ({"dataset": "mnist"}, r"`dataset` should be one of .*'multidigits'.*found 'mnist'"),
        ({"model": "cnn"}, r"`model` should be one of \['mlp', 'resnet', 'vit'\]"),
        ({"optimizer": "rmsprop"}, r"`optimizer` should be one of \['sgd', 'adam'\]"),
        ({"engine": "fast"}, r"`engine` should be one of \['auto', 'batched', 'features', "
         r"'gramian'"),
        ({"lr": 0.0}, r"`lr` should be a finite number > 0; found 0.0"),
        ({"lr": math.inf}, r"`lr` should be a finite number"),
        ({"momentum": 1.0}, r"`momentum` should be a finite number >= 0 and < 1; found 1.0"),
        ({"width": -1}, r"`width` should be a finite number > 0; found -1"),
        ({"depth": 0}, r"`depth` should be an int >= 1; found 0"),
        ({"batch_size": 2.5}, r"`batch_size` should be an int >= 1"),
        ({"epochs": -1}, r"`epochs` should be an int >= 0"),
        ({"seed": True}, r"`seed` should be an int >= 0; found True"),
        ({"every": 0}, r"`every` should be a positive int .*'log' or 'log:N'.*found 0"),
        ({"every": "log:0"}, r"`every` should be a positive int"),
        ({"early_stopping": 0}, r"`early_stopping` should be an int >= 1"),
        ({"tasks": "left"}, r"`tasks` should be a sequence of task names; found str"),
        ({"tasks": ["a", "a"]}, r"`tasks` should be unique; found duplicates \['a'\]"),
        ({"weights": {"a": -1.0}}, r"`weights\['a'\]` should be a finite number >= 0"),
        ({"weights": {"a": 0.0, "b": 0}}, r"`weights` should have a positive sum"),
        ({"weights": [0.5, 0.5]}, r"`weights` should be a non-empty mapping"),
        ({"weight_schedule": [{"epoch": 1}]}, r"`weight_schedule\[0\]` should be"),
        (
            {"weight_schedule": [{"epoch": 1, "weights": {"a": 1}}] * 2},
            r"`weight_schedule` should name each epoch once",
        ),
        ({"device": "gpu7"}, r"`device` should be a torch device string"),
        ({"config": {"f": object()}}, r"`config` should hold JSON values"),
        ({"dataset_options": ["n", 3]}, r"`dataset_options` should be a dict"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    with pytest.raises(GradlensError, match=match):
        TrainConfig.from_dict(fields)


def test_from_dict_rejects_non_mappings():
    with pytest.raises(GradlensError, match=r"`config` should be a TrainConfig or a mapping"):
        TrainConfig.from_dict([("epochs", 1)])


def test_trainer_rejects_tasks_and_weights_that_do_not_fit_the_dataset():
    with pytest.raises(
        GradlensError, match=r"`tasks` should be tasks of the dataset.*\['middle'\]"
    ):
        Trainer(tiny(tasks=["left", "middle"]), progress=False)
    with pytest.raises(GradlensError, match=r"`weights` should have exactly the tasks"):
        Trainer(tiny(weights={"left": 1.0}), progress=False)
    with pytest.raises(GradlensError, match=r"Unknown option\(s\) \['size'\]"):
        Trainer(tiny(dataset_options={"size": 3}), progress=False)


# --------------------------------------------------------------------------------------------
# train(): the store, determinism, baselines
# --------------------------------------------------------------------------------------------


def test_train_writes_the_run_store(tmp_path):
    res = train(
        tiny(epochs=2, weights={"left": 1.0, "right": 3.0}), tmp_path / "run", progress=False
    )
    assert isinstance(res, TrainResult)
    assert (res.run_dir, res.epochs_run, res.stopped_early) == (tmp_path / "run", 2, False)
    run = load_run(tmp_path / "run")
    meta = run.meta
    assert meta["tasks"] == ["left", "right"]
    assert meta["kind"] == "multitask"
    assert meta["weights"] == {"left": 0.25, "right": 0.75}
    assert meta["scalarization"] == "loss_weights"
    assert meta["model"]["family"] == "mlp"
    assert meta["model"]["depth"] == 1
    assert meta["model"]["n_params"] == 128 * 32 + 32 + 2 * (32 * 10 + 10)
    assert meta["seed"] == 0
    assert meta["engine"] == "auto"
    assert meta["every"] == 2
    assert TrainConfig.from_dict(meta["config"]) == TrainConfig.from_dict(
        tiny(epochs=2, weights={"left": 1.0, "right": 3.0})
    )
    assert meta["dataset"]["name"] == "multidigits"
    assert meta["dataset"]["n"]["val"] == 160
    assert meta["epochs_run"] == 2
    assert meta["steps_run"] == 10
    # 160 samples / 32 = 5 steps per epoch, probed every 2nd step
    assert run.probed_steps.tolist() == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(run.weights(), [[0.25, 0.75]] * 5)
    ev = run.evals
    assert sorted(ev["point"].unique()) == ["epoch:1", "epoch:2", "final"]
    final = ev[ev["point"] == "final"]
    for split in ("val", "test"):
        for task in ("left", "right"):
            for metric, value in res.metrics[split][task].items():
                sel = final[
                    (final.split == split) & (final.task == task) & (final.metric == metric)
                ]
                assert sel["value"].tolist() == [value]
    epoch2 = ev[ev["point"] == "epoch:2"]
    assert set(epoch2["split"]) == {"val", "train"}
    assert epoch2["step"].unique().tolist() == [10]
    assert epoch2["epoch"].unique().tolist() == [2]
    # the epoch-2 validation metrics are those of the final model (no training in between)
    val2 = epoch2[epoch2.split == "val"].set_index(["task", "metric"])["value"]
    assert val2[("left", "accuracy")] == res.metrics["val"]["left"]["accuracy"]


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_same_config_gives_bit_identical_results(tmp_path, monkeypatch, engine):
    """With a named engine; with ``auto`` when both runs choose the same engine (two runs time
    separately, and may pick different exact engines: equal to float rounding only)."""
    if engine == "auto":
        force_auto(monkeypatch, "batched")
    a = train(tiny(epochs=2, engine=engine), tmp_path / "a", progress=False)
    b = train(tiny(epochs=2, engine=engine), tmp_path / "b", progress=False)
    assert a.metrics == b.metrics
    ra, rb = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    np.testing.assert_array_equal(ra.all_grams(), rb.all_grams())
    c = train(tiny(epochs=2, seed=1, engine=engine), None, progress=False)
    assert c.metrics != a.metrics


def test_single_task_baseline_is_the_same_call_with_one_task(tmp_path):
    res = train(tiny(tasks=["right"]), tmp_path / "run", progress=False)
    assert list(res.metrics["test"]) == ["right"]
    run = load_run(tmp_path / "run")
    assert run.tasks == ("right",)
    assert run.meta["weights"] == {"right": 1.0}
    assert run.grams().shape == (3, 1, 1)
    assert np.all(run.grams() > 0)
    # the model has only the right head
    assert run.meta["model"]["n_params"] == 128 * 32 + 32 + 32 * 10 + 10


def test_tasks_are_passed_to_a_dataset_that_selects_them():
    # "mod3" is not among digit_attributes' default tasks: it is requested through the option
    with Trainer(
        tiny(dataset="digit_attributes", dataset_options={}, tasks=["mod3", "parity"]),
        progress=False,
    ) as t:
        assert t.tasks == ("mod3", "parity")
        assert t.data.info["mod3"].n_outputs == 3
        assert t.data.options["tasks"] == ["mod3", "parity"]


def test_data_seed_is_separate_from_the_training_seed():
    with Trainer(tiny(seed=3, dataset_options={"n": 64, "seed": 0}), progress=False) as a:
        with Trainer(tiny(seed=0, dataset_options={"n": 64}), progress=False) as b:
            assert torch.equal(a.data.splits["train"].X, b.data.splits["train"].X)
            assert not torch.equal(a.model.trunk[1].weight, b.model.trunk[1].weight)
            assert a.data.describe()["seed"] == 0


def test_regression_metrics_are_named_and_consistent():
    with Trainer(
        {"dataset": "synthetic", "dataset_options": {"n": 120}, "width": 0.125, "batch_size": 30},
        progress=False,
    ) as t:
        t.fit_epochs(1)
        m = t.evaluate("test")
        d = t.data.splits["test"]
        with torch.no_grad():
            pred = t.model(d.X)["task1"].squeeze(1).double()
        y = d.Y["task1"].double()
        mse = float(((pred - y) ** 2).mean())
        assert m["task1"]["mse"] == m["task1"]["loss"]
        assert m["task1"]["mse"] == pytest.approx(mse, rel=1e-6)
        assert m["task1"]["r2"] == pytest.approx(1 - mse / float(y.var(unbiased=False)), rel=1e-6)
        assert score(m) == pytest.approx((m["task0"]["r2"] + m["task1"]["r2"]) / 2)


def test_score_and_its_errors():
    assert score({"a": {"accuracy": 1.0}, "b": {"r2": 0.5}}) == 0.75
    with pytest.raises(GradlensError, match=r"`metrics\['a'\]` should hold 'accuracy' or 'r2'"):
        score({"a": {"loss": 1.0}})
    with pytest.raises(GradlensError, match=r"`metrics` should be a non-empty mapping"):
        score({})


def test_features_engine_and_log_schedule(tmp_path):
    train(tiny(engine="features", every="log:2"), tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.meta["level"] == "features"
    assert run.probed_steps.tolist() == [0, 1, 3]  # LogSpaced(2) over 5 steps


def test_progress_bar_shows_each_epoch_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm draws only on a terminal
    train(tiny(), None, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1" in err
    assert "step" in err
    train(tiny(), None, progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# Multi-domain: resampling
# --------------------------------------------------------------------------------------------


def test_domain_losses_weighted_by_batch_share_equal_the_batch_mean():
    torch.manual_seed(1)
    trunk = torch.nn.Linear(4, 3)
    model = torch.nn.Module()
    model.trunk = trunk
    model.heads = torch.nn.ModuleDict({"label": torch.nn.Linear(3, 5)})
    x, y = torch.randn(12, 4), torch.randint(0, 5, (12,))
    dom = torch.tensor([0, 2, 2, 0, 0, 2, 0, 0, 2, 0, 0, 0])
    losses, shares, _ = multidomain_losses(model, x, y, dom, 3)
    assert losses[1] is None
    assert shares.tolist() == [8 / 12, 0.0, 4 / 12]
    total = shares[0] * losses[0] + shares[2] * losses[2]
    full = F.cross_entropy(model.heads["label"](trunk(x)), y)
    torch.testing.assert_close(total.float(), full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        losses[2], F.cross_entropy(model.heads["label"](trunk(x[dom == 2])), y[dom == 2])
    )


def test_resampling_draws_domains_with_the_given_probabilities(tmp_path):
    p = {"original": 0.25, "inverted": 0.75}  # the opposite of the 300:60 domain sizes
    res = train(domains(weights=p, epochs=2), tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.meta["kind"] == "multidomain"
    assert run.meta["scalarization"] == "resampling"
    assert run.meta["weights"] == p
    shares = run.weights()  # per probed step: each domain's share of the batch
    B = 40
    np.testing.assert_allclose(shares.sum(1), 1.0)
    # shares are multiples of 1 / B (stored through the profiler's float32 weights)
    np.testing.assert_allclose(shares * B, np.round(shares * B), rtol=0, atol=1e-5)
    # 360 samples / 40 = 9 steps per epoch, 18 batches of 40 = 720 draws; binomial standard error
    n_draws = len(shares) * B
    assert len(shares) == 18
    se = math.sqrt(0.25 * 0.75 / n_draws)
    assert abs(shares[:, 0].mean() - 0.25) < 4 * se
    # metrics per domain
    assert set(res.metrics["val"]) == {"original", "inverted"}
    assert set(res.metrics["val"]["inverted"]) == {"accuracy", "loss"}


def test_resampling_with_a_zero_probability_never_draws_that_domain(tmp_path):
    res = train(domains(weights={"original": 1.0, "inverted": 0.0}), tmp_path / "r", progress=False)
    run = load_run(tmp_path / "r")
    assert np.all(run.weights()[:, 1] == 0.0)
    # no samples, no gradient: its Gram row is zero and its cosines NaN, without a warning
    assert np.all(run.grams()[:, 1, 1] == 0.0)
    assert math.isfinite(res.metrics["test"]["inverted"]["accuracy"])


def test_domain_subset_filters_samples():
    with Trainer(
        domains(dataset_options={"sizes": 50}, tasks=["rotated", "original"]), progress=False
    ) as t:
        assert t.tasks == ("rotated", "original")
        counts = torch.bincount(t.data.splits["train"].Y["domain"], minlength=2)
        assert counts.tolist() == [50, 50]


# --------------------------------------------------------------------------------------------
# Weights: setter, schedule, recording
# --------------------------------------------------------------------------------------------


def test_weight_changes_are_recorded_and_used(tmp_path):
    t = Trainer(tiny(every=1), tmp_path / "run", progress=False)
    t.weights = {"left": 1.0, "right": 3.0}  # before training: the initial weights
    assert t.store.meta["weights"] == {"left": 0.25, "right": 0.75}
    t.weights = {"left": 1.0, "right": 1.0}
    t.fit_epochs(1)
    t.weights = {"left": 1.0, "right": 0.0}
    t.weights = {"left": 0.0, "right": 2.0}  # replaces the change at the same step
    assert t.weights == {"left": 0.0, "right": 1.0}
    t.fit_epochs(1)
    with pytest.raises(GradlensError, match=r"`weights\['left'\]` should be a finite number >= 0"):
        t.weights = {"left": -1.0, "right": 1.0}
    with pytest.raises(GradlensError, match=r"`weights` should be a mapping task -> weight"):
        t.weights = None
    t.finish()
    run = load_run(tmp_path / "run")
    assert run.meta["weights"] == {"left": 0.5, "right": 0.5}
    assert run.meta["weight_schedule"] == [
        {"epoch": 0, "step": 0, "weights": {"left": 0.5, "right": 0.5}},
        {"epoch": 1, "step": 5, "weights": {"left": 0.0, "right": 1.0}},
    ]
    w = run.weights()
    np.testing.assert_array_equal(w[:5], [[0.5, 0.5]] * 5)
    np.testing.assert_array_equal(w[5:], [[0.0, 1.0]] * 5)
    with pytest.raises(GradlensError, match=r"Cannot set the weights: this Trainer is finished"):
        t.weights = {"left": 1.0, "right": 1.0}
    with pytest.raises(GradlensError, match=r"Cannot train"):
        t.fit_epochs(1)


def test_weight_schedule_from_the_config(tmp_path):
    sched = [{"epoch": 1, "weights": {"left": 0.9, "right": 0.1}}]
    train(tiny(epochs=2, every=5, weight_schedule=sched), tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert [e["step"] for e in run.meta["weight_schedule"]] == [0, 5]
    np.testing.assert_allclose(run.weights(), [[0.5, 0.5], [0.9, 0.1]])
    with pytest.raises(GradlensError, match=r"`weight_schedule` should have exactly the tasks"):
        Trainer(tiny(weight_schedule=[{"epoch": 1, "weights": {"x": 1}}]), progress=False)


def test_weighted_loss_reaches_the_gradient():
    # with all weight on "left", the right head receives no gradient: it does not move
    with Trainer(tiny(weights={"left": 1.0, "right": 0.0}, optimizer="sgd"), progress=False) as t:
        before = t.model.heads["right"].weight.detach().clone()
        left = t.model.heads["left"].weight.detach().clone()
        t.fit_epochs(1)
        assert torch.equal(t.model.heads["right"].weight, before)
        assert not torch.equal(t.model.heads["left"].weight, left)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny, domains])
def test_state_dict_round_trip_continues_identically(tmp_path, monkeypatch, make):
    # auto is still timing at the checkpoint (3 probes in the first epoch): its second round runs
    # on in both runs, so its timings must not depend on the machine (a fake clock; the costs
    # within CLOSE of each other, so every candidate is timed again after the checkpoint):
    # measured, the candidates are within a few % here and either run could pick any of them
    fake_costs(monkeypatch, {"loop": 1.2, "batched": 1.0, "gramian": 1.1, "gramian-vmap": 1.3})
    a = Trainer(make(dataset_options={**make()["dataset_options"], "seed": 0}), progress=False)
    a.fit_epochs(1)
    a.weights = {t: float(i + 1) for i, t in enumerate(a.tasks)}
    saved_step = a.step
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    want = a.fit_epochs(1)
    want_params = [p.detach().clone() for p in a.model.parameters()]
    # another seed: different initial model and batch order, same data
    b = Trainer(
        make(seed=5, dataset_options={**make()["dataset_options"], "seed": 0}),
        tmp_path / "b",
        progress=False,
    )
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert (b.epoch, b.step, b.weights) == (1, saved_step, a.weights)
    got = b.fit_epochs(1)
    assert got == want
    for p, q in zip(b.model.parameters(), want_params):
        assert torch.equal(p, q)
    b.finish()
    a.close()
    run = load_run(tmp_path / "b")
    assert run.meta["weight_schedule"][-1]["weights"] == a.weights
    # the profiler continued from the loaded step, on its schedule
    every = make()["every"]
    want_steps = [s for s in range(saved_step, 2 * saved_step) if s % every == 0]
    assert run.probed_steps.tolist() == want_steps


def test_state_dict_is_a_snapshot_and_load_checks_it():
    with Trainer(tiny(), progress=False) as t:
        sd = t.state_dict()
        t.fit_epochs(1)
        assert not torch.equal(sd["model"]["trunk.1.weight"], t.model.trunk[1].weight)
        with pytest.raises(GradlensError, match=r"`state` should be a Trainer.state_dict\(\)"):
            t.load_state_dict({"model": {}})
        with Trainer(tiny(tasks=["left"]), progress=False) as other:
            with pytest.raises(GradlensError, match=r"saved for tasks \['left'\]"):
                t.load_state_dict(other.state_dict())
        with pytest.raises(GradlensError, match=r"`split` should be one of"):
            t.evaluate("dev")


# --------------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------------


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    monkeypatch.setattr(gtrain.run, "score", lambda metrics: next(scripted))
    res = train(tiny(epochs=6, early_stopping=2), tmp_path / "run", progress=False)
    assert (res.epochs_run, res.stopped_early) == (4, True)
    run = load_run(tmp_path / "run")
    assert run.meta["early_stopping"] == {
        "patience": 2,
        "best_epoch": 2,
        "best_score": 0.7,
        "stopped_early": True,
    }
    # the final validation metrics are those of epoch 2's model
    ev = run.evals
    e2 = ev[(ev.point == "epoch:2") & (ev.split == "val")].set_index(["task", "metric"])["value"]
    for task, metrics in res.metrics["val"].items():
        for metric, value in metrics.items():
            assert e2[(task, metric)] == value


def test_early_stopping_runs_all_epochs_while_improving(monkeypatch):
    scripted = iter([0.1, 0.2, 0.3])
    monkeypatch.setattr(gtrain.run, "score", lambda metrics: next(scripted))
    res = train(tiny(epochs=3, early_stopping=1), None, progress=False)
    assert (res.epochs_run, res.stopped_early) == (3, False)


# --------------------------------------------------------------------------------------------
# The planted gradient angle of the synthetic data
# --------------------------------------------------------------------------------------------


def _closed_form_setting(t: Trainer, k: int) -> None:
    """The setting of ``expected_gradient_gram``: shared linear layer at W = 0, identical heads.

    The MLP trunk is Linear(dim, k) + ReLU; its bias is frozen at 1 so that the ReLU passes the
    gradient (z = 1) and the heads' bias cancels the prediction (pred = 0 at the start).
    """
    lin = t.model.trunk[1]
    v = torch.linspace(0.5, 1.5, k)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(1.0)
        for head in t.model.heads.values():
            head.weight.copy_(v[None])
            head.bias.fill_(-float(v.sum()))
    lin.bias.requires_grad_(False)


def _synthetic(n_tasks, angle, scales, n, batch_size, epochs, every=1, lr=1e-4):
    k = 8
    return {
        "dataset": "synthetic",
        "dataset_options": {
            "n_tasks": n_tasks,
            "angle": angle,
            "scales": scales,
            "n": n,
            "dim": 16,
            "noise": 0.1,
        },
        "width": k / 256,  # 8 hidden units
        "depth": 1,
        "optimizer": "sgd",
        "momentum": 0.0,
        "lr": lr,
        "batch_size": batch_size,
        "epochs": epochs,
        "every": every,
    }


def test_full_batch_cosines_equal_the_planted_angle(tmp_path):
    # Full batch at W = 0: the Gram is exactly the closed form (X^T X / n = I, X^T noise = 0),
    # up to the float32 storage of the data and float32 training arithmetic.
    scales = [1.0, 2.0, 0.5]
    cfg = _synthetic(3, 75.0, scales, n=600, batch_size=600, epochs=1)
    t = Trainer(cfg, tmp_path / "run", progress=False)
    _closed_form_setting(t, 8)
    t.fit_epochs(1)
    t.finish()
    run = load_run(tmp_path / "run")
    G = run.gram(0)
    want = expected_gradient_gram(3, 75.0, scales).numpy()
    np.testing.assert_allclose(G / G[0, 0], want / want[0, 0], rtol=1e-5, atol=1e-5)
    cos = run.metrics.query("layer == 'total' and metric == 'cosine' and step == 0")
    np.testing.assert_allclose(cos["value"], math.cos(math.radians(75.0)), atol=1e-5)


def test_minibatch_mean_cosine_matches_the_closed_form(tmp_path):
    # Minibatches of b = 400 at the start of training (lr = 1e-7 keeps W at 0: with lr = 1e-4
    # the model learns the shared direction within 100 steps and the cosine falls to ~0.43).
    # The mean measured cosine over 100 probes estimates the cosine of the expected Gram.
    # Tolerance: 4 standard errors of that mean (measured from the probes, ~0.009) plus 0.005
    # for the bias of a mean of cosines (a Monte-Carlo run of 20,000 batches of this data gave
    # 0.4988 against 0.4998).
    b = 400
    cfg = _synthetic(2, 60.0, None, n=4000, batch_size=b, epochs=10, lr=1e-7)
    t = Trainer(cfg, tmp_path / "run", progress=False)
    _closed_form_setting(t, 8)
    t.fit_epochs(10)
    t.finish()
    run = load_run(tmp_path / "run")
    cos = run.metrics.query("layer == 'total' and metric == 'cosine'")["value"].to_numpy()
    assert len(cos) == 100
    want = float(expected_gradient_cosine(2, 60.0, noise=0.1, dim=16, batch_size=b)[0, 1])
    se = cos.std(ddof=1) / math.sqrt(len(cos))
    assert se < 0.015
    assert abs(cos.mean() - want) < 4 * se + 0.005
    # the planted angle, attenuated only by the noise: |want - cos 60| < 0.001
    assert abs(want - 0.5) < 0.001


@pytest.mark.parametrize("make", [tiny, domains])
def test_steps_per_epoch_sets_the_compute_of_an_epoch(make):
    # 160 MultiDigits pairs / 32 = 5 steps by default; 12 asks for more than one pass
    with gtrain.Trainer(
        gtrain.TrainConfig.from_dict(make(steps_per_epoch=12)), progress=False
    ) as tr:
        tr.fit_epochs(1)
        assert tr.step == 12
    with pytest.raises(GradlensError, match="steps_per_epoch"):
        gtrain.TrainConfig.from_dict(make(steps_per_epoch=0))
