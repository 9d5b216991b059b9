"""TOML configs of sweeps and PBT: the example files, defaults, and every error naming table.key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradlens import GradlensError
from gradlens.search import ExecutorSpec, PBTSpec, SearchConfig, SweepSpec, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_sweep_parses():
    cfg = load_config(EXAMPLES / "sweep.toml")
    assert cfg.sweep == SweepSpec(
        p=(0.25, 0.75), sizes=({"width": 0.125, "depth": 1},), seeds=(0,), baselines=True
    )
    assert cfg.pbt is None
    assert cfg.executor == ExecutorSpec(kind="local", workers=1)
    assert cfg.train["dataset"] == "multidigits"
    assert cfg.source == EXAMPLES / "sweep.toml"


def test_example_pbt_parses():
    cfg = load_config(EXAMPLES / "pbt.toml")
    spec = cfg.pbt
    assert (spec.population, spec.epochs, spec.interval_epochs, spec.n_replace) == (4, 3, 1, 1)
    assert spec.metric == "accuracy"
    assert spec.resolved_mode == "max"
    assert spec.perturb_factors == (0.8, 1.25)


def test_pbt_defaults_and_derived_values():
    spec = PBTSpec.from_dict({})
    assert spec.metric == "score"
    assert spec.resolved_mode == "max"
    assert spec.n_replace == 2  # floor(8 * 0.25)
    assert PBTSpec.from_dict({"population": 3}).n_replace == 1  # at least one
    assert PBTSpec.from_dict({"population": 10, "quantile": 0.5}).n_replace == 5
    assert PBTSpec.from_dict({"population": 10, "replace": 3}).n_replace == 3
    assert PBTSpec.from_dict({"metric": "left.loss"}).resolved_mode == "min"
    assert PBTSpec.from_dict({"metric": "loss", "mode": "max"}).resolved_mode == "max"


def test_with_executor_overrides_only_given_keys():
    cfg = SearchConfig.from_dict({"executor": {"kind": "local", "workers": 3, "storage": "s"}})
    new = cfg.with_executor(workers=1, kind=None)
    assert new.executor == ExecutorSpec(kind="local", workers=1, storage="s")
    with pytest.raises(GradlensError, match=r"`executor.workers` should be an int >= 1"):
        cfg.with_executor(workers=0)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"trian": {}}, r"`trian` is not a known table"),
        ({"train": 3}, r"`train` should be a TOML table"),
        ({"sweep": {}}, r"exactly one of `sweep.p`, `sweep.grid` or `sweep.random`"),
        ({"sweep": {"p": [0.5], "grid": 3}}, r"exactly one of"),
        ({"sweep": {"p": [0.5, 1.5]}}, r"`sweep.p\[1\]` should be a finite number >= 0 and <= 1; "
                                       r"found 1.5"),
        ({"sweep": {"p": [0.5, 0.5]}}, r"`sweep.p` should be distinct values"),
        ({"sweep": {"p": 0.5}}, r"`sweep.p` should be a non-empty list"),
        ({"sweep": {"grid": 1}}, r"`sweep.grid` should be an int >= 2; found 1"),
        ({"sweep": {"random": 0}}, r"`sweep.random` should be an int >= 1"),
        ({"sweep": {"random": 3, "alpha": 0}}, r"`sweep.alpha` should be a finite number > 0"),
        ({"sweep": {"grid": 3, "sizes": [{"width": 1, "dpth": 2}]}}, r"`sweep.sizes\[0\]`"),
        ({"sweep": {"grid": 3, "sizes": [{"depth": 0}]}}, r"`sweep.sizes\[0\].depth`"),
        ({"sweep": {"grid": 3, "sizes": [{"width": -1.0}]}}, r"`sweep.sizes\[0\].width`"),
        ({"sweep": {"grid": 3, "seeds": [1, 1]}}, r"`sweep.seeds` should be distinct seeds"),
        ({"sweep": {"grid": 3, "seeds": [-1]}}, r"`sweep.seeds\[0\]` should be an int >= 0"),
        ({"sweep": {"grid": 3, "baselines": "yes"}}, r"`sweep.baselines` should be true or false"),
        ({"sweep": {"grid": 3, "seed": 1}}, r"`sweep.seed` is not a known key"),
        ({"pbt": {"population": 1}}, r"`pbt.population` should be an int >= 2; found 1"),
        ({"pbt": {"population": 10**9}}, r"`pbt.population` should be at most 1,000 .*1000000000"),
        ({"pbt": {"interval_epochs": 0}}, r"`pbt.interval_epochs`"),
        ({"pbt": {"epochs": 0}}, r"`pbt.epochs` should be an int >= 1"),
        ({"pbt": {"quantile": 0.6}}, r"`pbt.quantile` should be a finite number > 0 and <= 0.5"),
        ({"pbt": {"population": 4, "replace": 3}}, r"`pbt.replace` should be at most "
                                                   r"population // 2 = 2; found 3"),
        ({"pbt": {"metric": "a.b.c"}}, r"`pbt.metric`"),
        ({"pbt": {"metric": ".acc"}}, r"`pbt.metric`"),
        ({"pbt": {"mode": "maximise"}}, r"`pbt.mode` should be one of \('max', 'min'\)"),
        ({"pbt": {"perturb_factors": [1.2, 0]}}, r"`pbt.perturb_factors\[1\]`"),
        ({"pbt": {"resample_probability": 2}}, r"`pbt.resample_probability`"),
        ({"pbt": {"init": "grid"}}, r"`pbt.init` should be one of \('random', 'uniform'\)"),
        ({"pbt": {"populaton": 4}}, r"`pbt.populaton` is not a known key"),
        ({"executor": {"kind": "dask"}}, r"`executor.kind` should be one of \('local', 'ray'\); "
                                         r"found 'dask'"),
        ({"executor": {"workers": 0}}, r"`executor.workers` should be an int >= 1; found 0"),
        ({"executor": {"address": "auto"}}, r"`executor.address` should be unset unless"),
        ({"executor": {"storage": 3}}, r"`executor.storage` should be a directory path"),
    ],
)  # fmt: skip
def test_errors_name_the_key(doc, match):
    with pytest.raises(GradlensError, match=match):
        SearchConfig.from_dict(doc)


def test_load_config_errors(tmp_path):
    with pytest.raises(GradlensError, match="found no file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1\n")
    with pytest.raises(GradlensError, match="should be valid TOML"):
        load_config(bad)
    with pytest.raises(GradlensError, match="UTF-8 TOML file"):
        load_config(tmp_path)
