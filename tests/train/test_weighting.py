"""The harness with a weighting: TrainConfig(weighting=..., per_layer=...), checkpoints, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradlens import GradlensError, load_run
from gradlens.cli import main
from gradlens.train import TrainConfig, Trainer, train
from tests import _tiny
from tests._tiny import tiny_train_args

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("error")]
pytest.importorskip("torchjd")


def tiny(**kw):
    return _tiny.tiny(**{"dataset_options": {"n": 256, "seed": 0}, **kw})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"weighting": "gradnorm"}, r"`weighting` should be one of \['upgrad'"),
        ({"weighting": "upgrad", "weights": {"a": 1.0}}, r"`weighting` \('upgrad'\) chooses"),
        ({"weighting": "dwa", "per_layer": True}, r"`per_layer` applies a Gram weighting"),
        ({"per_layer": True}, r"found None"),
        ({"weighting": "upgrad", "per_layer": 1}, r"`per_layer` should be a bool"),
        (
            {"weighting": "upgrad", "per_layer": True, "engine": "features"},
            r"`per_layer` needs per-layer parameter Grams",
        ),
    ],
)
def test_config_rejects_bad_weighting_fields(fields, match):
    with pytest.raises(GradlensError, match=match):
        TrainConfig(**fields)


def test_a_multidomain_dataset_refuses_a_weighting():
    opts = {"domains": ["original", "inverted"], "sizes": [60, 60]}
    cfg = tiny(dataset="domain_digits", dataset_options=opts, weighting="mgda")
    with pytest.raises(GradlensError, match="multi-domain"):
        Trainer(cfg, progress=False)


@pytest.mark.parametrize(
    ("method", "per_layer"),
    [
        ("upgrad", False),
        ("mgda", True),
        ("nash_mtl", False),
        ("uncertainty", False),
        ("dwa", False),
        ("rlw", False),
    ],
)
def test_state_dict_round_trip_continues_identically(tmp_path, method, per_layer):
    """The weighting's state (held Gram weights; learnt log-variances; loss history; random
    stream) is checkpointed: a resumed trainer continues exactly as the original."""
    a = Trainer(tiny(weighting=method, per_layer=per_layer, every=3), progress=False)
    a.fit_epochs(2)
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    a.fit_epochs(1)
    want = [p.detach().clone() for p in a.model.parameters()]
    b = Trainer(tiny(weighting=method, per_layer=per_layer, every=3, seed=4), progress=False)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    b.fit_epochs(1)
    for p, q in zip(b.model.parameters(), want):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    a.close()
    b.close()


def test_load_state_checks_the_weighting():
    with (
        Trainer(tiny(weighting="upgrad"), progress=False) as a,
        Trainer(tiny(weighting="mgda"), progress=False) as b,
    ):
        with pytest.raises(GradlensError, match="weighting 'mgda'; found 'upgrad'"):
            b.load_state_dict(a.state_dict())


def test_uncertainty_weighting_learns_its_log_variances(tmp_path):
    t = Trainer(tiny(weighting="uncertainty", epochs=1), tmp_path / "r", progress=False)
    s0 = t.weighting.log_var.detach().clone()
    t.fit_epochs(1)
    assert not torch.equal(t.weighting.log_var.detach(), s0)
    t.finish()
    run = load_run(tmp_path / "r")
    # the stored weights are those of the learnt variances, one row per probed step
    w = run.weights()
    assert w.shape[0] == len(run.probed_steps)
    assert not np.allclose(w[0], w[-1])


def test_train_command_with_a_weighting_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        *tiny_train_args(every=1),
        "--weighting",
        "upgrad",
        "--per-layer",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "run stored in" in capsys.readouterr().out
    run = load_run(out)
    assert run.meta["weighting"] == "upgrad/per_layer"
    assert run.meta["config"]["weighting"] == "upgrad"
    assert run.meta["seconds_per_step"] > 0
    w = run.weights()
    assert w.shape == (len(run.probed_steps), len(run.meta["tasks"]))
    assert np.isfinite(w).all()


def test_train_with_a_weighting_stores_its_weights(tmp_path):
    res = train(tiny(weighting="mgda", every=1), tmp_path / "r", progress=False)
    run = load_run(res.run_dir)
    w = run.weights()
    from torchjd.aggregation import MGDAWeighting

    # each stored step's weights are MGDA's on that step's stored Gram
    g = run.grams()
    for k in range(w.shape[0]):
        exp = MGDAWeighting()(torch.as_tensor(g[k])).numpy()
        np.testing.assert_allclose(w[k], exp, atol=1e-10)
