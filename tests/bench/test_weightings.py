"""The benchmark's multi-task optimization rows: the three paths do the same work."""

from __future__ import annotations

import json

import pytest
import torch

from gradlens.bench import WEIGHTED_METHODS, run_benchmark
from gradlens.bench._setup import _Setup
from gradlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("torchjd")


def _assert_paths_agree(model: str, weighting: str, batch: int) -> None:
    """gradlens, TorchJD's autogram path and the LibMTL loop write the same .grad (float32)."""
    setup = _Setup(model, 3, batch=batch)
    grads = {}
    for path in ("gramian", "torchjd", "loop-libmtl"):
        m = f"{path}+{weighting}"
        setup.prepare(m)
        setup.step(m)
        trunk = setup._jd_trunk if path == "torchjd" else setup.trunk
        grads[path] = [p.grad.clone() for p in [*trunk.parameters(), *setup.heads.parameters()]]
    setup.close()
    for path in ("torchjd", "loop-libmtl"):
        assert len(grads[path]) == len(grads["gramian"])
        for a, b in zip(grads["gramian"], grads[path]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", ["upgrad", "mgda"])
def test_every_path_writes_the_same_gradient(weighting):
    _assert_paths_agree("mlp-tiny", weighting, batch=16)


@pytest.mark.parametrize("weighting", ["upgrad", "mgda"])
def test_every_path_writes_the_same_gradient_on_a_zoo_trunk(weighting):
    """The same on a Hugging Face trunk (BERT: embeddings, attention, LayerNorm), whose TorchJD
    path vmaps over CPU attention backward (its notices silenced, not raised); skipped without
    the ``zoo`` extra."""
    pytest.importorskip("transformers")
    _assert_paths_agree("bert", weighting, batch=4)


def test_weighted_rows_and_the_cli(tmp_path):
    rows = run_benchmark(models=["mlp-tiny"], tasks=[2], methods=["plain", *WEIGHTED_METHODS],
                         repeats=1, warmup=0, batch=8, amortise=())  # fmt: skip
    assert {r["method"] for r in rows} == {"plain", *WEIGHTED_METHODS}
    assert all(r["seconds"] > 0 for r in rows)
    out = tmp_path / "b.json"
    args = ["bench", "--models", "mlp-tiny", "--tasks", "2", "--methods",
            "plain,gramian+mgda,torchjd+mgda", "--repeats", "1", "--batch", "8",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    got = {r["method"] for r in json.loads(out.read_text())["time"]}
    assert got == {"plain", "gramian+mgda", "torchjd+mgda"}


def test_weighted_rows_on_the_zoo_cli(tmp_path):
    """``gradlens bench --zoo --methods`` with weighting rows, end to end (``zoo`` extra)."""
    pytest.importorskip("transformers")
    out = tmp_path / "z.json"
    methods = "plain,gramian,gramian+upgrad,torchjd+upgrad,loop-libmtl+mgda,gramian+mgda/per_layer"
    args = ["bench", "--zoo", "--models", "bert", "--tasks", "3", "--methods", methods,
            "--repeats", "1", "--clock", "cpu", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["time"]
    assert {r["method"] for r in rows} == set(methods.split(","))
    assert {(r["model"], r["tasks"], r["batch"]) for r in rows} == {("bert", 3, 4)}
