"""The benchmark's multi-task optimization rows: the three paths do the same work."""

from __future__ import annotations

import json

import pytest
import torch

from gradlens.bench import WEIGHTED_METHODS, _Setup, run_benchmark
from gradlens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("torchjd")


@pytest.mark.parametrize("weighting", ["upgrad", "mgda"])
def test_every_path_writes_the_same_gradient(weighting):
    """gradlens, TorchJD's autogram path and the LibMTL loop: the same .grad (float32)."""
    setup = _Setup("mlp-tiny", 3, batch=16)
    grads = {}
    for path in ("gramian", "torchjd", "loop-libmtl"):
        m = f"{path}+{weighting}"
        setup.prepare(m)
        setup.step(m)
        trunk = setup._jd_trunk if path == "torchjd" else setup.trunk
        grads[path] = [p.grad.clone() for p in [*trunk.parameters(), *setup.heads.parameters()]]
    setup.close()
    for path in ("torchjd", "loop-libmtl"):
        for a, b in zip(grads["gramian"], grads[path]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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
