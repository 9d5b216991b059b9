"""Weighting methods by name, as the harness (``TrainConfig(weighting=...)``) names them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradlens._errors import GradlensError, require
from gradlens.weightings._apply import Signed
from gradlens.weightings._cagrad import CAGrad
from gradlens.weightings._gram import NashMTL
from gradlens.weightings._loss import DWA, LossWeighting, RandomLossWeighting, UncertaintyWeighting

__all__ = ["GRAM_METHODS", "LOSS_METHODS", "METHODS", "make_weighting"]


def _torchjd(cls: str, signed: bool = False) -> Callable[[], Any]:
    def make() -> Any:
        agg = require("torchjd.aggregation", "weightings", f"the {cls} weighting")
        w = getattr(agg, cls)()
        return Signed(w) if signed else w

    return make


#: Gram weightings: name -> factory of a callable Gram -> weights (TorchJD's where it has one).
GRAM_METHODS: dict[str, Callable[[], Any]] = {
    "upgrad": _torchjd("UPGradWeighting"),
    "mgda": _torchjd("MGDAWeighting"),
    "pcgrad": _torchjd("PCGradWeighting"),
    "imtl_g": _torchjd("IMTLGWeighting", signed=True),
    "aligned_mtl": _torchjd("AlignedMTLWeighting", signed=True),
    "dualproj": _torchjd("DualProjWeighting"),
    "cagrad": CAGrad,
    "nash_mtl": NashMTL,
}

#: Loss-based weightings: name -> class taking ``(tasks, ...)``.
LOSS_METHODS: dict[str, type[LossWeighting]] = {
    "uncertainty": UncertaintyWeighting,
    "rlw": RandomLossWeighting,
    "dwa": DWA,
}

#: Every method name (``TrainConfig.weighting``, ``gradlens train --weighting``).
METHODS: tuple[str, ...] = (*GRAM_METHODS, *LOSS_METHODS)


def make_weighting(name: str, tasks: Sequence[str], seed: int = 0) -> Any:
    """A fresh weighting by name: a Gram callable, or a :class:`LossWeighting` for ``tasks``.

    Example:
        >>> make_weighting("nash_mtl", ["a", "b"])
        NashMTL()
        >>> make_weighting("dwa", ["a", "b"]).name
        'dwa'
        >>> make_weighting("gradnorm", ["a"])
        Traceback (most recent call last):
        ...
        gradlens._errors.GradlensError: `weighting` should be one of ['upgrad', 'mgda', \
'pcgrad', 'imtl_g', 'aligned_mtl', 'dualproj', 'cagrad', 'nash_mtl', 'uncertainty', 'rlw', \
'dwa']; found 'gradnorm'.
    """
    if name in GRAM_METHODS:
        return GRAM_METHODS[name]()
    if name == "rlw":
        return RandomLossWeighting(tasks, seed=seed)
    if name in LOSS_METHODS:
        return LOSS_METHODS[name](tasks)
    raise GradlensError(f"`weighting` should be one of {list(METHODS)}; found {name!r}.")
