"""Weight sweeps and population-based training, on a local process pool or on Ray.

A TOML file with a ``[train]`` table (the base :class:`gradlens.train.TrainConfig`), a ``[sweep]``
or ``[pbt]`` table and an optional ``[executor]`` table describes a whole study; ``gradlens sweep
CONFIG.toml`` and ``gradlens pbt CONFIG.toml`` run it, and a rerun resumes it. See docs/search.md.

Example:
    >>> import tempfile, pathlib
    >>> from gradlens.search import load_config, plan_sweep
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "sweep.toml"
    >>> _ = f.write_text('''
    ... [train]
    ... dataset = "multidigits"
    ... epochs = 1
    ... [sweep]
    ... p = [0.1, 0.5, 0.9]
    ... seeds = [0, 1]
    ... baselines = true
    ... ''')
    >>> cfg = load_config(f)
    >>> len(plan_sweep(cfg, ("left", "right")))  # 3 weights x 2 seeds + 2 baselines x 2 seeds
    10
"""

from gradlens.search._config import ExecutorSpec, PBTSpec, SearchConfig, SweepSpec, load_config
from gradlens.search.executors import Executor, Host, LocalExecutor, RayExecutor, make_executor
from gradlens.search.pbt import format_pbt, pbt_score, run_pbt
from gradlens.search.simplex import dirichlet_weights, grid_size, perturb_weights, simplex_grid
from gradlens.search.sweep import PlannedRun, format_sweep, plan_sweep, run_sweep

__all__ = [
    "Executor",
    "ExecutorSpec",
    "Host",
    "LocalExecutor",
    "PBTSpec",
    "PlannedRun",
    "RayExecutor",
    "SearchConfig",
    "SweepSpec",
    "dirichlet_weights",
    "format_pbt",
    "format_sweep",
    "grid_size",
    "load_config",
    "make_executor",
    "pbt_score",
    "perturb_weights",
    "plan_sweep",
    "run_pbt",
    "run_sweep",
    "simplex_grid",
]
