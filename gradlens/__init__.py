"""gradlens: measure how the tasks of a multi-task PyTorch model interfere.

Example:
    >>> import torch, gradlens as gl
    >>> trunk = torch.nn.Linear(3, 4); heads = torch.nn.ModuleList([torch.nn.Linear(4, 1)] * 2)
    >>> prof = gl.Profiler(trunk, tasks=["a", "b"], engine="gramian")
    >>> z = trunk(torch.randn(5, 3))
    >>> snap = prof.backward({"a": heads[0](z).mean(), "b": -heads[1](z).mean()})
    >>> round(snap.cosine()[0, 1].item(), 6)
    -1.0
    >>> prof.close()
"""

from gradlens._errors import GradlensError, GradlensWarning, MissingExtraError, StoreError
from gradlens._snapshot import TOTAL_LAYER, Snapshot
from gradlens.profiler import Profiler

__all__ = [
    "TOTAL_LAYER",
    "GradlensError",
    "GradlensWarning",
    "MissingExtraError",
    "Profiler",
    "Snapshot",
    "StoreError",
]
__version__ = "0.1.0"
