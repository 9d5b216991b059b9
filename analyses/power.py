"""Power of the study's tests for stated effects, by simulation (the next run's design).

Each finding's test is simulated under its stated effect (power) and under the null or at the
margin (size), with noise levels read from the committed small-run results in ``figures/``
(:func:`noise_levels`). Designs compared: the small run we did (``current``) and the plan of
analyses/_design.py (``proposed``).

- Finding 1: the gain's slope on ``log10(parameters)``, a stated effect of +3 points per decade.
  Cells are (family, size); each cell's gain is the mean over ``seeds`` of a paired difference
  (seed noise) plus a size-level deviation from the line (heterogeneity). Tests: Spearman over
  cells (what the small run used) and OLS of the gain on ``log10(parameters)`` with a family
  intercept, t-test of the slope.
- Finding 2: equivalence of the conflict-accuracy correlation with 0, margin ``|r| < 0.2``.
  Within runs: per-run Pearson r of two AR(1) series (lag-1 autocorrelation 0.6, as measured),
  Fisher z pooled over runs with a random-effects t-interval (the runs' spread is the error), TOST
  at 5 %. Across runs: ``configs`` configurations x ``seeds`` seeds, run-level values sharing a
  configuration effect (intra-class correlation ``icc``); Fisher z with the design-effect n.
- Finding 3: equivalence of the ``p*`` slope with 0, margin ``|slope| < 0.05`` per decade (a shift
  of 0.15 across 3 decades); per-size ``p*`` noise from the small run's intervals.
- PBT and MTO arms: paired differences over replicates, superiority power for +0.5 points (the
  paper's largest PBT effect, +0.44) and TOST equivalence at a 0.5-point margin.

    python -m analyses.power            # 4,000 simulations per cell; writes figures/power.json/png
    python -m analyses.power --quick    # 200 simulations (tests)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analyses._common import FIGURES, ROOT, save_figure, write_json
from analyses._design import FAMILY_SIZES, STUDY

__all__ = [
    "main",
    "noise_levels",
    "power_across",
    "power_paired",
    "power_pstar_slope",
    "power_trend",
    "power_within",
]

ALPHA = 0.05
#: Stated effects and margins (fixed before the run).
EFFECTS = {
    "finding1_slope_points_per_decade": 3.0,
    "finding2_equivalence_margin_r": 0.2,
    "finding3_equivalence_margin_slope_per_decade": 0.05,
    "pbt_effect_points": 0.5,
    "pbt_equivalence_margin_points": 0.5,
}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t_ppf(q: float, df: np.ndarray | float) -> np.ndarray:
    from scipy import stats as st

    return np.asarray(st.t.ppf(q, df))


def _grid(
    decades: float, sizes: int, families: int, log_params: Sequence[Sequence[float]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (log10 parameters, from 0) and the family index of every cell of a design."""
    if log_params is not None:
        x = np.concatenate([np.asarray(f, float) - min(f) for f in log_params])
        fam = np.concatenate([np.full(len(f), k) for k, f in enumerate(log_params)])
        return x, fam
    return np.tile(np.linspace(0.0, decades, sizes), families), np.repeat(
        np.arange(families), sizes
    )


