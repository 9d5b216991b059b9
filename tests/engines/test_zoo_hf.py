"""Hugging Face trunks (``gradlens bench --zoo``) in float64: every exact engine against the loop
reference (Grams per layer) and ``.grad`` against the plain weighted backward. Skipped when
``transformers`` (the ``zoo`` extra) is missing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradlens as gl
from gradlens.bench._zoo import ZOO, build_zoo
from gradlens.cli import main
from gradlens.engines import gramian as gramian_mod
from gradlens.testing import reference_grams
from tests.zoo import assert_gram_close

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

W = {"a": 0.2, "b": 0.3, "c": 0.5}
#: T5's RMS norm computes its variance in float32 even in a float64 model: the gramian engine's
#: rows (scaled by the weights) round there differently from the loop's (measured 1.6e-9 to 6e-9)
TOL = {"t5-encoder": 1e-7}
GRAD_ATOL = {"t5-encoder": 1e-8}  # measured 1.1e-10 (gradient entries of order 1e-2)
#: layers each rule must serve on each trunk (the rest may take the exact generic path)
SERVED = {
    "bert": {"embedding", "norm", "linear"},
    "gpt2": {"embedding", "norm", "conv1d"},
    "vit": {"conv", "norm", "linear"},
    "resnet": {"conv", "norm"},
    "convnext": {"conv", "linear"},
    "mobilenetv2": {"conv", "norm"},
    "t5-encoder": {"embedding", "linear"},
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_trunk_matches_the_loop_reference(name, monkeypatch):
    # auto's first four probes on CPU run loop, batched, gramian (second stage one backward per
    # task: every segment counted as large here) and gramian (second stage vmapped, the default
    # on these small blocks) in turn: each is checked
    monkeypatch.setattr(gramian_mod, "LOOP_ABOVE", 0)
    torch.manual_seed(0)
    trunk, make_x = build_zoo(name)
    trunk = trunk.double()
    x = make_x(2)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        d = trunk(x).shape[1]
    heads = nn.ModuleList([nn.Linear(d, 1) for _ in W]).double()
    params = [p for p in [*trunk.parameters(), *heads.parameters()] if p.requires_grad]
    tol = TOL.get(name, 1e-10)
    used = []
    with gl.Profiler(trunk, list(W)) as prof:
        for _ in range(4):
            z = trunk(x)
            losses = {t: (h(z) ** 2).mean() * (i + 1) for i, (t, h) in enumerate(zip(W, heads))}
            ref = reference_grams(losses, trunk)
            plain = torch.autograd.grad(
                sum(W[t] * v for t, v in losses.items()), params, retain_graph=True,
                allow_unused=True,
            )
            snap = prof.backward(losses, W)
            assert list(snap.layer_grams) == list(ref.layer_grams) == list(prof.layers)
            assert_gram_close(snap.gram, ref.gram, tol)
            for g, want in zip(snap.layer_grams.values(), ref.layer_grams.values()):
                assert_gram_close(g, want, tol)
            for p, g in zip(params, plain):
                want = torch.zeros_like(p) if g is None else g
                got = torch.zeros_like(p) if p.grad is None else p.grad
                atol = GRAD_ATOL.get(name, 1e-12)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)
                p.grad = None
            used.append(snap.engine)
    assert used == ["loop", "batched", "gramian", "gramian"]
    assert SERVED[name] <= set(snap.rules.values()), snap.rules


def test_bench_zoo_cli(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    args = ["bench", "--zoo", "--models", "bert", "--tasks", "3", "--repeats", "1"]
    assert main([*args, "--methods", "plain,gramian,auto", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["time"]
    assert {(r["model"], r["method"]) for r in rows} == {
        ("bert", "plain"), ("bert", "gramian"), ("bert", "auto")
    }
    assert all(r["batch"] == 4 and r["tasks"] == 3 for r in rows)
    (auto,) = [r for r in rows if r["method"] == "auto"]
    assert set(auto["chose"]) <= {"loop", "batched", "gramian"}
    assert "auto chose" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["loop", "batched", "gramian"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_trunk_matches_the_loop_reference_on_cuda(name, engine):
    """The same trunks on CUDA in float64 (``benchmarks/gpu_check.sh``'s tests stage)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    trunk, make_x = build_zoo(name)
    trunk = trunk.double().to(dev)
    x = make_x(2)
    x = (x.double() if x.is_floating_point() else x).to(dev)
    with torch.no_grad():
        d = trunk(x).shape[1]
    heads = nn.ModuleList([nn.Linear(d, 1) for _ in W]).double().to(dev)
    params = [p for p in [*trunk.parameters(), *heads.parameters()] if p.requires_grad]
    tol = TOL.get(name, 1e-10)
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        z = trunk(x)
        losses = {t: (h(z) ** 2).mean() * (i + 1) for i, (t, h) in enumerate(zip(W, heads))}
        ref = reference_grams(losses, trunk)
        plain = torch.autograd.grad(
            sum(W[t] * v for t, v in losses.items()), params, retain_graph=True, allow_unused=True
        )
        snap = prof.backward(losses, W)
    assert list(snap.layer_grams) == list(ref.layer_grams) == list(prof.layers)
    assert_gram_close(snap.gram.cpu(), ref.gram.cpu(), tol)
    for g, want in zip(snap.layer_grams.values(), ref.layer_grams.values()):
        assert_gram_close(g.cpu(), want.cpu(), tol)
    for p, g in zip(params, plain):
        want = torch.zeros_like(p) if g is None else g
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=GRAD_ATOL.get(name, 1e-12))


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_bert_with_its_pooler_read_beside_its_hidden_states(engine):
    """``BertModel`` as the shared part, heads on both ``last_hidden_state`` and
    ``pooler_output`` (computed from it): the last norm layer's gradient also flows back from
    the pooler (the gramian engine missed that flow before; tests/engines/test_fuzz_engines.py)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = tf.BertModel(cfg).double()
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in W]).double()
    params = [p for p in [*bert.parameters(), *heads.parameters()] if p.requires_grad]
    with gl.Profiler(bert, list(W), engine=engine) as prof:
        for _ in range(4):  # auto: each candidate in turn, then its choice
            out = bert(torch.randint(0, 50, (2, 6)))
            z = [out.pooler_output, out.last_hidden_state[:, 0], out.last_hidden_state.mean(1)]
            losses = {t: (h(z[i]) ** 2).mean() * (i + 1) for i, (t, h) in enumerate(zip(W, heads))}
            losses["c"] = losses["c"] + out.pooler_output.square().mean()
            ref = reference_grams(losses, bert)
            plain = torch.autograd.grad(
                sum(W[t] * v for t, v in losses.items()), params, retain_graph=True,
                allow_unused=True,
            )  # fmt: skip
            snap = prof.backward(losses, W)
            for layer, g in ref.layer_grams.items():
                assert_gram_close(snap.layer_grams[layer], g, 1e-10)
            for p, g in zip(params, plain):
                want = torch.zeros_like(p) if g is None else g
                got = torch.zeros_like(p) if p.grad is None else p.grad
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
                p.grad = None
