"""Small statistics used by the tables and analyses (numpy only): correlations, linear fits."""

from __future__ import annotations

import math

import numpy as np


def _pair(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both as float arrays, dropping positions where either is NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def pearson(x, y, min_n: int = 3) -> float:
    """Pearson correlation over the finite pairs; NaN with fewer than ``min_n`` or a constant side."""
    x, y = _pair(x, y)
    if len(x) < min_n:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else math.nan


def ranks(x) -> np.ndarray:
    """Ranks 1..n (ascending), ties get their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=float)
    r[order] = np.arange(1, len(x) + 1, dtype=float)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x, y, min_n: int = 3) -> float:
    """Spearman rank correlation (Pearson of average ranks) over the finite pairs."""
    x, y = _pair(x, y)
    if len(x) < min_n:
        return math.nan
    return pearson(ranks(x), ranks(y), min_n=min_n)


def linear_fit(x, y) -> tuple[float, float]:
    """Least-squares line ``y = slope * x + intercept`` over the finite pairs (NaN if < 2 or constant x)."""
    x, y = _pair(x, y)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(slope), float(intercept)


def loo_linear_predictions(x, y) -> np.ndarray:
    """Leave-one-out predictions: y_i from the line fitted to every other finite pair.

    NaN where x or y is NaN or too few other points remain.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = np.full(len(x), math.nan)
    finite = ~(np.isnan(x) | np.isnan(y))
    for i in np.flatnonzero(finite):
        keep = finite.copy()
        keep[i] = False
        slope, intercept = linear_fit(x[keep], y[keep])
        out[i] = slope * x[i] + intercept
    return out


def r2(measured, predicted) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot over the finite pairs."""
    m, p = _pair(measured, predicted)
    if len(m) < 2:
        return math.nan
    ss_tot = float(((m - m.mean()) ** 2).sum())
    ss_res = float(((m - p) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def rmse(measured, predicted) -> float:
    m, p = _pair(measured, predicted)
    return float(np.sqrt(((m - p) ** 2).mean())) if len(m) else math.nan
