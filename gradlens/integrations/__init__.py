"""Integrations with frameworks that own the training loop (optional extras).

- :mod:`gradlens.integrations.lightning`: ``GradlensCallback`` for PyTorch Lightning
  (``pip install 'gradlens[lightning]'``).
- :mod:`gradlens.integrations.transformers`: ``GradlensTrainerCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'gradlens[transformers]'``).

Dashboards (Weights & Biases, MLflow, TensorBoard) are sinks: see :mod:`gradlens.sinks`; a live
terminal view of a run is ``gradlens watch RUN_DIR``.
"""

from __future__ import annotations

__all__: list[str] = []
