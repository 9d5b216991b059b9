"""CAGrad from the Gram (scipy's SLSQP solves its simplex problem, as the official code does).

No maintained library has it as a function of the Gram with the official update (TorchJD's
``CAGradWeighting`` needs cvxpy and omits the rescaling); its update is ``J^T w(G)``.
"""

from __future__ import annotations

import torch

from gradlens._errors import GradlensError, require
from gradlens.weightings._gram import check_gram

__all__ = ["CAGrad"]


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
        A = check_gram(gram, "CAGrad").numpy()
        T = A.shape[0]
        b = np.ones(T) / T
        g0_norm = float(np.sqrt(max(float(b @ A @ b), 0.0) + 1e-8))
        cc = self.c * g0_norm + 1e-8

        def obj(x: object) -> float:
            return float(x @ A @ b + cc * np.sqrt(max(float(x @ A @ x), 0.0) + 1e-8))

        res = optimize.minimize(
            obj,
            b,
            bounds=[(0.0, 1.0)] * T,
            constraints=({"type": "eq", "fun": lambda x: 1.0 - float(x.sum())},),
            method="SLSQP",
            options={"ftol": self.ftol, "maxiter": 500},
        )
        return torch.as_tensor(res.x, dtype=torch.float64).clamp_min(0.0)

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        G = check_gram(gram, "CAGrad")
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
