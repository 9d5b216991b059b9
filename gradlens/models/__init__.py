"""Scalable multi-task model families: a shared trunk plus one linear head per task.

Families (``width`` scales channels / hidden sizes, ``depth`` counts blocks):

- ``"mlp"``: flatten, ``depth`` x (Linear(256 width) + ReLU).
- ``"resnet"``: stem + three stages of ``depth`` residual BasicBlocks (BatchNorm) with
  16/32/64 x width channels, global average pooling (``depth = 1, 2, 3``: ResNet-8/14/20).
- ``"vit"``: patch embedding, CLS token, ``depth`` pre-LayerNorm transformer blocks (4 heads,
  dimension 64 x width, GELU MLP), CLS features.

Example:
    >>> import torch
    >>> from gradlens.models import build_model
    >>> m = build_model("resnet", {"left": 10, "right": 10}, (1, 8, 16), width=0.5, seed=0)
    >>> {t: tuple(y.shape) for t, y in m(torch.zeros(4, 1, 8, 16)).items()}
    {'left': (4, 10), 'right': (4, 10)}
    >>> m.n_params()["total"] == sum(p.numel() for p in m.parameters())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from gradlens._errors import GradlensError
from gradlens._validate import check_choice, check_int, check_number
from gradlens.models._base import MultiTaskModel
from gradlens.models._families import _mlp_trunk, _resnet_trunk, _vit_trunk

__all__ = ["DEFAULT_DEPTH", "FAMILIES", "GRID", "MultiTaskModel", "build_model"]

_Trunk = Callable[[tuple[int, ...], float, int], tuple[nn.Module, int]]
#: family -> (trunk builder, number of input dimensions it needs; 0 = any).
_FAMILIES: dict[str, tuple[_Trunk, int]] = {
    "mlp": (_mlp_trunk, 0),
    "resnet": (_resnet_trunk, 3),
    "vit": (_vit_trunk, 3),
}
#: Names accepted by :func:`build_model`.
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
#: Depth used when ``depth`` is not given.
DEFAULT_DEPTH: dict[str, int] = {"mlp": 2, "resnet": 1, "vit": 2}
#: The size grid of a paper-style study: 3 widths x 3 depths per family.
GRID: dict[str, dict[str, tuple[float, ...] | tuple[int, ...]]] = {
    "mlp": {"widths": (0.5, 1.0, 2.0), "depths": (1, 2, 4)},
    "resnet": {"widths": (0.5, 1.0, 2.0), "depths": (1, 2, 3)},
    "vit": {"widths": (0.5, 1.0, 2.0), "depths": (1, 2, 4)},
}


def _check_heads(heads: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(heads, Mapping) or not heads:
        raise GradlensError(
            f"`heads` should be a non-empty mapping task name -> number of outputs; found "
            f"{heads!r}."
        )
    out = {}
    for name, n in heads.items():
        if not isinstance(name, str) or not name or "." in name:
            raise GradlensError(
                f"`heads` keys should be non-empty task names without '.'; found {name!r}."
            )
        out[name] = check_int(f"heads[{name!r}]", n, minimum=1)
    return out


def build_model(
    family: str,
    heads: Mapping[str, int],
    input_shape: tuple[int, ...],
    *,
    width: float = 1.0,
    depth: int | None = None,
    seed: int | None = None,
) -> MultiTaskModel:
    """Build a shared trunk of ``family`` and one ``Linear(feature_dim, n_out)`` head per task.

    Args:
        family: one of :data:`FAMILIES`.
        heads: task name -> number of outputs of its head.
        input_shape: shape of one input without the batch axis; ``"resnet"`` and ``"vit"``
            need ``(channels, height, width)``.
        width: multiplies channels / hidden sizes (positive).
        depth: number of blocks (:data:`DEFAULT_DEPTH` when ``None``); for ``"resnet"`` per stage.
        seed: when given, parameters are initialised from this seed without touching the global
            random state; the same seed gives identical parameters.

    Example:
        >>> m = build_model("mlp", {"a": 3}, (1, 8, 8), width=0.5, depth=1, seed=0)
        >>> m.config["family"], m.n_params()
        ('mlp', {'trunk': 8320, 'heads': 387, 'total': 8707})
    """
    check_choice("family", family, FAMILIES)
    trunk_fn, needs_ndim = _FAMILIES[family]
    heads = _check_heads(heads)
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise GradlensError(
            f"`input_shape` should be a tuple of positive ints; found {input_shape!r}."
        )
    if needs_ndim and len(shape) != needs_ndim:
        raise GradlensError(
            f"`input_shape` for {family!r} should be (channels, height, width); found {shape}."
        )
    check_number("width", width, low=0.0, strict_low=True)
    depth = DEFAULT_DEPTH[family] if depth is None else depth
    check_int("depth", depth, minimum=1)
    check_int("seed", seed, none_ok=True)

    def make() -> MultiTaskModel:
        trunk, d = trunk_fn(shape, float(width), depth)
        config = {
            "family": family,
            "width": float(width),
            "depth": depth,
            "input_shape": shape,
            "heads": dict(heads),
            "feature_dim": d,
        }
        return MultiTaskModel(trunk, {t: nn.Linear(d, n) for t, n in heads.items()}, config)

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