def power_trend(
    *,
    slope: float,
    decades: float = 0.0,
    sizes: int = 0,
    families: int = 1,
    seeds: int,
    sd_seed: float,
    sd_size: float,
    n_sim: int,
    seed: int = 0,
    log_params: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Power of the Spearman and the OLS-slope tests of finding 1 (two-sided, 5 %).

    ``sd_seed``: SD of one seed's paired gain (joint - single); ``sd_size``: SD of a size's true
    gain around the line. Both in accuracy points, like ``slope`` (points per decade). The sizes
    are ``sizes`` evenly spaced over ``decades`` for each of ``families``, or, with
    ``log_params``, the given ``log10(parameters)`` of each family.

    Example:
        >>> p = power_trend(slope=0.0, decades=2, sizes=6, families=1, seeds=5, sd_seed=1,
        ...                 sd_size=1, n_sim=400)
        >>> 0.0 < p["ols"] < 0.12
        True
    """
    from scipy import stats as st

    rng = _rng(seed)
    x, fam = _grid(decades, sizes, families, log_params)
    families = int(fam.max()) + 1
    k = len(x)
    noise = rng.normal(0, sd_size, (n_sim, k)) + rng.normal(
        0, sd_seed / math.sqrt(seeds), (n_sim, k)
    )
    y = slope * x + noise
    # OLS with one intercept per family: centre x and y within family
    xc = x - np.array([x[fam == f].mean() for f in fam])
    ym = np.stack([y[:, fam == f].mean(axis=1) for f in range(families)], axis=1)[:, fam]
    yc = y - ym
    b = (yc @ xc) / (xc @ xc)
    resid = yc - b[:, None] * xc
    df = k - families - 1
    se = np.sqrt((resid**2).sum(axis=1) / df / (xc @ xc))
    p_ols = 2 * st.t.sf(np.abs(b / se), df)
    # Spearman per simulation: Pearson of the ranks (x has no ties within a family)
    rx = st.rankdata(x) - (k + 1) / 2
    ry = st.rankdata(y, axis=1) - (k + 1) / 2
    rho = (ry @ rx) / np.sqrt((rx @ rx) * (ry**2).sum(axis=1))
    t = rho * np.sqrt((k - 2) / np.maximum(1 - rho**2, 1e-12))
    p_sp = 2 * st.t.sf(np.abs(t), k - 2)
    return {"spearman": float((p_sp < ALPHA).mean()), "ols": float((p_ols < ALPHA).mean())}


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    e = rng.normal(size=shape)
    out = np.empty(shape)
    out[..., 0] = e[..., 0]
    for t in range(1, shape[-1]):
        out[..., t] = phi * out[..., t - 1] + math.sqrt(1 - phi**2) * e[..., t]
    return out


def power_within(
    *,
    true_r: float,
    runs: int,
    epochs: int,
    phi: float,
    margin: float,
    tau: float,
    n_sim: int,
    seed: int = 0,
) -> dict[str, float]:
    """Within-run finding 2: Fisher-z pooling of per-run Pearson r, random-effects TOST.

    The per-run true correlation is ``tanh(atanh(true_r) + N(0, tau))``; both series are AR(1)
    with coefficient ``phi``. Returns the share of simulations concluding equivalence
    (``|r| < margin``: the 90 % t-interval of the mean z inside ``+-atanh(margin)``) and the share
    rejecting r = 0 (two-sided 5 %).

    Example:
        >>> p = power_within(true_r=0.0, runs=10, epochs=20, phi=0.6, margin=0.2, tau=0.1,
        ...                  n_sim=200)
        >>> 0.0 <= p["equivalent"] <= 1.0
        True
    """
    rng = _rng(seed)
    z_true = math.atanh(true_r) + rng.normal(0, tau, (n_sim, runs))
    r_true = np.tanh(z_true)
    a = _ar1(rng, (n_sim, runs, epochs), phi)
    c = _ar1(rng, (n_sim, runs, epochs), phi)
    b = r_true[..., None] * a + np.sqrt(1 - r_true[..., None] ** 2) * c
    ac = a - a.mean(-1, keepdims=True)
    bc = b - b.mean(-1, keepdims=True)
    r = (ac * bc).sum(-1) / np.sqrt((ac**2).sum(-1) * (bc**2).sum(-1))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    m, s = z.mean(1), z.std(1, ddof=1) / math.sqrt(runs)
    t90, t95 = float(_t_ppf(0.95, runs - 1)), float(_t_ppf(0.975, runs - 1))
    lim = math.atanh(margin)
    equiv = (m - t90 * s > -lim) & (m + t90 * s < lim)
    reject = np.abs(m) > t95 * s
    return {"equivalent": float(equiv.mean()), "reject_zero": float(reject.mean())}


def power_across(
    *,
    true_r: float,
    configs: int,
    seeds: int,
    icc: float,
    margin: float,
    n_sim: int,
    seed: int = 0,
) -> dict[str, float]:
    """Across-run finding 2: Pearson r over ``configs * seeds`` runs, TOST with a design effect.

    Each run's two values share their configuration's effects (intra-class correlation ``icc``
    of each variable); the correlation ``true_r`` holds at both levels. The test's n is
    ``configs * seeds / (1 + (seeds - 1) * icc)``.

    Example:
        >>> p = power_across(true_r=0.0, configs=30, seeds=5, icc=0.5, margin=0.2, n_sim=200)
        >>> 0.0 <= p["equivalent"] <= 1.0
        True
    """
    rng = _rng(seed)
    cov = np.array([[1.0, true_r], [true_r, 1.0]])
    between = rng.multivariate_normal([0, 0], cov * icc, size=(n_sim, configs))
    within = rng.multivariate_normal([0, 0], cov * (1 - icc), size=(n_sim, configs, seeds))
    v = between[:, :, None, :] + within
    x, y = v[..., 0].reshape(n_sim, -1), v[..., 1].reshape(n_sim, -1)
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    r = (xc * yc).sum(1) / np.sqrt((xc**2).sum(1) * (yc**2).sum(1))
    n_eff = configs * seeds / (1 + (seeds - 1) * icc)
    se = 1 / math.sqrt(max(n_eff - 3, 1.0))
    z, lim = np.arctanh(r), math.atanh(margin)
    equiv = (z - 1.645 * se > -lim) & (z + 1.645 * se < lim)
    return {"equivalent": float(equiv.mean()), "n_effective": n_eff}


def power_pstar_slope(
    *,
    slope: float,
    decades: float = 0.0,
    sizes: int = 0,
    families: int = 1,
    sd_pstar: float,
    margin: float,
    n_sim: int,
    seed: int = 0,
    log_params: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Finding 3: OLS slope of ``p*`` on ``log10(parameters)`` (family intercepts), TOST.

    Sizes as in :func:`power_trend`.

    Example:
        >>> p = power_pstar_slope(slope=0.0, decades=3, sizes=6, families=3, sd_pstar=0.05,
        ...                       margin=0.05, n_sim=200)
        >>> p["equivalent"] > 0.5
        True
    """
    rng = _rng(seed)
    x, fam = _grid(decades, sizes, families, log_params)
    families = int(fam.max()) + 1
    y = slope * x + rng.normal(0, sd_pstar, (n_sim, len(x)))
    xc = x - np.array([x[fam == f].mean() for f in fam])
    ym = np.stack([y[:, fam == f].mean(axis=1) for f in range(families)], axis=1)[:, fam]
    yc = y - ym
    b = (yc @ xc) / (xc @ xc)
    df = len(x) - families - 1
    se = np.sqrt(((yc - b[:, None] * xc) ** 2).sum(1) / df / (xc @ xc))
    t90 = float(_t_ppf(0.95, df))
    equiv = (b - t90 * se > -margin) & (b + t90 * se < margin)
    return {"equivalent": float(equiv.mean()), "ci90_halfwidth_median": float(np.median(t90 * se))}


def power_paired(
    *, effect: float, replicates: int, sd_diff: float, margin: float, n_sim: int, seed: int = 0
) -> dict[str, float]:
    """PBT / MTO arms: paired t over replicates: superiority power at ``effect`` and TOST power
    at a true difference of 0 (margin ``margin``), all in accuracy points.

    Example:
        >>> p = power_paired(effect=0.5, replicates=10, sd_diff=0.4, margin=0.5, n_sim=400)
        >>> p["superiority"] > 0.8
        True
    """
    rng = _rng(seed)
    out = {}
    for name, mu in (("superiority", effect), ("equivalence", 0.0)):
        d = rng.normal(mu, sd_diff, (n_sim, replicates))
        m, s = d.mean(1), d.std(1, ddof=1) / math.sqrt(replicates)
        if name == "superiority":
            out[name] = float((np.abs(m) > float(_t_ppf(0.975, replicates - 1)) * s).mean())
        else:
            t90 = float(_t_ppf(0.95, replicates - 1))
            out[name] = float(((m - t90 * s > -margin) & (m + t90 * s < margin)).mean())
    return out


def _seed_sd(gains: list[dict[str, Any]], n_seeds: int) -> float:
    """Median SD (points) of one seed's paired gain over the cells ``gains`` (see
    :func:`noise_levels`)."""
    if n_seeds < 2:
        return math.nan
    se = [r.get("se_seed", r.get("se")) for r in gains]
    if gains and all(v is not None for v in se) and "se" in gains[0]:
        n = [r.get("n_joint") or n_seeds for r in gains]
        return float(np.median([100 * v * math.sqrt(k) for v, k in zip(se, n)]))
    half = np.array(
        [(r["ci_high"] - r["ci_low"]) / 2 for r in gains if r.get("ci_low") is not None]
    )
    if not len(half):
        return math.nan
    return float(np.median(100 * half / 1.96 * math.sqrt(n_seeds / ((n_seeds - 1) / n_seeds))))


def noise_levels(figures: Path, *, pbt_optional: bool = False) -> dict[str, Any]:
    """Noise SDs (accuracy points or weight units) from the committed small-run JSON.

    - ``sd_seed_gain``: one seed's paired gain, median over cells: ``se * sqrt(n)`` of each
      cell's paired t over ``n`` seeds (the seed-only ``se_seed`` where the test-set variance
      was added, ``analyses.capacity.with_test_noise``); for results without ``se`` (the small
      run's seed-bootstrap intervals) ``half / 1.96 * sqrt(n) / sqrt((n - 1) / n)`` of the 95 %
      interval (a bootstrap over ``n`` seeds is too narrow by about ``sqrt((n - 1) / n)``);
    - ``sd_size_gain``: SD of the cell gains around their OLS line on ``log10(parameters)``;
    - ``sd_pstar``: the larger of the median half-width / 1.96 of the per-size quadratic ``p*``
      intervals and the SD of the per-size ``p*`` around their OLS line on ``log10(parameters)``
      (which holds the depth effect seen on DomainDigits);
    - ``sd_replicate``: SD of the PBT arms' replicate accuracies (pooled over arms); with arms
      paired by replicate (the study), ``sd_diff_paired``: the SD of the PBT - uniform difference.

    Each is the larger of the pairs' values (the conservative choice for a new dataset); a pair
    is every capacity sweep in the JSON (a study pair's ResNet and ViT sweeps count apart).
    ``pbt_optional``: without ``pbt.json`` the replicate SDs are None instead of an error.
    """
    cap = json.loads((figures / "capacity.json").read_text())
    opt = json.loads((figures / "optimal_weight.json").read_text())
    pbt_path = figures / "pbt.json"
    pbt = json.loads(pbt_path.read_text()) if pbt_path.exists() or not pbt_optional else None
    n_seeds = len(cap.get("preset", {}).get("seeds") or (0, 1, 2))
    out: dict[str, Any] = {"per_pair": {}}
    seed_sd, size_sd, pstar_sd = [], [], []
    for name, pair in cap["pairs"].items():
        g = [r for r in pair["gains"] if r["setting"] == "p selected on val"]
        s_seed = _seed_sd(g, n_seeds)
        x = np.log10([r["model.n_params"] for r in g])
        y = np.array([r["gain"] for r in g]) * 100
        s_size = _line_sd(x, y)
        ps = [
            r for r in opt["pairs"][name]["val"]["quadratic"]["per_size"]
            if r.get("p_star") is not None
        ]  # fmt: skip
        cis = [(r["ci_high"] - r["ci_low"]) / 2 / 1.96 for r in ps if r.get("ci_low") is not None]
        s_ci = float(np.median(cis)) if cis else math.nan
        xp = np.log10([r["model.n_params"] for r in ps])
        s_line = _line_sd(xp, np.array([r["p_star"] for r in ps]))
        s_p = float(np.nanmax([s_ci, s_line])) if np.isfinite([s_ci, s_line]).any() else math.nan
        out["per_pair"][name] = {"sd_seed_gain": s_seed, "sd_size_gain": s_size, "sd_pstar": s_p}
        seed_sd.append(s_seed)
        size_sd.append(s_size)
        pstar_sd.append(s_p)
    out.update(
        n_seeds=n_seeds,
        sd_seed_gain=_nanmax(seed_sd),
        sd_size_gain=_nanmax(size_sd),
        sd_pstar=_nanmax(pstar_sd),
        sd_replicate=None,
        sd_diff_unpaired=None,
    )
    if pbt is None:
        return out
    reps = [np.array(pbt[a]["test"]) * 100 for a in ("uniform", "pbt", "random_static")]
    if min(len(r) for r in reps) < 2:
        return out
    pooled = math.sqrt(
        sum(((r - r.mean()) ** 2).sum() for r in reps) / sum(len(r) - 1 for r in reps)
    )
    # a paired difference of two arms that share nothing but the data: sqrt(2) x the SD
    out.update(sd_replicate=pooled, sd_diff_unpaired=pooled * math.sqrt(2))
    if len(reps[0]) == len(reps[1]) and pbt.get("mto") is not None:  # the study: paired arms
        out["sd_diff_paired"] = float(np.std(reps[1] - reps[0], ddof=1))
    return out


def _line_sd(x: np.ndarray, y: np.ndarray) -> float:
    """SD of ``y`` around its OLS line on ``x`` (NaN with fewer than 3 distinct points)."""
    if len(x) < 3 or len(set(np.round(x, 9))) < 2:
        return math.nan
    return float(np.std(y - np.polyval(np.polyfit(x, y, 1), x), ddof=2))


def _nanmax(v: Sequence[float]) -> float:
    a = np.asarray(v, float)
    return float(np.nanmax(a)) if np.isfinite(a).any() else math.nan


def planned_sizes(timing: dict[str, Any] | None) -> list[list[float]] | None:
    """``log10(parameters)`` per family of the sizes the budget plan keeps (``timing.json``).

    Example:
        >>> t = {"sizes": [{"family": "mlp", "width": 1.0, "depth": 1, "n_params": 1000},
        ...                {"family": "mlp", "width": 2.0, "depth": 1, "n_params": 100000}],
        ...      "plan": {"kept": [{"part": "MLP sweeps, priority-1 pairs"}]}}
        >>> planned_sizes(t)
        [[3.0, 5.0]]
    """
    if timing is None or not timing.get("plan"):
        return None
    kept = {k["part"] for k in timing["plan"]["kept"]}
    out: dict[str, list[float]] = {}
    for r in timing["sizes"]:
        fam = r["family"]
        part = f"{fam} width {r['width']:g} depth {r['depth']}"
        if (fam == "mlp" and "MLP sweeps, priority-1 pairs" in kept) or part in kept:
            out.setdefault(fam, []).append(math.log10(r["n_params"]))
    return [sorted(v) for v in out.values() if len(v) >= 2] or None


def run(noise: dict[str, Any], n_sim: int, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every power figure of the README, for the current and the proposed designs.

    With ``timing`` (``timing.json`` holding a budget ``plan``), also the design the budget
    keeps ("planned within budget"): its families' measured parameter counts.
    """
    fams = len(STUDY.families)
    sizes = len(next(iter(FAMILY_SIZES.values())))
    res: dict[str, Any] = {"effects": EFFECTS, "noise": noise, "n_sim": n_sim}
    planned = planned_sizes(timing)
    if planned is not None:
        res["planned_log10_params"] = planned
    f1 = {}
    designs1: dict[str, dict[str, Any]] = {
        "current (1 family, 9 sizes, 1.7 decades, 3 seeds)": dict(
            decades=1.7, sizes=9, families=1, seeds=3
        ),
        "proposed, MLP only (6 sizes, 2.6 decades, 5 seeds)": dict(
            decades=2.6, sizes=6, families=1, seeds=5
        ),
        f"proposed ({fams} families x {sizes} sizes, 2.6 decades, 5 seeds)": dict(
            decades=2.6, sizes=sizes, families=fams, seeds=5
        ),
    }
    if planned is not None:
        designs1["planned within budget (" + _describe(planned) + ", 5 seeds)"] = dict(
            log_params=planned, seeds=5
        )
        # one slope over the two priority-1 pairs (an intercept per pair and family)
        designs1["planned, pooled over 2 pairs"] = dict(log_params=planned * 2, seeds=5)
    for label, kw in designs1.items():
        f1[label] = {
            "power": power_trend(
                slope=EFFECTS["finding1_slope_points_per_decade"],
                sd_seed=noise["sd_seed_gain"],
                sd_size=noise["sd_size_gain"],
                n_sim=n_sim,
                **kw,
            ),
            "size_at_slope_0": power_trend(
                slope=0.0,
                sd_seed=noise["sd_seed_gain"],
                sd_size=noise["sd_size_gain"],
                n_sim=n_sim,
                seed=1,
                **kw,
            ),
        }
    res["finding1"] = f1
    margin = EFFECTS["finding2_equivalence_margin_r"]
    res["finding2_within"] = {
        f"{runs} runs x {ep} epochs": {
            "at_r_0": power_within(
                true_r=0.0, runs=runs, epochs=ep, phi=0.6, margin=margin, tau=0.15, n_sim=n_sim
            ),
            "at_r_margin": power_within(
                true_r=margin,
                runs=runs,
                epochs=ep,
                phi=0.6,
                margin=margin,
                tau=0.15,
                n_sim=n_sim,
                seed=1,
            ),
        }
        for runs, ep in ((3, 20), (10, 20), (10, 30), (20, 30))
    }
    res["finding2_across"] = {
        f"{cfg} configurations x {s} seeds": {
            "at_r_0": power_across(
                true_r=0.0, configs=cfg, seeds=s, icc=0.5, margin=margin, n_sim=n_sim
            ),
            "at_r_margin": power_across(
                true_r=margin, configs=cfg, seeds=s, icc=0.5, margin=margin, n_sim=n_sim, seed=1
            ),
        }
        for cfg, s in ((63, 3), (30, 5), (90, 5))
    }
    m3 = EFFECTS["finding3_equivalence_margin_slope_per_decade"]
    designs3: dict[str, dict[str, Any]] = {
        "current (9 sizes, 1.7 decades)": dict(decades=1.7, sizes=9, families=1),
        f"proposed ({fams} x {sizes} sizes, 2.6 decades)": dict(
            decades=2.6, sizes=sizes, families=fams
        ),
    }
    if planned is not None:
        designs3["planned within budget (" + _describe(planned) + ")"] = dict(log_params=planned)
        designs3["planned, pooled over 2 pairs"] = dict(log_params=planned * 2)
    res["finding3"] = {
        label: {
            "at_slope_0": power_pstar_slope(
                slope=0.0, sd_pstar=noise["sd_pstar"], margin=m3, n_sim=n_sim, **kw
            ),
            "at_slope_margin": power_pstar_slope(
                slope=m3, sd_pstar=noise["sd_pstar"], margin=m3, n_sim=n_sim, seed=1, **kw
            ),
        }
        for label, kw in designs3.items()
    }
    pe, pm = EFFECTS["pbt_effect_points"], EFFECTS["pbt_equivalence_margin_points"]
    if noise.get("sd_diff_unpaired") is None:
        return res
    sds = [
        ("unpaired SD", noise["sd_diff_unpaired"]),
        ("paired, half the SD", noise["sd_diff_unpaired"] / 2),
    ]
    if noise.get("sd_diff_paired") is not None:
        sds.append(("measured paired SD (PBT - uniform)", noise["sd_diff_paired"]))
    res["pbt"] = {
        f"{n} replicates, {kind}": power_paired(
            effect=pe, replicates=n, sd_diff=sd, margin=pm, n_sim=n_sim
        )
        for n in (3, 10, 20)
        for kind, sd in sds
    }
    return res


def _describe(planned: Sequence[Sequence[float]]) -> str:
    return " + ".join(f"{len(f)} sizes over {max(f) - min(f):.1f} decades" for f in planned)


def _figure(res: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels = [
        ("Finding 1: slope +3 pts/decade", res["finding1"], lambda v: v["power"]["ols"], "OLS"),
        (
            "Finding 2 within: |r|<0.2 at r=0",
            res["finding2_within"],
            lambda v: v["at_r_0"]["equivalent"],
            "TOST",
        ),
        (
            "Finding 3: |slope|<0.05 at 0",
            res["finding3"],
            lambda v: v["at_slope_0"]["equivalent"],
            "TOST",
        ),
        ("PBT: +0.5 pts (paired t)", res["pbt"], lambda v: v["superiority"], "t"),
    ]
    for ax, (title, block, get, test) in zip(axes, panels):
        labels = list(block)
        vals = [get(block[k]) for k in labels]
        ax.barh(range(len(labels)), vals, color="#4c72b0")
        ax.set_yticks(range(len(labels)), [_wrap(k) for k in labels], fontsize=8)
        ax.axvline(0.8, color="k", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"power ({test}, 5 %)")
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(min(v + 0.02, 0.85), i, f"{v:.2f}", va="center", fontsize=8)
    fig.suptitle(f"Simulated power of the study's tests ({res['n_sim']} simulations; dashed 0.8)")
    fig.tight_layout()
    return fig


def _wrap(s: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(s, width))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Simulate every test of the design; write power.json and power.png."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 simulations per cell")
    ap.add_argument("--figures", type=Path, default=None, help="where power.json/png go")
    ap.add_argument(
        "--noise-from",
        type=Path,
        default=FIGURES,
        help="folder of the capacity/optimal_weight/pbt JSON the noise levels are read from "
        "(e.g. figures/study once its first sweeps are done)",
    )
    args = ap.parse_args(argv)
    out = args.figures or (ROOT / "runs" / "analyses-quick" / "figures" if args.quick else FIGURES)
    tpath = FIGURES / "timing.json"
    timing = json.loads(tpath.read_text()) if tpath.exists() else None
    res = run(noise_levels(args.noise_from, pbt_optional=True), 200 if args.quick else 4000, timing)
    src = Path(args.noise_from).resolve()
    res["noise_from"] = str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src)
    res["quick"] = args.quick
    write_json(res, out / "power.json")
    save_figure(_figure(res), out / "power.png")
    return res


if __name__ == "__main__":
    r = main()
    print(json.dumps({k: r[k] for k in ("finding1", "pbt")}, indent=1))
