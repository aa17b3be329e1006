"""Scaling fit of the validation loss (beyond the paper): L as a function of model size N
(backbone parameters), data size D (pre-training images) and iterations I.

Forms, with every axis normalised by its smallest value in the study (x = N / N0 >= 1, ...),
and only the axes that vary in the study (a constant axis is folded into the constant):

* **additive** (preferred): ``L = E + A * (N/N0)^-a + B * (D/D0)^-b + C * (I/I0)^-c`` with
  A, B, C >= 0 and exponents in [0.005, 5]. Fitted by variable projection: for given exponents
  the coefficients are a small non-negative least-squares problem (solved exactly by
  scipy's bounded least squares), and the exponents are searched on a grid, then refined by
  scipy's Nelder-Mead. Needs ``n >= 2k + 3`` cells (k = varying axes).
* **multiplicative** (fewer cells): ``log L = log K - a log(N/N0) - b log(D/D0) - c log(I/I0)``,
  ordinary least squares on the log form; needs ``n >= k + 2``.

Overfitting cells break any such monotone law (their loss rises with I), so by default the fit
uses the non-overfitting cells only (``overfitting.py``), falling back to all cells when too few
remain. Fit quality: R^2 and RMSE on the cells used. Predictions for cells not run: the next
registered model size, 2x the data and 2x the iterations of the study's largest cell.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .stats import r2, rmse

AXES = ("N", "D", "I")
EXPONENT_BOUNDS = (0.005, 5.0)


@dataclass
class ScalingFit:
    form: str  # "additive", "multiplicative" or "none"
    formula: str
    axes: list[str]  # the varying axes, in AXES order
    refs: dict[str, float]  # N0, D0, I0
    params: dict[str, float] = field(default_factory=dict)
    n: int = 0
    r2: float = math.nan
    rmse: float = math.nan
    note: str = ""

    def predict(self, N, D, I) -> np.ndarray:  # noqa: E741 (the paper-style axis names)
        values = {"N": np.asarray(N, float), "D": np.asarray(D, float), "I": np.asarray(I, float)}
        if self.form == "additive":
            out = np.full(np.broadcast(*values.values()).shape, self.params["E"])
            for ax in self.axes:
                x = values[ax] / self.refs[ax]
                out = out + self.params[f"coef_{ax}"] * x ** (-self.params[f"exp_{ax}"])
            return out
        if self.form == "multiplicative":
            out = np.full(np.broadcast(*values.values()).shape, math.log(self.params["K"]))
            for ax in self.axes:
                out = out - self.params[f"exp_{ax}"] * np.log(values[ax] / self.refs[ax])
            return np.exp(out)
        return np.full(np.broadcast(*values.values()).shape, math.nan)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=float)


# ------------------------------------------------------------------ solvers
def _nnls_with_free_intercept(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """min ||[1, X] [e, c] - y||^2 with c >= 0 and e free: scipy's bounded-variable least
    squares (exact for these few columns; a coefficient at its bound is exactly 0)."""
    from scipy.optimize import lsq_linear

    n, k = design.shape
    full = np.concatenate([np.ones((n, 1)), design], axis=1)
    lower = np.r_[-np.inf, np.zeros(k)]
    coef = lsq_linear(full, y, bounds=(lower, np.full(k + 1, np.inf)), method="bvls").x
    return coef, float(((full @ coef - y) ** 2).sum())


def _minimise(f: Callable[[np.ndarray], float], x0: np.ndarray) -> np.ndarray:
    """Refine the grid's best exponents: scipy's Nelder-Mead (the objective is not smooth
    where the least-squares support changes)."""
    from scipy.optimize import minimize

    return np.asarray(minimize(f, x0, method="Nelder-Mead",
                               options={"xatol": 1e-8, "fatol": 1e-14, "maxiter": 4000}).x)


# ------------------------------------------------------------------ fitting
def _formula(form: str, axes: Sequence[str]) -> str:
    names = {"N": ("A", "a"), "D": ("B", "b"), "I": ("C", "c")}
    if form == "additive":
        return "L = E" + "".join(f" + {names[a][0]} * ({a}/{a}0)^-{names[a][1]}" for a in axes)
    if form == "multiplicative":
        return "L = K" + "".join(f" * ({a}/{a}0)^-{names[a][1]}" for a in axes)
    return "no fit"


def fit_scaling(N, D, I, L, form: str = "auto") -> ScalingFit:  # noqa: E741
    """Fit one of the forms above to losses ``L`` at (N, D, I); ``form`` = auto / additive / multiplicative."""
    data = {"N": np.asarray(N, float), "D": np.asarray(D, float), "I": np.asarray(I, float)}
    y = np.asarray(L, float)
    keep = np.isfinite(y) & np.all([np.isfinite(v) & (v > 0) for v in data.values()], axis=0)
    data, y = {k: v[keep] for k, v in data.items()}, y[keep]
    n = len(y)
    refs = {k: float(v.min()) if n else math.nan for k, v in data.items()}
    axes = [a for a in AXES if n and np.unique(data[a]).size >= 2]
    k = len(axes)
    if form == "auto":
        form = "additive" if n >= 2 * k + 3 else "multiplicative" if n >= k + 2 else "none"
    if form == "none" or n == 0 or (form == "additive" and n < 2 * k + 1) or (form == "multiplicative" and n < k + 1):
        return ScalingFit("none", "no fit", axes, refs, n=n,
                          note=f"{n} cells for {k} varying axes: too few to fit")
    x = {a: data[a] / refs[a] for a in axes}

    if form == "multiplicative":
        if np.any(y <= 0):
            return ScalingFit("none", "no fit", axes, refs, n=n, note="non-positive losses: no log fit")
        design = np.stack([np.ones(n)] + [-np.log(x[a]) for a in axes], axis=1)
        sol, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
        params = {"K": float(math.exp(sol[0]))} | {f"exp_{a}": float(s) for a, s in zip(axes, sol[1:])}
        fit = ScalingFit("multiplicative", _formula("multiplicative", axes), axes, refs, params, n)
    else:
        lo, hi = (math.log(b) for b in EXPONENT_BOUNDS)

        def columns(log_exps: np.ndarray) -> np.ndarray:
            exps = np.exp(np.clip(log_exps, lo, hi))
            return np.stack([x[a] ** (-e) for a, e in zip(axes, exps)], axis=1) if axes else np.zeros((n, 0))

        def sse(log_exps: np.ndarray) -> float:
            return _nnls_with_free_intercept(columns(log_exps), y)[1]

        grid = np.log(np.geomspace(0.02, 3.0, 13))
        start = min((np.array(p) for p in itertools.product(grid, repeat=k)), key=sse) if k else np.zeros(0)
        best = np.clip(_minimise(sse, start), lo, hi) if k else start
        coef, _ = _nnls_with_free_intercept(columns(best), y)
        params = {"E": float(coef[0])}
        for j, a in enumerate(axes):
            params[f"coef_{a}"] = float(coef[j + 1])
            params[f"exp_{a}"] = float(math.exp(best[j]))
        fit = ScalingFit("additive", _formula("additive", axes), axes, refs, params, n)
        notes = []
        unidentified = [a for a in axes if params[f"coef_{a}"] == 0]
        if unidentified:
            notes.append(f"no measurable effect of {', '.join(unidentified)} (coefficient 0; its exponent is arbitrary)")
        at_bound = [a for a in axes if a not in unidentified
                    and min(abs(params[f"exp_{a}"] - b) for b in EXPONENT_BOUNDS) < 1e-6]
        two_valued = [a for a in axes if a not in unidentified and np.unique(x[a]).size == 2]
        if two_valued:
            notes.append(f"{', '.join(two_valued)} takes only two values: its exponent trades off against E and its "
                         "coefficient along a flat valley (other exponents fit as well); read its effect from the "
                         "two cells, not from the exponent")
        if at_bound:
            notes.append(f"exponent of {', '.join(at_bound)} at its bound {EXPONENT_BOUNDS}: that axis's "
                         "curvature is not identified by these cells; extrapolate along it with care")
        fit.note = "; ".join(notes)
    pred = fit.predict(data["N"], data["D"], data["I"])
    fit.r2, fit.rmse = r2(y, pred), rmse(y, pred)
    return fit


# ------------------------------------------------------------------ the study's fit
def scaling_inputs(cfg: Mapping[str, Any], summary: pd.DataFrame, stats: pd.DataFrame,
                   datasets: pd.DataFrame, overfit: pd.DataFrame | None) -> pd.DataFrame:
    """Cells with N (params), D (images), I (iterations), val loss and the overfit flag."""
    df = summary[["model", "dataset", "length", "val_loss"]].copy()
    df = df.merge(stats[["model", "params"]], on="model", how="left")
    df = df.merge(datasets[["dataset", "images"]], on="dataset", how="left")
    df = df.rename(columns={"params": "N", "images": "D"})
    df["I"] = df["length"].astype(float)
    if overfit is not None:
        df = df.merge(overfit[["model", "dataset", "length", "overfit"]], on=["model", "dataset", "length"], how="left")
    else:
        df["overfit"] = False
    df["overfit"] = df["overfit"].fillna(False).astype(bool)
    return df


def next_model_params(largest: float) -> tuple[str, float]:
    """The next registered model bigger than ``largest`` parameters (else a hypothetical 2x)."""
    from mimlib.models.swinv2 import MODELS

    from .cost import encoder_params

    def rough(name: str) -> float:  # params grow as width^2 x blocks: an order without building
        spec = MODELS[name]
        return float(sum(d * (spec.embed_dim * 2**i) ** 2 for i, d in enumerate(spec.depths)))

    for name in sorted(MODELS, key=rough):
        params = encoder_params(name)
        if params > largest:
            return name, float(params)
    return "2x parameters", 2.0 * largest


def study_scaling(cfg: Mapping[str, Any], inputs: pd.DataFrame, exclude_overfit: bool = True
                  ) -> tuple[ScalingFit, pd.DataFrame, pd.DataFrame]:
    """(fit, per-cell fitted values, predictions for cells not run) for the study."""
    valid = inputs[inputs["val_loss"].notna()]
    k = sum(valid[a].nunique() >= 2 for a in AXES)
    use = valid[~valid["overfit"]] if exclude_overfit else valid
    note = "fitted on the non-overfitting cells" if exclude_overfit else "fitted on every cell"
    if len(use) < k + 2:
        use, note = valid, "fitted on every cell (too few non-overfitting cells)"
    fit = fit_scaling(use["N"], use["D"], use["I"], use["val_loss"])
    fit.note = "; ".join(s for s in (note, fit.note) if s)
    cells = inputs.copy()
    cells["used"] = cells.index.isin(use.index)
    cells["fitted"] = fit.predict(cells["N"], cells["D"], cells["I"])
    cells["residual"] = cells["val_loss"] - cells["fitted"]

    rows = []
    if len(valid):
        N0, D0, I0 = valid["N"].max(), valid["D"].max(), valid["I"].max()
        big_name = str(valid.loc[valid["N"].idxmax(), "model"])
        next_name, N1 = next_model_params(float(N0))
        scenarios = [
            ("largest cell of the study", big_name, N0, D0, I0, ""),
            (f"next model size ({next_name})", next_name, N1, D0, I0, "N"),
            ("2x data", big_name, N0, 2 * D0, I0, "D"),
            ("2x iterations", big_name, N0, D0, 2 * I0, "I"),
            ("next model, 2x data, 2x iterations", next_name, N1, 2 * D0, 2 * I0, "NDI"),
        ]
        for name, model, n_, d_, i_, changed in scenarios:
            missing = [a for a in changed if a not in fit.axes]
            value = math.nan if missing or fit.form == "none" else float(fit.predict(n_, d_, i_))
            rows.append({"scenario": name, "model": model, "N": float(n_), "D": float(d_), "I": float(i_),
                         "predicted_val_loss": value,
                         "note": f"{', '.join(missing)} constant in the study: not modelled" if missing else ""})
    predictions = pd.DataFrame(rows, columns=["scenario", "model", "N", "D", "I", "predicted_val_loss", "note"])
    return fit, cells, predictions


def scaling_figure(cfg: Mapping[str, Any], fit: ScalingFit, cells: pd.DataFrame, png, pdf=None) -> None:
    """Measured vs fitted validation loss (used cells filled, excluded ones hollow)."""
    from .common import study_name
    from .figures import new_figure, placeholder, save_figure

    if fit.form == "none":
        placeholder(png, pdf, "Scaling fit", f"{study_name(cfg)}: {fit.note}")
        return
    fig, axes = new_figure(1, 1, 4.6, 4.0)
    ax = axes[0, 0]
    d = cells[cells["val_loss"].notna()]
    used, other = d[d["used"]], d[~d["used"]]
    ax.scatter(used["val_loss"], used["fitted"], s=22, edgecolors="black", linewidths=0.4, label="used in the fit")
    if len(other):
        ax.scatter(other["val_loss"], other["fitted"], s=22, facecolors="none", edgecolors="tab:red",
                   label="excluded (overfitting)")
    lo = float(min(d["val_loss"].min(), d["fitted"].min()))
    hi = float(max(d["val_loss"].max(), d["fitted"].max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
    ax.set_xlabel("measured val loss")
    ax.set_ylabel("fitted val loss")
    ax.legend(fontsize=7)
    ax.set_title(f"{fit.formula}\nR^2 = {fit.r2:.3f}, RMSE = {fit.rmse:.4f} ({fit.n} cells)", fontsize=7)
    fig.suptitle(f"{study_name(cfg)}: scaling fit of the validation loss", fontsize=9)
    save_figure(fig, png, pdf)
