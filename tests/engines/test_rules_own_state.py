"""A rule reads a module's own forward on its own parameters: what changes either is seen.

Found by an exploratory run on real training set-ups: a user's forward hook that returns a new
output (noise, clamping, steering) ran before the gramian engine's, which recorded the hooked
output as the module's (Grams 25 % off, the weighted .grad halved by an x2 hook); a forward
replaced on the instance was served as the class's; a parametrized, weight-normed or pruned
weight was served by the rule as if it were the parameter (the Gram counted the layer twice,
then a raw error on writing the computed tensor's .grad).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import gradlens as gl
from gradlens.engines.rules import decline_reason, own_state_reason
from tests.zoo import probe_matches_reference

TASKS = ["a", "b"]
W = {"a": 0.3, "b": 0.7}


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


def _change(trunk: nn.Sequential, how: str) -> None:
    lin, norm = trunk[0], trunk[3]
    if how == "hook x2 on Linear":
        lin.register_forward_hook(lambda m, a, o: o * 2.0)
    elif how == "hook clamp on LayerNorm":
        norm.register_forward_hook(lambda m, a, o: o.clamp(-0.5, 0.5))
    elif how == "instance forward":
        orig = lin.forward
        lin.forward = lambda x: orig(x) * 2.0
    elif how == "weight_norm":
        parametrizations.weight_norm(lin)
    elif how == "custom parametrization":
        parametrize.register_parametrization(lin, "weight", _Double())
    elif how == "old weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(lin)
    elif how == "pruning":
        prune.l1_unstructured(lin, "weight", amount=0.5)
    elif how == "hook prepended after":  # (before the Profiler: an x2 hook as above)
        lin.register_forward_hook(lambda m, a, o: o * 2.0, prepend=True)
    elif how == "global hook":  # torch runs global forward hooks before any module's
        _GLOBAL.append(
            nn.modules.module.register_module_forward_hook(
                lambda m, a, o: o * 2.0 if m is lin else None
            )
        )


_GLOBAL: list[torch.utils.hooks.RemovableHandle] = []


@pytest.fixture(autouse=True)
def _no_global_hook_left():
    yield
    while _GLOBAL:
        _GLOBAL.pop().remove()


CHANGES = [
    "hook x2 on Linear", "hook clamp on LayerNorm", "instance forward", "weight_norm",
    "custom parametrization", "old weight_norm", "pruning", "hook prepended after", "global hook",
]  # fmt: skip


# made after the Profiler too: the changes that keep the module's parameters (a
# parametrization or the old weight norm makes or moves parameters: the Profiler's shared set)
NEW_PARAMETERS = ("weight_norm", "custom parametrization", "old weight_norm")
WHEN = [(how, "before") for how in CHANGES] + [
    (how, "after") for how in CHANGES if how not in NEW_PARAMETERS
]


@pytest.mark.parametrize("engine", ["gramian", "auto"])
@pytest.mark.parametrize(("how", "when"), WHEN)
def test_a_changed_module_is_served_exactly(how, when, engine):
    """Each change, made before the Profiler or after it (the rules are chosen once, the check
    is repeated at every probe), leaves every engine exact: Grams to 1e-10 per layer, .grad
    equal to the plain weighted backward."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8)
    ).double()
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in TASKS]).double()
    if when == "before":
        _change(trunk, how)
    prof = gl.Profiler(trunk, TASKS, engine=engine)
    if when == "after":
        _change(trunk, how)
    params = [p for p in [*trunk.parameters(), *heads.parameters()] if p.requires_grad]
    for step in range(4):  # auto times its candidates, gramian among them, on its first probes
        x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        z = trunk(x)
        losses = {t: ((h(z) - i) ** 2).mean() for i, (t, h) in enumerate(zip(TASKS, heads))}
        snap = probe_matches_reference(prof, trunk, losses, W, params)
        for p in params:
            p.grad = None
    if how.startswith("hook") and engine == "gramian":  # the rules still serve the module
        assert snap.rules["0" if "Linear" in how else "3"] in ("linear", "norm")
    prof.close()


def test_a_constant_tensor_attribute_is_no_computed_parameter():
    """A Linear subclass that keeps a fixed bias as a plain tensor attribute (no grad, no
    pre-hook) is served: it was declined as 'computed from other parameters'."""

    class BiasConst(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 3, bias=False)
            del self.bias
            self.bias = torch.ones(3)

    assert own_state_reason(BiasConst()) is None


@pytest.mark.parametrize("how", CHANGES[2:7])
def test_the_decline_is_named(how):
    lin = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8))
    _change(lin, how)
    reason = own_state_reason(lin[0])
    assert reason is not None
    name = type(lin[0]).__name__
    assert decline_reason(lin[0]) == f"the 'linear' rule declines this {name}: {reason}"
    assert own_state_reason(lin[2]) is None
