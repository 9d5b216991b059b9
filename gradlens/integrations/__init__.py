"""Integrations with frameworks that own the training loop (optional extras).

- :mod:`gradlens.integrations.lightning`: ``GradlensCallback`` for PyTorch Lightning
  (``pip install 'gradlens[lightning]'``).
"""

from __future__ import annotations

__all__: list[str] = []
