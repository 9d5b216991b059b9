"""Mixed precision: autocast (bf16, fp16) forwards with a GradScaler.

Tolerances, stated: under autocast the weighted gradient goes through a different sequence of
half-precision roundings than the plain scaled backward (per-task cotangents summed afterwards,
or rules computing in float32), so ``.grad`` agrees with ``scaler.scale(loss).backward()`` to
the half type's rounding: relative error over all parameters <= 1e-2 for bf16 (8-bit mantissa,
2^-8 ~ 3.9e-3 per rounding; measured 3e-3 to 5e-3) and <= 2e-3 for fp16 (measured 3e-4 to 6e-4).
The Grams (float64) agree with the loop reference on the same autocast forward to 1e-4
(measured <= 1.2e-5) for the engines that backpropagate as the loop does; the gramian engine's
rules form the weight gradients in float32 from the recorded half-precision inputs and output
gradients, where the loop rounds each per-task weight gradient to the half type, so there the
agreement is the half type's rounding, per layer: <= 1e-2 (bf16) and 2e-3 (fp16) on these
models, as for ``.grad`` (tiny random layers, with fewer entries to average the rounding out:
2e-2 / 5e-3, tests/engines/test_fuzz_engines.py). The Grams never depend on the task weights
(rows are not captured as ``w_t g_t`` in half precision). Without autocast, scaling is exact.
"""

from __future__ import annotations

import pytest
import torch

import gradlens as gl
from gradlens.testing import reference_grams
from tests.zoo import build, task_losses

W = {"t0": 0.2, "t1": 0.5, "t2": 0.3}
GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _params(trunk, heads):
    return list(trunk.parameters()) + list(heads.parameters())


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    d = torch.cat([(a - b).flatten() for a, b in zip(got, want)]).norm()
    return (d / torch.cat([b.flatten() for b in want]).norm()).item()


def _gram_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    d = ref.diagonal().sqrt()
    return ((got - ref).abs() / (d[:, None] * d[None, :])).max().item()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("engine", ["loop", "batched", "gramian", "features"])
@pytest.mark.parametrize("model", ["mlp", "cnn_bn", "transformer"])
def test_autocast_with_grad_scaler(model, engine, half):
    trunk, heads, x, ys = build(model, 3, torch.float32, batch=8)
    params = _params(trunk, heads)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    state = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=half):
        losses = task_losses(trunk, heads, x, ys)
    scaler.scale(sum(W[t] * v for t, v in losses.items())).backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    torch.random.set_rng_state(state)
    prof = gl.Profiler(trunk, list(W), engine=engine)  # before the forward: hooks see it
    with torch.autocast("cpu", dtype=half):
        losses, z = task_losses(trunk, heads, x, ys, features=True)
    ref = reference_grams(losses, trunk)
    J = torch.stack(
        [torch.autograd.grad(v, z, retain_graph=True)[0].flatten() for v in losses.values()]
    ).double()
    with prof:
        snap = prof.backward(
            losses,
            W,
            grad_scale=scaler,
            features=z if engine == "features" else None,
        )
    assert snap.gram.dtype == torch.float64
    assert _rel([p.grad for p in params], plain) <= GRAD_TOL[half]
    if engine == "features":
        assert _gram_err(snap.gram, J @ J.T) <= 1e-4
    else:
        tol = GRAD_TOL[half] if engine == "gramian" else 1e-4
        assert _gram_err(snap.gram, ref.gram) <= tol
        for layer, g in ref.layer_grams.items():
            assert _gram_err(snap.layer_grams[layer], g) <= tol
    # unscaled: the scale would put the Gram off by scale**2 = 2**24
    assert snap.losses == pytest.approx({t: v.item() for t, v in losses.items()})


@pytest.mark.parametrize("engine", ["loop", "batched", "gramian", "features"])
@pytest.mark.parametrize("scale", [1024.0, torch.tensor([3.0])])
def test_scaling_is_exact_in_float64(engine, scale):
    trunk, heads, x, ys = build("twice", 3, torch.float64)
    params = _params(trunk, heads)
    s = float(scale)
    (s * sum(W[t] * v for t, v in task_losses(trunk, heads, x, ys).items())).backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    prof = gl.Profiler(trunk, list(W), engine=engine, every=2)
    losses, z = task_losses(trunk, heads, x, ys, features=True)
    ref = reference_grams(losses, trunk)
    with prof:
        snap = prof.backward(
            losses, W, grad_scale=scale, features=z if engine == "features" else None
        )
        for g, p in zip(plain, params):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
            p.grad = None
        if engine != "features":
            assert _gram_err(snap.gram, ref.gram) <= 1e-10
        # unprobed step: the plain scaled backward
        losses, z = task_losses(trunk, heads, x, ys, features=True)
        feats = z if engine == "features" else None
        assert prof.backward(losses, W, grad_scale=scale, features=feats) is None
        for g, p in zip(plain, params):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


