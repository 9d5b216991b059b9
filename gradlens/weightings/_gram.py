"""Gram weightings written here because no maintained library has them as Gram functions.

Both updates are ``J^T w(G)``: the weights depend on the Gram matrix only, so gradlens runs them
from the Gram it measures anyway, per step or per layer.
"""

from __future__ import annotations

import torch

from gradlens._errors import GradlensError, require

__all__ = ["CAGrad", "NashMTL"]


def _check_gram(gram: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        found = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise GradlensError(f"`gram` given to {who} should be a square matrix; found {found}.")
    return gram.detach().to("cpu", torch.float64)


class CAGrad:
    """Conflict-averse gradient descent (Liu et al., NeurIPS 2021), from the Gram.

    The official implementation's update is ``g = (g0 + lam * G_w) / (1 + c^2)`` with
    ``g0 = J^T 1/T`` the mean gradient, ``w`` on the simplex minimising
    ``w^T G 1/T + c |g0| sqrt(w^T G w + 1e-8)`` (``|g0|^2 = 1^T G 1 / T^2``),
    ``G_w = J^T w`` and ``lam = c |g0| / (|G_w| + 1e-8)``. Every term is a function of ``G``, so
    the weights are ``(1/T + lam * w) / (1 + c^2)`` (``rescale=1``, the official default;
    ``rescale=0`` drops the division, ``2`` divides by ``1 + c``). The simplex problem is solved
    with scipy's SLSQP, as the official code does (tolerance ``ftol``), from ``w = 1/T``.
    TorchJD's ``CAGradWeighting`` solves the same problem with cvxpy and omits the rescaling.

    Args:
        c: the radius scale (the paper's ``c``, official default 0.4 in LibMTL, 0.5 in the paper's
            code).
        rescale: 0, 1 or 2, as in the official code.
        ftol: SLSQP's tolerance on the objective.

    Example:
        >>> import torch
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
        >>> w = CAGrad(c=0.5)(G)  # symmetric tasks: equal weights
        >>> round(float(w[0] - w[1]), 6), bool((w > 0).all())
        (0.0, True)
    """

    def __init__(self, c: float = 0.4, rescale: int = 1, ftol: float = 1e-12) -> None:
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not c >= 0:
            raise GradlensError(f"`c` should be a number >= 0; found {c!r}.")
        if rescale not in (0, 1, 2):
            raise GradlensError(f"`rescale` should be 0, 1 or 2; found {rescale!r}.")
        self.c = float(c)
        self.rescale = rescale
        self.ftol = ftol

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale})"

    def simplex_weights(self, gram: torch.Tensor) -> torch.Tensor:
        """The inner problem's solution ``w`` on the simplex."""
        np = require("numpy", "weightings", "CAGrad")
        optimize = require("scipy.optimize", "weightings", "CAGrad")
        A = _check_gram(gram, "CAGrad").numpy()
        T = A.shape[0]
        b = np.ones(T) / T  # type: ignore[attr-defined]
        g0_norm = float(np.sqrt(max(float(b @ A @ b), 0.0) + 1e-8))  # type: ignore[attr-defined]
        cc = self.c * g0_norm + 1e-8

        def obj(x: object) -> float:
            return float(x @ A @ b + cc * np.sqrt(max(float(x @ A @ x), 0.0) + 1e-8))  # type: ignore[attr-defined,operator]

        res = optimize.minimize(  # type: ignore[attr-defined]
            obj,
            b,
            bounds=[(0.0, 1.0)] * T,
            constraints=({"type": "eq", "fun": lambda x: 1.0 - float(x.sum())},),
            method="SLSQP",
            options={"ftol": self.ftol, "maxiter": 500},
        )
        return torch.as_tensor(res.x, dtype=torch.float64).clamp_min(0.0)

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        G = _check_gram(gram, "CAGrad")
        T = G.shape[0]
        b = torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.simplex_weights(G)
        g0_norm = float((b @ G @ b).clamp_min(0.0).add(1e-8).sqrt())
        gw_norm = float((w @ G @ w).clamp_min(0.0).sqrt())
        lam = (self.c * g0_norm + 1e-8) / (gw_norm + 1e-8)
        out = b + lam * w
        if self.rescale == 1:
            out = out / (1 + self.c**2)
        elif self.rescale == 2:
            out = out / (1 + self.c)
        return out.to(gram.dtype)


class NashMTL:
    """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution, from the Gram.

    The weights ``a > 0`` solve ``(G_hat a)_t = 1 / a_t`` for every task, with
    ``G_hat = G / |G|_F`` (the official code normalises the Gram so). This is the stationarity
    condition of the strictly convex ``f(a) = a^T G_hat a / 2 - sum_t log a_t``, minimised here
    by damped Newton steps to ``tol`` (the official code runs up to 20 sequential convex
    approximations with cvxpy instead, an approximation of the same solution; TorchJD's
    ``NashMTL`` wraps that code and needs cvxpy). The solution does not exist when a positive
    combination of the task gradients is exactly zero (a Pareto-stationary point); a ridge of
    ``eps`` times the mean diagonal keeps the problem solvable there.

    Example:
        >>> import torch
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> a = NashMTL()(G)  # orthogonal tasks: a_t = 1 / |g_hat_t|
        >>> Gh = G / G.norm()
        >>> torch.allclose(Gh @ a, 1 / a)
        True
    """

    def __init__(self, tol: float = 1e-13, max_iter: int = 100, eps: float = 1e-10) -> None:
        self.tol = tol
        self.max_iter = max_iter
        self.eps = eps

    def __repr__(self) -> str:
        return "NashMTL()"

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        G = _check_gram(gram, "NashMTL")
        T = G.shape[0]
        norm = float(G.norm())
        if norm == 0.0:
            return torch.ones(T, dtype=gram.dtype)
        H = G / norm
        H = H + self.eps * float(H.diagonal().mean()) * torch.eye(T, dtype=torch.float64)
        a = 1.0 / H.diagonal().clamp_min(1e-300).sqrt()  # exact for orthogonal tasks

        def f(x: torch.Tensor) -> float:
            return float(0.5 * x @ H @ x - torch.log(x).sum())

        for _ in range(self.max_iter):
            grad = H @ a - 1.0 / a
            if float(grad.abs().max()) <= self.tol * max(1.0, float((1.0 / a).abs().max())):
                break
            hess = H + torch.diag(1.0 / a**2)
            step = torch.linalg.solve(hess, grad)
            t, fa = 1.0, f(a)
            while True:  # stay positive, then backtrack on f (Armijo)
                cand = a - t * step
                if bool((cand > 0).all()) and f(cand) <= fa - 1e-4 * t * float(grad @ step):
                    break
                t *= 0.5
                if t < 1e-20:
                    cand = a
                    break
            if cand is a:
                break
            a = cand
        return a.to(gram.dtype)
