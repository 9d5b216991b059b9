"""Checks the harness runs before it allocates anything: the device exists, the model fits.

A model is sized up front by building it on PyTorch's ``meta`` device (shapes only, no memory);
beyond :data:`MAX_DEPTH` blocks or :data:`PARAMS_WITHOUT_YES` parameters it is refused unless
the caller confirms (``yes=True``, ``--yes`` on the command line), so a typo such as
``--depth 100000`` or ``--width 1e9`` is an immediate clear error, not a hang or a MemoryError.

Example:
    >>> check_device_available("cpu")
    device(type='cpu')
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from gradlens._errors import GradlensError

__all__: list[str] = []

#: Deeper models need ``yes=True``: building one is already slow (minutes at depth 10^4).
MAX_DEPTH = 64
#: Models with more parameters need ``yes=True`` (10^8 float32 parameters: 400 MB, and Adam
#: keeps two more copies).
PARAMS_WITHOUT_YES = 100_000_000


def check_device_available(device: str) -> torch.device:
    """``torch.device(device)`` if this machine has it, else a GradlensError saying why not."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GradlensError(
                f"`device` should be a device this machine has; found {device!r}, but CUDA is "
                f"not available here (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}). Use --device cpu."
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise GradlensError(
                f"`device` should be one of cuda:0 .. cuda:{n - 1}; found {device!r}."
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise GradlensError(f"`device` {device!r} is not available on this machine.")
    return dev


def check_model_size(
    cfg: Any, heads: Mapping[str, int], input_shape: tuple[int, ...], depth: int, yes: bool
) -> int:
    """Count the model's parameters without allocating them; refuse a huge one without ``yes``.

    Returns:
        The number of parameters (-1 when it was too large to count).
    """
    from gradlens.models import build_model

    if depth > MAX_DEPTH and not yes:
        raise GradlensError(
            f"`depth` {depth} is beyond the bound of {MAX_DEPTH} blocks for a {cfg.model!r} model "
            f"(building it alone would take minutes): pass --yes (yes=True) to build it anyway."
        )
    if yes:
        return -1
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, heads, input_shape, width=cfg.width, depth=depth)
        n = int(model.n_params()["total"])
    except (RuntimeError, OverflowError, ValueError) as exc:
        raise GradlensError(
            f"`width` {cfg.width:g} with depth {depth} gives a {cfg.model!r} model too large to "
            f"size ({exc}); choose a smaller width."
        ) from None
    if n > PARAMS_WITHOUT_YES:
        raise GradlensError(
            f"The {cfg.model!r} model of width {cfg.width:g} and depth {depth} has {n:,} "
            f"parameters, more than the bound of {PARAMS_WITHOUT_YES:,}: pass --yes (yes=True) "
            f"to build it anyway, or choose a smaller width or depth."
        )
    return n


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: as set), then restore the count.

    A run's numbers depend on its thread count (reductions split differently: up to 2e-5
    relative in the Grams between 1 and 2 threads), so the harness fixes it per run.

    Example:
        >>> n = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == n
        True
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
