"""Gain of joint training at a weight selected on held-out seeds (:func:`selected_gain`).

Re-exported as :func:`gradlens.stats.selected_gain`. The arithmetic of one cell is
:func:`gradlens.stats._gain.cross_fit_gain`; this module finds the cells in a runs table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradlens._errors import GradlensError
from gradlens.stats import _args
from gradlens.stats import _gain as _gain

__all__ = ["selected_gain"]


def selected_gain(
    table: pd.DataFrame,
    *,
    select_col: str,
    size_cols: Sequence[str] = ("model.n_params",),
    seed_col: str = "seed",
    tasks_col: str = "tasks",
    metric: str = "accuracy",
    ci: float = 0.95,
) -> pd.DataFrame:
    """Gain of joint over single-task training at the weight chosen on held-out seeds.

    Per model size (``size_cols``) and joint task set, the configurations are the distinct
    ``weights.*`` values. For each seed ``s`` shared by the joint runs and the single-task
    baseline of a task, the configuration with the best mean ``select_col`` (e.g. validation
    accuracy) over the *other* seeds is picked, and the gain of that seed is its joint
    ``<metric>.<task>`` minus the baseline's, on the same seed. The reported gain is the mean
    of these held-out differences with a paired t interval and two-sided t-test
    (:func:`gradlens.stats._gain.cross_fit_gain`): the evaluated seed never took part in the
    choice, so a selection on scores that share run noise with the reported ones (validation
    and test of one run) leaves no optimism (measured in ``docs/stats.md``). Needs at least 2
    shared seeds; with fewer, or without a baseline, the row has NaN and a ``note``.

    Args:
        table: One row per run, joint and single-task (e.g. :func:`gradlens.stats.runs_table`).
        select_col: Column of the selection score of each joint run (higher is better).
        size_cols: Columns that identify a model size.
        seed_col: Seed column (joint and single-task runs pair on it).
        tasks_col: Column naming the run's tasks, ``"|"``-joined.
        metric: Score prefix: reported columns ``<metric>.<task>``.
        ci: Confidence level.

    Returns:
        One row per size, task set and task: ``*size_cols, tasks, task, weights.*`` (the
        configuration chosen on all seeds, for display), ``picked`` (JSON list of the
        configuration chosen for each seed, as ``weights.*`` dicts), ``gain, se, df, ci_low,
        ci_high, ci_level, p_value, interval, n_seeds, n_configs, note``.

    Example:
        >>> import pandas as pd
        >>> rows = [{"tasks": "a|b", "size": 1, "seed": s, "weights.a": w, "val": w + 0.01 * s,
        ...          "accuracy.a": 0.8 + w / 10 + 0.01 * s, "accuracy.b": 0.5}
        ...         for w in (0.2, 0.8) for s in range(3)]
        >>> rows += [{"tasks": "a", "size": 1, "seed": s, "accuracy.a": 0.8 + 0.01 * s}
        ...          for s in range(3)]
        >>> g = selected_gain(pd.DataFrame(rows), select_col="val", size_cols=["size"])
        >>> g[["task", "weights.a", "gain", "n_seeds"]].round(3).values.tolist()[0]
        ['a', 0.8, 0.08, 3]
    """

    table = _args.frame(table)
    scols = _args.columns(table, size_cols, "size_cols")
    _args.columns(table, [select_col, seed_col, tasks_col], "select_col/seed_col/tasks_col")
    level = _args.level(ci)
    wcols = [c for c in table.columns if str(c).startswith("weights.")]
    n_tasks = table[tasks_col].astype(str).str.split("|").str.len()
    single, joint = table[n_tasks == 1], table[n_tasks > 1]
    rows: list[dict[str, Any]] = []
    for key, sub in joint.groupby([*scols, tasks_col], sort=True, dropna=False):
        key_t = key if isinstance(key, tuple) else (key,)
        base = dict(zip([*scols, tasks_col], key_t))
        varying = [c for c in wcols if sub[c].nunique(dropna=True) > 1] or wcols[:1]
        uniq = sub[varying].drop_duplicates().sort_values(varying) if varying else None
        conf_keys = [tuple(r) for r in uniq.itertuples(index=False)] if uniq is not None else [()]
        size_mask = np.ones(len(single), dtype=bool)
        for c in scols:
            size_mask &= (single[c] == base[c]).to_numpy()
        for task in str(base[tasks_col]).split("|"):
            col = f"{metric}.{task}"
            if col not in table.columns:
                raise GradlensError(
                    f"`metric` should prefix score columns `<metric>.<task>`; found no {col!r}."
                )
            ref = single[size_mask & (single[tasks_col].astype(str) == task).to_numpy()]
            ref = ref.dropna(subset=[col]).drop_duplicates(subset=[seed_col], keep=False)
            seeds = sorted(set(ref[seed_col]) & set(sub[seed_col].dropna()), key=str)
            row: dict[str, Any] = {**base, "task": task}
            note = ""
            if ref.empty:
                note = f"no single-task run on {task} at this size"
            elif len(seeds) < 2:
                note = f"fewer than 2 seeds shared with the baseline ({len(seeds)})"
            K, S = len(conf_keys), len(seeds)
            sel, rep = _seed_matrices(sub, conf_keys, varying, seeds, seed_col, select_col, col)
            base_vals = ref.set_index(seed_col)[col].reindex(seeds).to_numpy(np.float64)
            if note:
                res: dict[str, Any] = {
                    **_gain.paired_t(np.empty(0), level),
                    "picked": [],
                    "n_seeds": 0,
                }
            else:
                res = _gain.cross_fit_gain(sel, rep, base_vals, level)
            with np.errstate(all="ignore"):
                full = np.nanmean(np.where(np.isfinite(sel), sel, np.nan), axis=1) if S else sel
            best = int(np.nanargmax(full)) if S and np.isfinite(full).any() else -1
            for c, v in zip(varying, conf_keys[best] if best >= 0 else [math.nan] * len(varying)):
                row[c] = v
            picked = [dict(zip(varying, conf_keys[k])) if k >= 0 else {} for k in res["picked"]]
            row.update(
                {
                    "picked": json.dumps(picked, default=float),
                    "gain": res["gain"],
                    "se": res["se"],
                    "df": res["df"],
                    "ci_low": res["ci_low"],
                    "ci_high": res["ci_high"],
                    "ci_level": level,
                    "p_value": res["p_value"],
                    "interval": "paired t, held-out selection",
                    "n_seeds": res["n_seeds"],
                    "n_configs": K,
                    "note": note,
                }
            )
            rows.append(row)
    return pd.DataFrame(rows)


def _seed_matrices(
    sub: pd.DataFrame,
    conf_keys: list[tuple[Any, ...]],
    varying: list[str],
    seeds: list[Any],
    seed_col: str,
    select_col: str,
    col: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Selection and reported scores, ``(configurations, seeds)``; NaN where a run is missing."""
    sel = np.full((len(conf_keys), len(seeds)), np.nan)
    rep = np.full((len(conf_keys), len(seeds)), np.nan)
    seed_index = {s: j for j, s in enumerate(seeds)}
    for k, ck in enumerate(conf_keys):
        mask = np.ones(len(sub), dtype=bool)
        for c, v in zip(varying, ck):
            mask &= (sub[c] == v).to_numpy() | (sub[c].isna() & pd.isna(v)).to_numpy()
        for _, r in sub[mask].iterrows():
            j = seed_index.get(r[seed_col])
            if j is not None:
                sel[k, j] = float(r[select_col])
                rep[k, j] = float(r[col])
    return sel, rep