class _Float(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


@pytest.mark.parametrize("engine", ["gramian", "features"])
def test_autocast_grams_do_not_depend_on_the_weights(engine):
    # the trunk's output is float32 (as a norm layer's is under CUDA autocast) while the heads
    # compute in bf16: the dtype of z alone does not reveal the half-precision heads
    grams = []
    for weights in ({"t0": 1.0, "t1": 1.0, "t2": 1.0}, W, {"t0": 1e-3, "t1": 1.0, "t2": 50.0}):
        torch.manual_seed(0)  # the same model and batch each time
        trunk = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), _Float())
        heads = torch.nn.ModuleList([torch.nn.Linear(5, 1) for _ in W])
        x, ys = torch.randn(8, 6), torch.randn(3, 8)
        with gl.Profiler(trunk, list(W), engine=engine) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses, z = task_losses(trunk, heads, x, ys, features=True)
            assert z.dtype == torch.float32
            snap = prof.backward(losses, weights, features=z if engine == "features" else None)
        grams.append(snap.layer_grams)
    for other in grams[1:]:
        for layer, g in grams[0].items():
            torch.testing.assert_close(other[layer], g, rtol=1e-6, atol=0.0)


def test_overflow_step_is_not_stored(tmp_path):
    trunk, heads, x, ys = build("mlp", 3, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 max is 65504: overflows
    opt = torch.optim.SGD(_params(trunk, heads), lr=0.1)
    before = [p.detach().clone() for p in trunk.parameters()]
    with gl.Profiler(trunk, list(W), engine="gramian", store=tmp_path / "run") as prof:
        with torch.autocast("cpu", dtype=torch.float16):
            losses = task_losses(trunk, heads, x, ys)
        assert prof.backward(losses, W, grad_scale=scaler) is None
        assert not all(bool(torch.isfinite(p.grad).all()) for p in trunk.parameters())
        scaler.step(opt)  # the scaler sees the overflow too and skips the step
        scaler.update()
        assert prof.step == 1
    for a, b in zip(before, trunk.parameters()):
        torch.testing.assert_close(b.detach(), a)
    assert scaler.get_scale() < 2.0**40
    assert len(gl.load_run(tmp_path / "run").probed_steps) == 0


@pytest.mark.parametrize(
    ("scale", "match"),
    [
        (0.0, "positive and finite.*; found 0.0"),
        (-2.0, "positive and finite.*; found -2.0"),
        (float("nan"), "positive and finite.*; found nan"),
        (1e200, r"its square a normal float .*; found 1e\+200"),  # its square overflows
        (1e-200, r"its square a normal float .*; found 1e-200"),  # underflows to 0
        (1e-160, r"its square a normal float .*; found 1e-160"),  # is subnormal: 1/s^2 = inf
        ("8", "found str"),
        (True, "found bool"),
        (torch.ones(2), r"found a tensor of shape \(2,\)"),
    ],
)
def test_bad_grad_scale(scale, match):
    trunk, heads, x, ys = build("mlp", 2, torch.float64)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        with pytest.raises(gl.GradlensError, match="`grad_scale` should be .*" + match):
            prof.backward(task_losses(trunk, heads, x, ys), grad_scale=scale)


def test_a_scale_not_representable_in_the_losses_dtype_is_refused_naming_it():
    from gradlens._profiler_checks import check_scale

    half = torch.zeros((), dtype=torch.float16)
    with pytest.raises(gl.GradlensError, match=r"dtype torch.float16; found 65536.0, .* inf"):
        check_scale(65536.0, half)
    with pytest.raises(gl.GradlensError, match=r"dtype torch.float16; found 1e-08, .* 0.0"):
        check_scale(torch.tensor(1e-8, dtype=torch.float64), half)
    assert float(check_scale(2.0**15, half)) == 2.0**15


def test_a_scaler_whose_scale_is_zero_in_the_losses_dtype_skips_the_probe():
    """A GradScaler's scale that rounds to 0 in float16 losses (after many overflows): the
    probe is skipped as for an overflow (no Snapshot, the plain step's .grad), not a raw
    ZeroDivisionError."""
    trunk, heads, x, ys = build("mlp", 2, torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-25)
    with gl.Profiler(trunk, ["t0", "t1"]) as prof:
        losses = {t: v.half() for t, v in task_losses(trunk, heads, x, ys).items()}
        assert prof.backward(losses, grad_scale=scaler) is None
        assert prof.step == 1
    assert all(p.grad is not None and not p.grad.any() for p in trunk.parameters())


def test_a_disabled_scaler_does_not_scale():
    trunk, heads, x, ys = build("mlp", 2, torch.float64)
    prof = gl.Profiler(trunk, ["t0", "t1"])
    losses = task_losses(trunk, heads, x, ys)
    ref = reference_grams(losses, trunk)
    with prof:
        snap = prof.backward(losses, grad_scale=torch.amp.GradScaler("cpu", enabled=False))
    assert _gram_err(snap.gram, ref.gram) <= 1e-10


@pytest.mark.parametrize("engine", ["gramian", "auto"])
def test_a_loss_computed_in_half_precision_with_a_generic_layer(engine):
    """A squared loss written by hand under autocast stays bf16 (autocast widens only listed
    ops such as cross entropy), so the weights are bf16 too; a layer on the generic path then
    got its weighted gradient from a bf16 x float32 product (a RuntimeError before; found by
    tests/engines/test_fuzz_engines.py's models under autocast)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), lin, torch.nn.GELU())
    trunk.register_forward_hook(lambda m, a, out: lin(out))  # a second use: generic path
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in W])
    params = _params(trunk, heads)
    with gl.Profiler(trunk, list(W), engine=engine) as prof:
        for _ in range(4):  # auto: each candidate, then its choice
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = trunk(torch.randn(6, 5))
                losses = {t: (h(z) ** 2).mean() for t, h in zip(W, heads)}
            assert all(v.dtype == torch.bfloat16 for v in losses.values())
            plain = torch.autograd.grad(
                sum(W[t] * v for t, v in losses.items()), params, retain_graph=True
            )
            ref = reference_grams(losses, trunk)
            snap = prof.backward(losses, W)
            if snap.engine == "gramian":
                assert "generic" in snap.rules.values()
            for layer, g in ref.layer_grams.items():
                assert _gram_err(snap.layer_grams[layer], g) <= GRAD_TOL[torch.bfloat16]
            assert _rel([p.grad for p in params], list(plain)) <= GRAD_TOL[torch.bfloat16]
            for p in params:
                p.grad = None


@pytest.mark.parametrize("engine", ["auto", "loop", "batched", "gramian"])
def test_a_non_finite_loss_under_a_scaler_is_its_overflow_on_a_probed_step_too(engine):
    """An fp16 forward that overflows gives an inf loss: the event GradScaler skips. A probed
    step raised 'losses should be finite' where an unprobed one went through, so an AMP run died
    or not by its schedule; now both are the scaler's skipped step (None, no Snapshot)."""
    trunk, heads, x, ys = build("mlp", 3, torch.float32, batch=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.SGD(_params(trunk, heads), lr=0.0)
    with gl.Profiler(trunk, list(W), engine=engine, every=2) as prof:
        for step in range(4):  # steps 1 (unprobed) and 2 (probed) overflow
            losses = task_losses(trunk, heads, x, ys)
            if step in (1, 2):
                losses["t1"] = losses["t1"] * float("inf")
            snap = prof.backward(losses, W, grad_scale=scaler)
            assert (snap is None) == (step in (1, 2) or step % 2 == 1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert prof.step == 4
    assert scaler.get_scale() == 2.0**6  # halved by each of the two overflows


@pytest.mark.parametrize(
    "scale", [torch.amp.GradScaler("cpu", enabled=False), 2.0], ids=["disabled-scaler", "float"]
)
def test_a_non_finite_loss_without_an_enabled_scaler_is_still_refused(scale):
    """Only an enabled GradScaler skips a step whose gradients are not finite: with a disabled
    one (GradScaler(enabled=use_amp), AMP off) or a static scale, a non-finite loss on a probed
    step is refused as without a scale (it trained on NaN gradients, silently)."""
    trunk, heads, x, ys = build("mlp", 3, torch.float32, batch=8)
    with gl.Profiler(trunk, list(W), engine="loop") as prof:
        losses = task_losses(trunk, heads, x, ys)
        losses["t1"] = losses["t1"] * float("inf")
        with pytest.raises(gl.GradlensError, match="`losses` should be finite"):
            prof.backward(losses, W, grad_scale=scale)
        assert prof.step == 0
    assert all(p.grad is None for p in _params(trunk, heads))
