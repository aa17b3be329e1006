"""Which pre-trained cells overfit (paper section 3.1, Figure 4's red / green circles).

The rule, with ``tol`` = ``analysis.overfit_tolerance`` (a *relative* tolerance, default 0.01):

1. **Curve rule** — the cell's final validation loss is above the minimum of its own
   validation curve (trunk + decay branch, every logged point) by more than ``tol``:
   ``final > min * (1 + tol)``. The validation loss went up while training went on.
2. **Length rule** — at the same model x dataset, a shorter length ended with a lower
   validation loss: ``final(L) > final(L') * (1 + tol)`` for some ``L' < L``. Training longer
   made the cell worse on held-out images (the paper's "increased validation losses with
   longer training", Figure 1 centre).

A cell overfits if either holds. The validation loss is deterministic (fixed crops and masks,
see README), so the tolerance only absorbs the wobble of the training trajectory. A cell
without a final validation loss is not classified (``overfit`` is False, ``reason`` says why).
"""

from __future__ import annotations

import math

import pandas as pd

DEFAULT_TOLERANCE = 0.01

COLUMNS = ["model", "dataset", "length", "final_val_loss", "min_val_loss", "min_at_iter",
           "rise", "curve_rule", "length_rule", "overfit", "reason"]


def classify_overfitting(summary: pd.DataFrame, curves: pd.DataFrame,
                         tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Apply the rule above to every row of ``summary`` (model, dataset, length, val_loss).

    ``curves`` has one row per logged point (model, dataset, length, iter, val_loss; NaN on
    train-only rows). Returns :data:`COLUMNS`, one row per summary row, in its order.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    val = curves.loc[curves["val_loss"].notna(), ["model", "dataset", "length", "iter", "val_loss"]]
    best = {}
    for key, g in val.groupby(["model", "dataset", "length"]):
        i = g["val_loss"].idxmin()
        best[(key[0], key[1], int(key[2]))] = (float(g.at[i, "val_loss"]), int(g.at[i, "iter"]))

    rows = []
    for r in summary.itertuples(index=False):
        key = (r.model, r.dataset, int(r.length))
        final = float(r.val_loss) if pd.notna(r.val_loss) else math.nan
        min_val, min_at = best.get(key, (math.nan, -1))
        if not math.isnan(final):
            # the final value is a point of the curve too (a curve may lack its last row)
            if math.isnan(min_val) or final < min_val:
                min_val, min_at = final, int(r.length)
        rise = final / min_val - 1.0 if min_val and not math.isnan(final) else math.nan
        curve_rule = bool(not math.isnan(rise) and rise > tolerance)
        shorter = summary[(summary["model"] == r.model) & (summary["dataset"] == r.dataset)
                          & (summary["length"].astype(int) < int(r.length)) & summary["val_loss"].notna()]
        worse_than = [int(s.length) for s in shorter.itertuples(index=False)
                      if not math.isnan(final) and final > float(s.val_loss) * (1.0 + tolerance)]
        length_rule = bool(worse_than)
        reasons = []
        if math.isnan(final):
            reasons.append("no final validation loss")
        if curve_rule:
            reasons.append(f"final val loss {rise:+.1%} above its minimum (iter {min_at})")
        if length_rule:
            reasons.append(f"higher final val loss than length(s) {', '.join(map(str, sorted(worse_than)))}")
        rows.append({"model": r.model, "dataset": r.dataset, "length": int(r.length),
                     "final_val_loss": final, "min_val_loss": min_val, "min_at_iter": min_at,
                     "rise": rise, "curve_rule": curve_rule, "length_rule": length_rule,
                     "overfit": curve_rule or length_rule, "reason": "; ".join(reasons)})
    return pd.DataFrame(rows, columns=COLUMNS)


def read_overfitting(path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=True, dtype={"reason": object})  # all-empty reads as float
    df["length"] = df["length"].astype(int)
    for col in ("curve_rule", "length_rule", "overfit"):
        df[col] = df[col].astype(str).str.lower().isin(["true", "1", "yes"])
    df["reason"] = df["reason"].fillna("")
    return df
