"""The private NumPy kernels and argument conversion shared by the pure functions
(:mod:`~gradlens.metrics.functional`), the tidy tables (:mod:`~gradlens.metrics.frame`) and
:class:`~gradlens.metrics.summary.StreamingSummary`: each formula is written once, here.

Every kernel takes float64 ndarrays of shape ``(..., T, T)`` (or ``(..., T)`` for norms) and
returns NaN, never a warning, where a zero-gradient task makes a ratio undefined.

Example:
    >>> import numpy as np
    >>> cosine(np.array([[4.0, -2.0], [-2.0, 1.0]]))[0, 1].item()
    -1.0
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

from gradlens._errors import GradlensError

__all__: list[str] = []

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

# --------------------------------------------------------------------------- conversion helpers


def as_gram(G: Any, name: str = "G") -> np.ndarray:
    """``G`` as a float64 ndarray of shape (..., T, T) (a tensor is detached and copied to CPU)."""
    if isinstance(G, torch.Tensor):
        arr = G.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(G, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise GradlensError(
                f"`{name}` should be a torch.Tensor or numpy.ndarray of real numbers; "
                f"found {type(G).__name__} ({exc})."
            ) from None
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise GradlensError(
            f"`{name}` should have shape (..., T, T) (a square Gram matrix per batch entry); "
            f"found shape {tuple(arr.shape)}."
        )
    return arr


def like(G: ArrayT, x: np.ndarray) -> ArrayT:
    """The result ``x`` as the array type of the input ``G``: a tensor on ``G``'s device, or an
    ndarray."""
    if isinstance(G, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(x)).to(G.device)
    return np.asarray(x)


def as_float_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GradlensError(
            f"`{name}` should be a number, torch.Tensor or numpy.ndarray; "
            f"found {type(x).__name__} ({exc})."
        ) from None


def as_weights(w: Any, g: np.ndarray, name: str = "w") -> np.ndarray:
    arr = as_float_array(w, name)
    T = g.shape[-1]
    if arr.ndim < 1 or arr.shape[-1] != T:
        raise GradlensError(
            f"`{name}` should have shape (..., T) with T = {T} tasks (one weight per task); "
            f"found shape {tuple(arr.shape)}."
        )
    try:
        np.broadcast_shapes(arr.shape[:-1], g.shape[:-2])
    except ValueError:
        raise GradlensError(
            f"`{name}` leading dimensions {tuple(arr.shape[:-1])} do not broadcast with the batch "
            f"dimensions of `G` {tuple(g.shape[:-2])}."
        ) from None
    return arr


def as_lr(lr: Any, g: np.ndarray) -> np.ndarray:
    arr = as_float_array(lr, "lr")
    try:
        np.broadcast_shapes(arr.shape, g.shape[:-2])
    except ValueError:
        raise GradlensError(
            f"`lr` should be a number or an array broadcasting with the batch dimensions of `G` "
            f"{tuple(g.shape[:-2])}; found shape {tuple(arr.shape)}."
        ) from None
    return arr


def as_step(G: Any, w: Any, lr: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G, w, lr)`` of a first-order step, checked and converted (see :func:`as_weights`)."""
    g = as_gram(G)
    return g, as_weights(w, g), as_lr(lr, g)


# --------------------------------------------------------------------------- NumPy kernels


def diag(g: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0.0, None)
    return out


def norms(g: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.sqrt(diag(g))
    return out


def cosine(g: np.ndarray) -> np.ndarray:
    n = norms(g)
    denom = n[..., :, None] * n[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(g / denom, -1.0, 1.0)
    out = np.where(denom > 0, out, np.nan)
    T = g.shape[-1]
    idx = np.arange(T)
    out[..., idx, idx] = np.where(n > 0, 1.0, np.nan)
    return out


def conflict(cos: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(cos), np.nan, (cos < 0).astype(np.float64))


def gms(g: np.ndarray) -> np.ndarray:
    d = diag(g)
    n = np.sqrt(d)
    num = 2.0 * n[..., :, None] * n[..., None, :]
    den = d[..., :, None] + d[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(num / den, 0.0, 1.0)
    return np.where(num > 0, out, np.nan)


def norm_ratio(n: np.ndarray) -> np.ndarray:
    lo = n.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n.max(axis=-1) / lo
    return np.where(lo > 0, out, np.nan)


def norm_cv(n: np.ndarray) -> np.ndarray:
    mean = n.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n.std(axis=-1) / mean
    return np.where(mean > 0, out, np.nan)


def g_times_w(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.matmul(g, w[..., :, None])[..., 0]
    return out


def cos_to_update(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    gw = g_times_w(g, w)
    u = np.sqrt(np.clip(np.sum(w * gw, axis=-1), 0.0, None))
    denom = norms(g) * u[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.clip(gw / denom, -1.0, 1.0)
    return np.where(denom > 0, out, np.nan)
