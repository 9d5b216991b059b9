"""Nash-MTL from the Gram, written here because no maintained library has it as a Gram function.

Its update is ``J^T a(G)``: the weights depend on the Gram matrix only, so gradlens runs it from
the Gram it measures anyway, per step or per layer. (CAGrad: :mod:`gradlens.weightings._cagrad`.)
"""

from __future__ import annotations

import torch

from gradlens._errors import GradlensError

__all__ = ["NashMTL", "check_gram"]


def check_gram(gram: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        found = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise GradlensError(f"`gram` given to {who} should be a square matrix; found {found}.")
    return gram.detach().to("cpu", torch.float64)


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
        G = check_gram(gram, "NashMTL")
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
