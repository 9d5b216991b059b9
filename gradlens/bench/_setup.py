"""One benchmark set-up: a trunk, task heads, a batch, and a training step per method."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradlens._errors import GradlensError
from gradlens.bench._models import MODELS
from gradlens.bench._weightings import (
    libmtl_jacobian,
    libmtl_write,
    torchjd_gramian,
    weighted_step,
)
from gradlens.profiler import Profiler

__all__: list[str] = []

# A profiler built with ``every=_ONCE`` probes its step 0 only: the unprobed timings use it.
_ONCE = 10**9


class _Setup:
    """Model, heads, batch and a step function per method."""

    def __init__(
        self,
        model: str,
        n_tasks: int,
        batch: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        size: str = "small",
    ) -> None:
        from gradlens.bench._zoo import ZOO, build_zoo, check_size

        if model not in MODELS and model not in ZOO:
            raise GradlensError(
                f"`model` should be one of {sorted(MODELS) + sorted(ZOO)}; found {model!r}."
            )
        self.size = check_size(size)  # the zoo trunks' dimensions; ours are sized by their names
        self.device = torch.device(device)
        torch.manual_seed(seed)  # built on CPU, then moved: the same model and batch everywhere
        if model in ZOO:
            trunk, make_x = build_zoo(model, size)
            x = make_x(batch)
            with torch.no_grad():
                d = trunk(x).shape[1]
        else:
            make, shape, d = MODELS[model]
            trunk, x = make(), torch.randn(batch, *shape)
        self.trunk = trunk.to(self.device)
        self.heads = nn.ModuleList([nn.Linear(d, 10) for _ in range(n_tasks)]).to(self.device)
        self.x = x.to(self.device)
        self.y = torch.randint(0, 10, (n_tasks, batch)).to(self.device)
        self.tasks = [f"t{i}" for i in range(n_tasks)]
        self.w = {t: 1.0 / n_tasks for t in self.tasks}
        self.wt = torch.full((n_tasks,), 1.0 / n_tasks, device=self.device)
        self.n_params = sum(p.numel() for p in self.trunk.parameters())
        self._profilers: dict[tuple[str, int], Profiler] = {}
        self._torchjd: Any = None
        self._weightings: dict[str, Any] = {}

    def losses(
        self, trunk: nn.Module | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = (trunk or self.trunk)(self.x)
        return {
            t: F.cross_entropy(h(z), self.y[i])
            for i, (t, h) in enumerate(zip(self.tasks, self.heads))
        }, z

    def zero(self) -> None:
        for p in [*self.trunk.parameters(), *self.heads.parameters()]:
            p.grad = None

    def prepare(self, method: str, every: int = 1, fresh: bool = False) -> bool:
        """Attach the profiler ``method`` needs (and only it), before the timed forward.

        A profiler is created fresh when the method changes (or ``fresh`` is set), so its step
        counter starts at 0 (probed); no hooks of another method stay on the model while a
        method is timed. TorchJD's engine (on its own copy of the trunk) is built here, so its
        set-up is neither timed nor counted in its peak memory. Returns whether a profiler was
        created.
        """
        path = method.partition("+")[0]  # "gramian+upgrad": a weighting on the gramian engine
        key = (method, every) if path not in ("plain", "loop-libmtl", "torchjd") else None
        created = False
        if key is None or fresh or key not in self._profilers:
            self.close()
            if key is not None:
                self._profilers[key] = Profiler(self.trunk, self.tasks, engine=path, every=every)
                created = True
        if path == "torchjd" and self._torchjd is None:
            # its hooks stay on the modules it is given: use a copy so other methods don't pay
            from torchjd.autogram import Engine

            self._jd_trunk = copy.deepcopy(self.trunk).to(self.device)
            self._torchjd = Engine(self._jd_trunk, batch_dim=None)
        return created

    def step(self, method: str, every: int = 1) -> None:
        """One training step of ``method`` (call :meth:`prepare` first)."""
        self.zero()
        if "+" in method:  # a multi-task optimization method (gradlens.bench._weightings)
            weighted_step(self, method, every)
            return
        if method == "torchjd":
            self._torchjd_step()
            return
        losses, z = self.losses()
        if method == "plain":
            # the scalarization as one product (the profiler's own form): a Python sum of T
            # products launches 2T small kernels, a cost the profiled steps would not pay
            (self.wt @ torch.stack(list(losses.values()))).backward()
        elif method == "loop-libmtl":
            self._libmtl(losses)
        else:
            prof = self._profilers[(method, every)]
            prof.backward(losses, self.w, features=z if method == "features" else None)

    def warm(self, method: str, probes: int) -> None:
        """The untimed probes of a fresh profiler before its measured step: ``probes`` of them;
        for ``auto``, its deciding probes (it times its candidates), then ``probes`` of the engine
        it chose, so the measured step of ``auto`` is as far from its profiler's creation, and
        from the buffers the losing candidates freed, as an engine's is from its own."""
        while method == "auto" and self.deciding():
            self.step(method)
        for _ in range(probes):
            self.step(method)

    def deciding(self) -> bool:
        """Whether the ``auto`` profiler is still timing candidates for this graph."""
        engine = self._profilers[("auto", 1)]._engine
        return not any(d.winner for d in engine.decisions.values())  # type: ignore[attr-defined]  # the auto engine

    def chosen(self) -> str:
        """The engine the ``auto`` profiler chose."""
        return self._profilers[("auto", 1)]._engine.describe()  # type: ignore[attr-defined]  # the auto engine

    def _libmtl(self, losses: dict[str, torch.Tensor]) -> None:
        # LibMTL's pattern: T autograd.grad calls on the shared parameters, flatten, stack
        params = list(self.trunk.parameters())
        J = libmtl_jacobian(losses, params)
        _ = (J @ J.T).double()
        libmtl_write(self.wt, J, params, losses, list(self.heads.parameters()))

    def _torchjd_step(self) -> None:
        L, _ = torchjd_gramian(self)
        L.backward(self.wt)

    def close(self) -> None:
        for p in self._profilers.values():
            p.close()
        self._profilers = {}
