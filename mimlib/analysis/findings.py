"""The paper's findings as rules computed from a study's own results (``analysis/findings.*``).

Each finding of Xie et al. 2022 (section 1's (i)-(iii); sections 3.1, 3.3-3.5) is a rule on
the tables and CSVs the aggregation already writes, with a verdict: ``holds``, ``does not
hold`` or ``not testable`` (and why: one model, one length, a task not fine-tuned, a result
missing). Every number behind a verdict carries a link, relative to ``analysis/``, to the file
it is read from. The same rules run on any study (smoke, demo, paper scale).

Notation. M = the largest model (most backbone parameters, ``aggregate.largest_model``). The
*scaling datasets* are the study's datasets except the class subsets (``datasets.<name>.
num_classes``, Table 9's sampling variants); S / D = the scaling dataset with the fewest / the
most images (Table 2's manifest counts; a tie goes to the first in config order). "Shortest" /
"longest" are the study's pre-training lengths for losses and its fine-tuned lengths
(``finetune.lengths``) for scores.

(i) Large models overfit small data. *Loss part*: ``analysis/overfitting.csv`` (the existing
    rule and tolerance) flags at least one of M's cells on S and none of M's cells on D.
    *IN-1K part*: M's best IN-1K top-1 (Table 3, max over lengths) on S < on D. Without IN-1K
    fine-tuning the verdict is the loss part's. *Stretch* (reported, not in the verdict): on S
    a smaller model's best IN-1K top-1 is above M's. Not testable with one model or one
    scaling dataset (or S and D of the same size).
(ii) More data pays off only with longer training. gap(L) = val_loss(M, S, L) - val_loss(M, D,
    L) (pre-training summary) and top1(M, D, L) - top1(M, S, L) (IN-1K metrics); each part
    holds when gap(longest) > gap(shortest). The same gap for iNat-18 / COCO / ADE20K (Tables
    4-6) is reported, not in the verdict. Not testable with one length or one scaling dataset.
(iii) The validation loss is a good proxy. From Table 7: over all pre-trained cells r(val loss,
    score) <= :data:`PROXY_R_MAX` for IN-1K and iNat-18 top-1 and < 0 for COCO box / mask AP
    and ADE20K mIoU; over the non-overfitting cells r(val loss, score) < r(train loss, score)
    for each score. Not testable without IN-1K's r over all cells (fewer than 3 cells).
(Table 8) A light decoder is as good. At the longest length, per dataset: the best IN-1K top-1
    of every heavier decoder is within :data:`SAME_TOP1` points of the lightest decoder's
    (fewest decoder parameters). The paper's loss pattern (heavier: lower train, higher val
    loss) is reported, not in the verdict. Not testable without decoder runs.
(Table 9) The sampling strategy matters little. Per Table 9 pair (a fraction dataset vs the
    class subset of the closest size), for M at the longest length: IN-1K top-1 within
    :data:`SAME_TOP1` points, train and val loss within ``analysis.overfit_tolerance``
    (relative). The other model x length rows are counted, not in the verdict.

A part whose inputs are missing is ``not testable``. A finding holds when every testable part
of its verdict holds, does not hold when one fails, and is not testable when none is testable.

Seed spread (optional ``analysis/seed_spread.csv``: quantity, n_seeds, mean, std, min, max;
quantity ``val_loss:<model>/<dataset>/<length>`` or ``<task>/<metric>:<model>/<dataset>/<length>``):
beside every effect (a gap, a difference of two scores, a rise of a loss) the seed std of
each quantity involved, the combined std sqrt(sum std^2) when every one is in the file, and
whether |effect| > :data:`SEED_SIGMAS` x combined. Verdicts do not use it.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from mimlib import paths
from mimlib.finetune import TASKS

from . import common as C

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable"
VERDICTS = (HOLDS, FAILS, UNTESTABLE)

#: (iii): r(val loss, score) over all cells must be at most this for PROXY_STRONG scores ...
PROXY_R_MAX = -0.6
PROXY_STRONG = ("in1k/top1", "inat18/top1")
#: Tables 8 / 9: two IN-1K top-1 this close (points) count as the same (the paper's 84.4 / 84.5
#: and 83.5 / 83.4 are "the same"; it calls 0.3 "worse" and ~0.5 "a significant gap").
SAME_TOP1 = 0.2
#: "well below the trivial predictor": a cell's val loss at most this share of the trivial loss
LEARNED_RATIO_MAX = 0.9
#: an effect "exceeds the seed spread" when |effect| > SEED_SIGMAS x its combined seed std
SEED_SIGMAS = 2.0

ANALYSIS_DIR = os.path.dirname(C.FINDINGS)


def link(pattern: str, **kw: Any) -> str:
    """A results-relative path (``paths`` / ``common`` pattern) as a link from ``analysis/``."""
    return os.path.relpath(pattern.format(**kw), ANALYSIS_DIR)


SRC_SUMMARY = link(paths.PRETRAIN_SUMMARY)
SRC_OVERFIT = link(C.OVERFITTING)
SRC_SEEDS = link(C.SEED_SPREAD)


def src_table(name: str) -> str:
    return link(C.TABLE, name=name, ext="md")


def src_figure(name: str) -> str:
    return link(C.FIGURE, name=name, ext="png")


def src_metrics(task: str, model: str, dataset: str, length: int) -> str:
    return link(paths.FINETUNE_METRICS, task=task, model=model, dataset=dataset, length=length)


#: per-length score tables (Tables 4-6), in table order, from the task registry
BY_LENGTH_TABLES = {name: t.table for name, t in sorted(TASKS.items(), key=lambda kv: kv[1].table) if t.table_by_length}


# ------------------------------------------------------------------ records
@dataclass
class Number:
    """One number behind a verdict: what it is, its value, the file it comes from."""

    label: str
    value: float
    source: str
    quantity: str = ""  # its seed_spread.csv key, if it is a per-cell quantity
    std: float | None = None  # its seed std, when seed_spread.csv has it


@dataclass
class Effect:
    """A difference the rule compares (a gap, a difference of two scores, a rise of a loss)."""

    label: str
    value: float
    quantities: list[str]
    stds: list[float | None] = field(default_factory=list)
    combined_std: float | None = None
    exceeds: bool | None = None  # |value| > SEED_SIGMAS x combined_std (None: not measured)


@dataclass
class Check:
    """One part of a rule: what it compares, its verdict, its numbers and effects."""

    name: str
    text: str
    verdict: str
    reason: str = ""
    numbers: list[Number] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    in_verdict: bool = True  # False: reported beside the verdict (a stretch, other tasks)


@dataclass
class Finding:
    key: str
    title: str
    statement: str  # the paper's claim
    rule: str  # the rule as computed here
    verdict: str
    reason: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Study:
    """The inputs of every rule (built by ``aggregate.write_findings`` from the result files).

    ``scores`` is long: model, dataset, length, score (``val_loss``, ``train_loss``,
    ``<task>/<metric>``), value, source. Tables are as their CSVs; ``table8`` carries an extra
    ``decoder_params_m`` column (decoder + mask token, millions). ``seeds``: seed_spread.csv.
    """

    name: str
    models: list[str]
    largest: str
    datasets: list[str]
    images: Mapping[str, float]
    lengths: list[int]
    finetune_lengths: list[int]
    tasks: list[str]
    scores: pd.DataFrame
    subsets: Sequence[str] = ()
    overfit: pd.DataFrame | None = None
    table3: pd.DataFrame | None = None
    table7: pd.DataFrame | None = None
    table8: pd.DataFrame | None = None
    table9: pd.DataFrame | None = None
    loss_tol: float = C.ANALYSIS_DEFAULTS["overfit_tolerance"]
    labels: Mapping[str, str] = field(default_factory=dict)
    seeds: pd.DataFrame | None = None
    scratch: pd.DataFrame | None = None  # from-scratch scores: model, score, value, source

    def ds(self, name: str) -> str:
        return str(self.labels.get(name, name))


SCORE_COLUMNS = ["model", "dataset", "length", "score", "value", "source"]


# ------------------------------------------------------------------ small helpers
def _finite(x: Any) -> bool:
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: float, signed: bool = False) -> str:
    if not _finite(x):
        return "n/a"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def quantity(score: str, model: str, dataset: str, length: int) -> str:
    """seed_spread.csv key of a per-cell quantity, e.g. ``in1k/top1:swinv2_nano/in1k_10/256``."""
    return f"{score}:{model}/{dataset}/{int(length)}"


def seed_std(seeds: pd.DataFrame | None, key: str) -> float | None:
    if seeds is None or not key:
        return None
    hit = seeds.loc[seeds["quantity"] == key, "std"]
    return float(hit.iloc[0]) if len(hit) and _finite(hit.iloc[0]) else None


def make_effect(label: str, value: float, quantities: Iterable[str], seeds: pd.DataFrame | None) -> Effect:
    qs = list(quantities)
    eff = Effect(label=label, value=float(value), quantities=qs)
    if seeds is not None:
        eff.stds = [seed_std(seeds, q) for q in qs]
        if qs and all(s is not None for s in eff.stds):
            eff.combined_std = math.sqrt(sum(s * s for s in eff.stds))  # type: ignore[operator]
            eff.exceeds = bool(abs(eff.value) > SEED_SIGMAS * eff.combined_std)
    return eff


def _num(label: str, value: float, source: str, key: str, seeds: pd.DataFrame | None) -> Number:
    return Number(label=label, value=float(value), source=source, quantity=key, std=seed_std(seeds, key))


def score_value(scores: pd.DataFrame, model: str, dataset: str, length: int, score: str) -> tuple[float, str]:
    """(value, source) of one cell's score in the long ``scores`` frame (NaN, "" if absent)."""
    hit = scores[(scores["model"] == model) & (scores["dataset"] == dataset)
                 & (scores["length"] == int(length)) & (scores["score"] == score)]
    if not len(hit) or not _finite(hit["value"].iloc[0]):
        return math.nan, ""
    return float(hit["value"].iloc[0]), str(hit["source"].iloc[0])


def score_label(score: str) -> str:
    """``in1k/top1`` -> ``IN-1K top-1 (%)``; ``val_loss`` -> ``val loss``."""
    labels = {f"{t}/{m}": lab for t, m, lab in C.TASK_SCORES}
    return labels.get(score, score.replace("_", " "))


def dedupe(numbers: Iterable[Number]) -> list[Number]:
    seen, out = set(), []
    for n in numbers:
        key = (n.label, n.source, n.value)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def combine(checks: Sequence[Check]) -> tuple[str, str]:
    """(verdict, reason) from the checks that count: every testable one holds -> holds; one
    fails -> does not hold; none testable -> not testable."""
    counted = [c for c in checks if c.in_verdict]
    testable = [c for c in counted if c.verdict != UNTESTABLE]
    if not testable:
        verdict = UNTESTABLE
    elif any(c.verdict == FAILS for c in testable):
        verdict = FAILS
    else:
        verdict = HOLDS
    def said(c: Check) -> str:
        return f"{c.name}: {c.verdict}" + (f" ({c.reason})" if c.reason else "")

    if len(counted) <= 3:
        parts = [said(c) for c in counted]
    else:  # many parts: count them, name the ones that do not hold or cannot be tested
        held = sum(c.verdict == HOLDS for c in counted)
        parts = [f"{held} of {len(counted)} parts hold"] + [said(c) for c in counted if c.verdict != HOLDS]
    if testable and len(testable) < len(counted):
        parts.append("the verdict uses the testable part(s) only")
    return verdict, "; ".join(parts)


def untestable(key: str, title: str, statement: str, rule: str, reason: str) -> Finding:
    return Finding(key, title, statement, rule, UNTESTABLE, reason)


def size_extremes(study: Study) -> tuple[str, str] | str:
    """(S, D): the scaling datasets with the fewest / most images, or why there are none."""
    subsets = set(study.subsets)
    scaling = [d for d in study.datasets if d not in subsets]
    if len(scaling) < 2:
        return (f"the study has {len(scaling)} scaling dataset(s) (class-subset datasets left out): "
                "no smaller and larger dataset to compare")
    sized = [d for d in scaling if _finite(study.images.get(d))]
    if len(sized) < 2:
        return "image counts (Table 2) missing"
    small = min(sized, key=lambda d: float(study.images[d]))
    large = max(sized, key=lambda d: float(study.images[d]))
    if float(study.images[small]) == float(study.images[large]):
        return "the scaling datasets all have the same number of images"
    return small, large


def _images_numbers(study: Study, small: str, large: str) -> list[Number]:
    return [Number(f"images of {study.ds(d)}", float(study.images[d]), src_table("table2")) for d in (small, large)]


# ------------------------------------------------------------------ (i) large models overfit small data
STATEMENT_I = ("Masked image modeling is demanding for large data: large models overfit relatively small "
               "data (the validation loss rises with longer training), and the overfitting degrades "
               "fine-tuning: in Table 3 SwinV2-H's best IN-1K top-1 on IN1K (20%) is 84.4, 0.3 below "
               "SwinV2-L's (Xie et al. 2022, (i) and section 3.1).")
RULE_I = ("M = the largest model, S / D = the scaling dataset with the fewest / most images (Table 2; "
          "class-subset datasets left out). Loss part: overfitting.csv flags at least one of M's cells on "
          "S and none of M's cells on D. IN-1K part: M's best IN-1K top-1 (Table 3, max over lengths) on "
          "S < on D; without IN-1K fine-tuning the verdict uses the loss part only. Stretch (not in the "
          "verdict): on S, a smaller model's best IN-1K top-1 is above M's. Not testable with one model "
          "or one scaling dataset.")


def overfit_check(overfit: pd.DataFrame | None, model: str, small: str, large: str,
                  labels: Mapping[str, str] | None = None, seeds: pd.DataFrame | None = None) -> Check:
    """(i)'s loss part on ``overfitting.csv`` rows: a cell of ``model`` on ``small`` flagged,
    none on ``large``."""
    lab = (lambda d: str((labels or {}).get(d, d)))
    name = "loss part"
    if overfit is None or not len(overfit):
        return Check(name, "overfitting.csv has no rows", UNTESTABLE, "no overfitting classification")
    rows = {d: overfit[(overfit["model"] == model) & (overfit["dataset"] == d)
                       & overfit["final_val_loss"].map(_finite)] for d in (small, large)}
    missing = [lab(d) for d, r in rows.items() if not len(r)]
    if missing:
        return Check(name, f"no classified cell of {C.display_model(model)} on {', '.join(missing)}", UNTESTABLE,
                     "no final validation loss (pre-training not done)")
    numbers, effects, said = [], [], []
    for d in (small, large):
        r = rows[d].sort_values("length")
        flagged = r[r["overfit"]]
        flags = ", ".join(f"length {int(f.length)} flagged ({f.reason})" for f in flagged.itertuples())
        said.append(f"{lab(d)}: " + (flags or f"none of lengths {', '.join(str(int(n)) for n in r['length'])} flagged"))
        for f in flagged.itertuples():
            cell = f"{C.display_model(model)} / {lab(d)} / {int(f.length)}"
            key = quantity("val_loss", model, d, f.length)
            numbers += [_num(f"final val loss {cell}", f.final_val_loss, SRC_OVERFIT, key, seeds),
                        Number(f"minimum of the val curve {cell} (iter {int(f.min_at_iter)})", float(f.min_val_loss),
                               SRC_OVERFIT)]
            if f.curve_rule:
                effects.append(make_effect(f"rise of the val loss above its curve minimum, {cell} "
                                           "(seed std of the final value only)",
                                           f.final_val_loss - f.min_val_loss, [key], seeds))
            if f.length_rule:
                shorter = r[(r["length"] < f.length)]
                best = shorter.loc[shorter["final_val_loss"].idxmin()]
                numbers.append(_num(f"final val loss {C.display_model(model)} / {lab(d)} / {int(best.length)}",
                                    best.final_val_loss, SRC_OVERFIT, quantity("val_loss", model, d, best.length),
                                    seeds))
                effects.append(make_effect(f"final val loss at {int(f.length)} minus at {int(best.length)}, {lab(d)}",
                                           f.final_val_loss - best.final_val_loss,
                                           [key, quantity("val_loss", model, d, best.length)], seeds))
    on_small = bool(rows[small]["overfit"].any())
    on_large = bool(rows[large]["overfit"].any())
    verdict = HOLDS if on_small and not on_large else FAILS
    reason = "" if verdict == HOLDS else "; ".join(
        ([f"no cell flagged on {lab(small)}"] if not on_small else [])
        + ([f"a cell is flagged on {lab(large)} too"] if on_large else []))
    return Check(name, f"{C.display_model(model)} — " + "; ".join(said), verdict, reason, numbers, effects)


def _best_length(scores: pd.DataFrame | None, model: str, dataset: str, score: str = "in1k/top1") -> int | None:
    if scores is None or not len(scores):
        return None
    hit = scores[(scores["model"] == model) & (scores["dataset"] == dataset) & (scores["score"] == score)
                 & scores["value"].map(_finite)]
    return int(hit.loc[hit["value"].idxmax(), "length"]) if len(hit) else None


def _table3_value(table3: pd.DataFrame | None, model: str, dataset: str) -> float:
    if table3 is None or dataset not in table3.columns:
        return math.nan
    hit = table3.loc[table3["model"] == model, dataset]
    return float(hit.iloc[0]) if len(hit) and _finite(hit.iloc[0]) else math.nan


def _table3_number(table3, scores, model, dataset, labels, seeds) -> tuple[Number, str]:
    """Table 3's best of model x dataset as a Number; its quantity is the cell at the best length."""
    best_at = _best_length(scores, model, dataset)
    key = quantity("in1k/top1", model, dataset, best_at) if best_at is not None else ""
    label = f"best IN-1K top-1 {C.display_model(model)} / {labels.get(dataset, dataset)}" + (
        f" (at length {best_at})" if best_at is not None else "")
    return _num(label, _table3_value(table3, model, dataset), src_table("table3"), key, seeds), key


def best_score_check(table3: pd.DataFrame | None, model: str, small: str, large: str,
                     scores: pd.DataFrame | None = None, labels: Mapping[str, str] | None = None,
                     seeds: pd.DataFrame | None = None) -> Check:
    """(i)'s IN-1K part: Table 3's best top-1 of ``model`` on ``small`` < on ``large``."""
    labels = labels or {}
    name = "IN-1K part"
    (a, ka), (b, kb) = (_table3_number(table3, scores, model, d, labels, seeds) for d in (small, large))
    text = (f"best IN-1K top-1 of {C.display_model(model)}: {labels.get(small, small)} {_fmt(a.value)} vs "
            f"{labels.get(large, large)} {_fmt(b.value)}")
    if not (_finite(a.value) and _finite(b.value)):
        return Check(name, text, UNTESTABLE, "no IN-1K score for one of the two (Table 3 empty)", [a, b])
    eff = make_effect(f"best top-1 on {labels.get(large, large)} minus on {labels.get(small, small)}",
                      b.value - a.value, [ka, kb], seeds)
    verdict = HOLDS if a.value < b.value else FAILS
    return Check(name, text, verdict, "" if verdict == HOLDS else "not lower on the smaller dataset", [a, b], [eff])


def smaller_model_check(table3: pd.DataFrame | None, model: str, others: Sequence[str], dataset: str,
                        scores: pd.DataFrame | None = None, labels: Mapping[str, str] | None = None,
                        seeds: pd.DataFrame | None = None) -> Check:
    """(i)'s stretch: on ``dataset`` some smaller model's best IN-1K top-1 is above ``model``'s."""
    labels = labels or {}
    name = "stretch"
    big, kb = _table3_number(table3, scores, model, dataset, labels, seeds)
    text = f"on {labels.get(dataset, dataset)}: {C.display_model(model)} {_fmt(big.value)}"
    if not _finite(big.value):
        return Check(name, text, UNTESTABLE, f"no IN-1K score of {C.display_model(model)} there", [big],
                     in_verdict=False)
    numbers, effects, above = [big], [], []
    for other in others:
        n, ko = _table3_number(table3, scores, other, dataset, labels, seeds)
        if not _finite(n.value):
            continue
        numbers.append(n)
        text += f", {C.display_model(other)} {_fmt(n.value)}"
        effects.append(make_effect(f"{C.display_model(other)} minus {C.display_model(model)}", n.value - big.value,
                                   [ko, kb], seeds))
        if n.value > big.value:
            above.append(C.display_model(other))
    if len(numbers) == 1:
        return Check(name, text, UNTESTABLE, "no smaller model has a score there", numbers, in_verdict=False)
    verdict = HOLDS if above else FAILS
    reason = f"below {', '.join(above)}" if above else "no smaller model is above it"
    return Check(name, text, verdict, reason, numbers, effects, in_verdict=False)


def finding_i(study: Study) -> Finding:
    key, title = "i", "(i) Large models overfit small data"
    if len(study.models) < 2:
        return untestable(key, title, STATEMENT_I, RULE_I, "the study has one model")
    ext = size_extremes(study)
    if isinstance(ext, str):
        return untestable(key, title, STATEMENT_I, RULE_I, ext)
    small, large = ext
    m = study.largest
    checks = [overfit_check(study.overfit, m, small, large, study.labels, study.seeds)]
    notes = [f"M = {C.display_model(m)}, S = {study.ds(small)} ({int(study.images[small]):,} images), "
             f"D = {study.ds(large)} ({int(study.images[large]):,} images)."]
    if "in1k" in study.tasks:
        checks.append(best_score_check(study.table3, m, small, large, study.scores, study.labels, study.seeds))
        checks.append(smaller_model_check(study.table3, m, [x for x in study.models if x != m], small,
                                          study.scores, study.labels, study.seeds))
    else:
        notes.append("The study does not fine-tune IN-1K: the verdict uses the loss part only.")
    verdict, reason = combine(checks)
    checks[0].numbers = _images_numbers(study, small, large) + checks[0].numbers
    return Finding(key, title, STATEMENT_I, RULE_I, verdict, reason, checks, notes)


# ------------------------------------------------------------------ (ii) more data pays off with longer training
STATEMENT_II = ("Training length matters: large models benefit from more data at a longer training length; "
                "with short training the difference between large and small datasets is not significant "
                "(Xie et al. 2022, (ii) and section 3.1).")
RULE_II = ("With M, S, D as in (i): gap(L) = val_loss(M, S, L) - val_loss(M, D, L) over the pre-training "
           "lengths, and gap(L) = top1(M, D, L) - top1(M, S, L) (IN-1K) over the fine-tuned lengths; each "
           "part holds when gap(longest) > gap(shortest). Holds when both testable parts hold. The same gap "
           "for iNat-18 / COCO / ADE20K (Tables 4-6) is reported, not in the verdict. Not testable with one "
           "length or one scaling dataset.")


def gap_check(scores: pd.DataFrame, model: str, score: str, small: str, large: str, lengths: Sequence[int],
              name: str = "", labels: Mapping[str, str] | None = None, seeds: pd.DataFrame | None = None,
              in_verdict: bool = True) -> Check:
    """gap(longest) > gap(shortest) for one score of ``model`` (long ``scores`` frame): a loss
    gap is small - large, a score gap large - small (positive: more data is better)."""
    labels = labels or {}
    name = name or score
    if len(set(lengths)) < 2:
        return Check(name, f"{score_label(score)} at one length only", UNTESTABLE, "one length",
                     in_verdict=in_verdict)
    short, long_ = min(lengths), max(lengths)
    loss = score.endswith("loss")
    numbers, gaps, keys = [], {}, {}
    for n in (short, long_):
        vals = {}
        for d in (small, large):
            v, src = score_value(scores, model, d, n, score)
            k = quantity(score, model, d, n)
            keys[(d, n)] = k
            vals[d] = v
            if _finite(v):
                numbers.append(_num(f"{score_label(score)} {C.display_model(model)} / {labels.get(d, d)} / {n}", v,
                                    src, k, seeds))
        gaps[n] = (vals[small] - vals[large]) if loss else (vals[large] - vals[small])
    text = (f"{score_label(score)} gap ({'S - D' if loss else 'D - S'}) of {C.display_model(model)}: "
            f"{_fmt(gaps[short], True)} at {short}, {_fmt(gaps[long_], True)} at {long_}")
    if not (_finite(gaps[short]) and _finite(gaps[long_])):
        return Check(name, text, UNTESTABLE, "a result is missing", numbers, in_verdict=in_verdict)
    effects = [make_effect(f"gap at {n}", gaps[n], [keys[(small, n)], keys[(large, n)]], seeds) for n in (short, long_)]
    effects.append(make_effect(f"gap at {long_} minus gap at {short}", gaps[long_] - gaps[short],
                               [keys[(d, n)] for n in (short, long_) for d in (small, large)], seeds))
    verdict = HOLDS if gaps[long_] > gaps[short] else FAILS
    return Check(name, text, verdict, "" if verdict == HOLDS else "the gap does not widen",
                 numbers, effects, in_verdict)


def finding_ii(study: Study) -> Finding:
    key, title = "ii", "(ii) More data pays off only with longer training"
    if len(set(study.lengths)) < 2:
        return untestable(key, title, STATEMENT_II, RULE_II, "the study has one pre-training length")
    ext = size_extremes(study)
    if isinstance(ext, str):
        return untestable(key, title, STATEMENT_II, RULE_II, ext)
    small, large = ext
    m = study.largest
    args = dict(labels=study.labels, seeds=study.seeds)
    checks = [gap_check(study.scores, m, "val_loss", small, large, study.lengths, "val-loss part", **args)]
    if "in1k" in study.tasks:
        c = gap_check(study.scores, m, "in1k/top1", small, large, study.finetune_lengths, "IN-1K part", **args)
        if c.reason == "one length":
            c.reason = "IN-1K fine-tuned at one length only"
        checks.append(c)
    notes = [f"M = {C.display_model(m)}, S = {study.ds(small)}, D = {study.ds(large)}."]
    if "in1k" not in study.tasks:
        notes.append("The study does not fine-tune IN-1K: the verdict uses the val-loss part only.")
    for task, metric, label in C.TASK_SCORES:
        if task != "in1k" and task in study.tasks:
            checks.append(gap_check(study.scores, m, f"{task}/{metric}", small, large, study.finetune_lengths,
                                    f"also {label}", in_verdict=False, **args))
    verdict, reason = combine(checks)
    return Finding(key, title, STATEMENT_II, RULE_II, verdict, reason, checks, notes)


# ------------------------------------------------------------------ (iii) the validation loss is a good proxy
STATEMENT_III = ("The validation loss is a good proxy for fine-tuning: it correlates strongly (negatively) with "
                 "the fine-tuning score on every task, and more strongly than the training loss, especially "
                 "for the non-overfitting models (Table 7; Xie et al. 2022, (iii) and section 3.3).")
RULE_III = (f"From Table 7 (Pearson r over the pre-trained cells with a score): over all cells r(val loss, "
            f"score) <= {PROXY_R_MAX} for IN-1K and iNat-18 top-1 and < 0 for COCO box AP, COCO mask AP and "
            f"ADE20K mIoU; over the non-overfitting cells r(val loss, score) < r(train loss, score) for each "
            f"score. Holds when every testable part holds; not testable without IN-1K's r over all cells "
            f"(no IN-1K fine-tuning, or fewer than 3 cells with a score).")


def _t7_row(table7: pd.DataFrame, score: str, group: str) -> pd.Series | None:
    task, metric = score.split("/")
    hit = table7[(table7["task"] == task) & (table7["metric"] == metric) & (table7["group"] == group)]
    return hit.iloc[0] if len(hit) else None


def proxy_checks(table7: pd.DataFrame, r_max: float = PROXY_R_MAX) -> list[Check]:
    """(iii)'s checks on Table 7's rows, in its score order."""
    checks = []
    src = src_table("table7")
    scores = list(dict.fromkeys(f"{t}/{m}" for t, m in zip(table7["task"], table7["metric"])))
    for score in scores:
        label = {f"{t}/{m}": lab for t, m, lab in C.TASK_SCORES}.get(score, score)
        row = _t7_row(table7, score, "all")
        bound = r_max if score in PROXY_STRONG else 0.0
        op = "<=" if score in PROXY_STRONG else "<"
        name = f"{label}: r(val loss) {op} {bound:g}"
        if row is None or not _finite(row["r_val_loss"]):
            n = int(row["n"]) if row is not None else 0
            checks.append(Check(name, f"{n} cell(s) with a score", UNTESTABLE, "fewer than 3 cells"))
        else:
            r = float(row["r_val_loss"])
            ok = r <= bound if score in PROXY_STRONG else r < bound
            checks.append(Check(name, f"r(val loss, {label}) over all {int(row['n'])} cells = {r:+.3f}",
                                HOLDS if ok else FAILS, "" if ok else f"r = {r:+.3f}",
                                [Number(f"r(val loss, {label}), all cells (n={int(row['n'])})", r, src)]))
        row = _t7_row(table7, score, "non-overfit")
        name = f"{label}: non-overfit r(val loss) < r(train loss)"
        if row is None or not (_finite(row["r_val_loss"]) and _finite(row["r_train_loss"])):
            n = int(row["n"]) if row is not None else 0
            checks.append(Check(name, f"{n} non-overfitting cell(s) with a score", UNTESTABLE, "fewer than 3 cells"))
        else:
            rv, rt = float(row["r_val_loss"]), float(row["r_train_loss"])
            checks.append(Check(name, f"non-overfitting cells (n={int(row['n'])}): r(val loss) = {rv:+.3f}, "
                                      f"r(train loss) = {rt:+.3f}", HOLDS if rv < rt else FAILS,
                                "" if rv < rt else "the train loss correlates at least as strongly",
                                [Number(f"r(val loss, {label}), non-overfit (n={int(row['n'])})", rv, src),
                                 Number(f"r(train loss, {label}), non-overfit (n={int(row['n'])})", rt, src)]))
    return checks


def finding_iii(study: Study) -> Finding:
    key, title = "iii", "(iii) The validation loss is a good proxy for fine-tuning"
    if "in1k" not in study.tasks:
        return untestable(key, title, STATEMENT_III, RULE_III,
                          "the study does not fine-tune IN-1K (the verdict needs it)")
    t7 = study.table7 if study.table7 is not None else pd.DataFrame(
        columns=["task", "metric", "score", "group", "n", "r_train_loss", "r_val_loss"])
    row = _t7_row(t7, "in1k/top1", "all")
    if row is None or not _finite(row["r_val_loss"]):
        n = int(row["n"]) if row is not None else 0
        return untestable(key, title, STATEMENT_III, RULE_III,
                          f"fewer than 3 pre-trained cells with an IN-1K score and both losses (n = {n})")
    checks = proxy_checks(t7)
    verdict, reason = combine(checks)
    notes = ["Correlations are not seed effects: the seed spread is not applied to r."]
    return Finding(key, title, STATEMENT_III, RULE_III, verdict, reason, checks, notes)


# ------------------------------------------------------------------ Table 8: decoders
STATEMENT_DEC = ("A light decoder is as good: a heavier decoder (4 or 8 transformer blocks) has a lower training "
                 "loss and a higher validation loss than the linear one, yet no lower IN-1K top-1 (84.4 / 84.4 "
                 "/ 84.5; Table 8, section 3.4).")
RULE_DEC = (f"Table 8 at the longest length, per dataset: the best IN-1K top-1 of every heavier decoder is "
            f"within {SAME_TOP1} points of the lightest decoder's (fewest decoder parameters). The paper's loss "
            f"pattern (heavier: lower train loss, higher val loss) is reported, not in the verdict. Not testable "
            f"without decoder runs (two or more decoders in the study).")


def decoder_checks(table8: pd.DataFrame, same_top1: float = SAME_TOP1, labels: Mapping[str, str] | None = None,
                   seeds: pd.DataFrame | None = None) -> tuple[list[Check], list[str]]:
    labels = labels or {}
    src = src_table("table8")
    checks, notes = [], []
    t8 = table8.copy()
    if "decoder_params_m" not in t8.columns:
        t8["decoder_params_m"] = t8["params_m"]
    longest = int(t8["length"].max())
    weight = t8.groupby("decoder")["decoder_params_m"].mean().sort_values()
    for ds in dict.fromkeys(t8["dataset"]):
        g = t8[(t8["dataset"] == ds) & (t8["length"] == longest)]
        best = {}
        for dec in weight.index:
            rows = g[(g["decoder"] == dec) & g["top1"].map(_finite)]
            if len(rows):
                best[dec] = rows.loc[rows["top1"].idxmax()]
        light = weight.index[0]
        where = f"{labels.get(ds, ds)} / {longest}"
        if light not in best or len(best) < 2:
            checks.append(Check(f"{where}", f"IN-1K top-1 of the decoders at {where}", UNTESTABLE,
                                "no IN-1K score of the lightest decoder or of a heavier one"))
            continue
        lrow = best[light]

        def num(r, what="top1"):
            key = quantity("in1k/top1" if what == "top1" else what, r["encoder"], ds, longest)
            label = score_label("in1k/top1" if what == "top1" else what)
            return _num(f"{label} {C.display_model(r['encoder'])} + {r['decoder']} / {where}", r[what], src, key,
                        seeds)

        for dec, hrow in best.items():
            if dec == light:
                continue
            diff = float(hrow["top1"] - lrow["top1"])
            ok = abs(diff) <= same_top1
            eff = make_effect(f"top-1 {dec} minus {light}", diff,
                              [quantity("in1k/top1", hrow["encoder"], ds, longest),
                               quantity("in1k/top1", lrow["encoder"], ds, longest)], seeds)
            checks.append(Check(f"{where}: {dec} vs {light}",
                                f"IN-1K top-1 {dec} {_fmt(hrow['top1'])} vs {light} {_fmt(lrow['top1'])} "
                                f"({_fmt(diff, True)})", HOLDS if ok else FAILS,
                                "" if ok else f"{abs(diff):.3g} points apart (> {same_top1})",
                                [num(hrow), num(lrow)], [eff]))
            lower_train = hrow["train_loss"] < lrow["train_loss"]
            higher_val = hrow["val_loss"] > lrow["val_loss"]
            if _finite(hrow["train_loss"]) and _finite(lrow["train_loss"]) and _finite(hrow["val_loss"]) \
                    and _finite(lrow["val_loss"]):
                eff_v = make_effect(f"val loss {dec} minus {light}", float(hrow["val_loss"] - lrow["val_loss"]),
                                    [quantity("val_loss", hrow["encoder"], ds, longest),
                                     quantity("val_loss", lrow["encoder"], ds, longest)], seeds)
                both = bool(lower_train and higher_val)
                checks.append(Check(f"also {where}: {dec} overfits more",
                                    f"train loss {_fmt(hrow['train_loss'])} vs {_fmt(lrow['train_loss'])}, val loss "
                                    f"{_fmt(hrow['val_loss'])} vs {_fmt(lrow['val_loss'])}",
                                    HOLDS if both else FAILS, "" if both else "not lower train and higher val loss",
                                    [num(hrow, "train_loss"), num(lrow, "train_loss"),
                                     num(hrow, "val_loss"), num(lrow, "val_loss")], [eff_v], in_verdict=False))
    encoders = t8.groupby("decoder")["encoder"].agg(lambda s: tuple(sorted(set(s))))
    if len(set(encoders)) > 1:
        notes.append("The decoders come with different encoders here (pretrain.per_model), so each comparison "
                     "mixes decoder and encoder size; the paper compares one encoder (SwinV2-B).")
    return checks, notes


def finding_decoder(study: Study) -> Finding:
    key, title = "decoder", "Table 8: a light decoder is as good"
    if study.table8 is None or not len(study.table8) or study.table8["decoder"].nunique() < 2:
        return untestable(key, title, STATEMENT_DEC, RULE_DEC,
                          "the study has no decoder runs (one decoder for every model)")
    if "in1k" not in study.tasks:
        return untestable(key, title, STATEMENT_DEC, RULE_DEC, "the study does not fine-tune IN-1K")
    checks, notes = decoder_checks(study.table8, labels=study.labels, seeds=study.seeds)
    verdict, reason = combine(checks)
    return Finding(key, title, STATEMENT_DEC, RULE_DEC, verdict, reason, checks, notes)


# ------------------------------------------------------------------ Table 9: sampling strategies
STATEMENT_SAMP = ("The dataset sampling strategy matters little: IN1K (10%) (10% of every class) and IN100 (100 "
                  "whole classes) give almost the same training loss, validation loss and IN-1K top-1 (0.351 / "
                  "0.352, 0.515 / 0.511, 83.5 / 83.4 for SwinV2-L at 500K; Table 9, section 3.5).")


def rule_sampling(loss_tol: float) -> str:
    return (f"Per Table 9 pair (a fraction dataset vs the class subset of the closest size), for the largest "
            f"model at the longest length: IN-1K top-1 within {SAME_TOP1} points, train loss and val loss within "
            f"{loss_tol:g} of each other (relative, |a - b| / min(a, b); the overfitting tolerance, "
            f"analysis.overfit_tolerance). The other model x length rows are counted, not in the verdict. Not "
            f"testable without a class-subset dataset.")


def sampling_checks(table9: pd.DataFrame, model: str, length: int, loss_tol: float, same_top1: float = SAME_TOP1,
                    labels: Mapping[str, str] | None = None, seeds: pd.DataFrame | None = None) -> list[Check]:
    labels = labels or {}
    src = src_table("table9")
    checks = []

    def compare(a: pd.Series, b: pd.Series, what: str) -> tuple[float, bool] | None:
        if not (_finite(a[what]) and _finite(b[what])):
            return None
        diff = float(b[what] - a[what])
        if what == "top1":
            return diff, abs(diff) <= same_top1
        return diff, abs(diff) / min(float(a[what]), float(b[what])) <= loss_tol

    for pair in dict.fromkeys(table9["pair"]):
        rows = table9[table9["pair"] == pair]
        frac_name, sub_name = pair.split(" vs ")
        where = f"{labels.get(frac_name, frac_name)} vs {labels.get(sub_name, sub_name)}"
        sel = rows[(rows["model"] == model) & (rows["length"] == int(length))]
        fr, sb = sel[sel["dataset"] == frac_name], sel[sel["dataset"] == sub_name]
        if not (len(fr) and len(sb)):
            checks.append(Check(where, f"{where}: no row of {C.display_model(model)} at {length}", UNTESTABLE,
                                "missing"))
            continue
        a, b = fr.iloc[0], sb.iloc[0]
        for what, label in (("top1", "IN-1K top-1"), ("val_loss", "val loss"), ("train_loss", "train loss")):
            name = f"{where}: {label}"
            got = compare(a, b, what)
            score = "in1k/top1" if what == "top1" else what
            nums = [_num(f"{label} {C.display_model(model)} / {labels.get(r['dataset'], r['dataset'])} / {length}",
                         r[what], src, quantity(score, model, r["dataset"], length), seeds)
                    for r in (a, b) if _finite(r[what])]
            if got is None:
                checks.append(Check(name, f"{label}: a value is missing", UNTESTABLE, "missing", nums))
                continue
            diff, ok = got
            limit = f"{same_top1} points" if what == "top1" else f"{loss_tol:g} relative"
            eff = make_effect(f"{label} {labels.get(sub_name, sub_name)} minus {labels.get(frac_name, frac_name)}",
                              diff, [quantity(score, model, frac_name, length),
                                     quantity(score, model, sub_name, length)], seeds)
            checks.append(Check(name, f"{label} {_fmt(a[what])} vs {_fmt(b[what])} ({_fmt(diff, True)})",
                                HOLDS if ok else FAILS, "" if ok else f"differ by more than {limit}", nums, [eff]))
        # every model x length of the pair, counted
        total = close = 0
        for (mm, n), g in rows.groupby(["model", "length"]):
            fa, sa = g[g["dataset"] == frac_name], g[g["dataset"] == sub_name]
            if not (len(fa) and len(sa)):
                continue
            got = [compare(fa.iloc[0], sa.iloc[0], w) for w in ("top1", "val_loss", "train_loss")]
            got = [x for x in got if x is not None]
            if got:
                total += 1
                close += all(ok for _, ok in got)
        if total:
            checks.append(Check(f"also {where}: every model x length",
                                f"{close} of {total} model x length rows within every tolerance (on the values "
                                f"they have)", HOLDS if close == total else FAILS, "", in_verdict=False))
    return checks


def finding_sampling(study: Study) -> Finding:
    key, title = "sampling", "Table 9: the sampling strategy matters little"
    rule = rule_sampling(study.loss_tol)
    if study.table9 is None or not len(study.table9):
        return untestable(key, title, STATEMENT_SAMP, rule,
                          "the study has no sampling runs (no class-subset dataset, datasets.<name>.num_classes)")
    length = max(study.lengths)
    checks = sampling_checks(study.table9, study.largest, length, study.loss_tol, labels=study.labels,
                             seeds=study.seeds)
    verdict, reason = combine(checks)
    notes = [f"Compared: {C.display_model(study.largest)} at length {length}."]
    if "in1k" not in study.tasks:
        notes.append("The study does not fine-tune IN-1K: the top-1 parts are not testable.")
    return Finding(key, title, STATEMENT_SAMP, rule, verdict, reason, checks, notes)


# ------------------------------------------------------------------ beyond the paper's claims
STATEMENT_LEARN = ("Masked image modeling learns structure: the reconstructions continue what the visible "
                   "patches show (the paper's Figure 5), well beyond a predictor that knows only the colour.")
RULE_LEARN = (f"Every pre-trained cell's validation loss is at most {LEARNED_RATIO_MAX:g} x the loss of the trivial "
              "predictor (each masked pixel = the image's mean visible colour, on the same crops and masks): "
              "val_loss_ratio in pretrain/summary.csv.")


def finding_learns(study: Study) -> Finding:
    key, title = "learns", "MIM learns more than the colour"
    d = study.scores[study.scores["score"] == "val_loss_ratio"].dropna(subset=["value"])
    if d.empty:
        return untestable(key, title, STATEMENT_LEARN, RULE_LEARN,
                          "no val_loss_ratio in the pre-training summary (no trivial loss logged)")
    worst = d.loc[d["value"].idxmax()]
    best = d.loc[d["value"].idxmin()]
    above = d[d["value"] > LEARNED_RATIO_MAX]
    cell = lambda r: f"{r['model']}/{study.ds(r['dataset'])}/{int(r['length'])}"  # noqa: E731
    ok = above.empty
    check = Check(f"val_loss_ratio <= {LEARNED_RATIO_MAX:g} in all {len(d)} cells",
                  f"ratios {float(best['value']):.3f} ({cell(best)}) to {float(worst['value']):.3f} ({cell(worst)})",
                  HOLDS if ok else FAILS,
                  "" if ok else f"{len(above)} cell(s) above, e.g. {cell(worst)}",
                  [Number(f"val_loss_ratio {cell(best)} (lowest)", float(best["value"]), SRC_SUMMARY),
                   Number(f"val_loss_ratio {cell(worst)} (highest)", float(worst["value"]), SRC_SUMMARY)])
    verdict, reason = combine([check])
    return Finding(key, title, STATEMENT_LEARN, RULE_LEARN, verdict, reason, [check],
                   [f"Figure 5 ({src_figure('fig5')}) shows the reconstructions themselves."])


STATEMENT_HELPS = "Pre-training helps: a pre-trained model fine-tunes better than the same model from scratch."
RULE_HELPS = ("For every task score and every model: the model's best pre-trained score (over datasets and "
              "lengths) is above its from-scratch score.")


def finding_helps(study: Study) -> Finding:
    key, title = "helps", "Pre-training beats training from scratch"
    if study.scratch is None or study.scratch.empty:
        return untestable(key, title, STATEMENT_HELPS, RULE_HELPS, "the study has no from-scratch baselines")
    checks = []
    for score in dict.fromkeys(study.scratch["score"]):
        label = score_label(score)
        for model in study.models:
            sc = study.scratch[(study.scratch["score"] == score) & (study.scratch["model"] == model)]
            pre = study.scores[(study.scores["score"] == score) & (study.scores["model"] == model)].dropna(
                subset=["value"])
            name = f"{label}, {model}"
            if sc.empty or not _finite(sc["value"].iloc[0]) or pre.empty:
                checks.append(Check(name, "no scratch or pre-trained score", UNTESTABLE, "missing scores"))
                continue
            b = pre.loc[pre["value"].idxmax()]
            s0 = float(sc["value"].iloc[0])
            ok = float(b["value"]) > s0
            cell = f"{study.ds(b['dataset'])}/{int(b['length'])}"
            checks.append(Check(name, f"best pre-trained {float(b['value']):.4g} ({cell}) vs scratch {s0:.4g}",
                                HOLDS if ok else FAILS, "" if ok else "scratch is as good or better",
                                [Number(f"{label} {model} best pre-trained ({cell})", float(b["value"]),
                                        str(b["source"])),
                                 Number(f"{label} {model} from scratch", s0, str(sc["source"].iloc[0]))],
                                [Effect(f"{label} {model}: best pre-trained - scratch", float(b["value"]) - s0,
                                        [])]))
    verdict, reason = combine(checks)
    return Finding(key, title, STATEMENT_HELPS, RULE_HELPS, verdict, reason, checks)


# ------------------------------------------------------------------ all findings
RULES = (finding_i, finding_ii, finding_iii, finding_decoder, finding_sampling, finding_learns, finding_helps)


def study_findings(study: Study) -> list[Finding]:
    return [rule(study) for rule in RULES]


# ------------------------------------------------------------------ inputs (from the result files' frames)
def loss_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """The pre-training summary as long ``scores`` rows (train_loss, val_loss)."""
    values = [c for c in ("train_loss", "val_loss", "val_loss_ratio") if c in summary.columns]
    out = summary.melt(id_vars=["model", "dataset", "length"], value_vars=values,
                       var_name="score", value_name="value")
    out["source"] = SRC_SUMMARY
    return out[SCORE_COLUMNS]


def metric_scores(task_scores: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """``common.read_task_scores`` rows (no scratch) as long rows linked to their metrics.json."""
    df = task_scores[task_scores["dataset"] != paths.SCRATCH]
    return pd.DataFrame({
        "model": df["model"], "dataset": df["dataset"], "length": df["length"].astype(int),
        "score": f"{task}/{metric}", "value": df[metric].astype(float),
        "source": [src_metrics(task, m, d, n) for m, d, n in zip(df["model"], df["dataset"], df["length"])],
    }, columns=SCORE_COLUMNS)


def by_length_scores(table: pd.DataFrame, task: str, metrics: Sequence[str], datasets: Iterable[str],
                     source: str) -> pd.DataFrame:
    """A Tables 4-6 CSV (model, length, <dataset> or <dataset>/<metric>) as long rows."""
    rows = []
    for r in table.to_dict("records"):
        if int(r["length"]) == 0:  # the from-scratch rows
            continue
        for ds in datasets:
            for m in metrics:
                col = ds if len(metrics) == 1 else f"{ds}/{m}"
                if col in r:
                    rows.append({"model": r["model"], "dataset": ds, "length": int(r["length"]),
                                 "score": f"{task}/{m}", "value": float(r[col]) if _finite(r[col]) else math.nan,
                                 "source": source})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def scratch_scores(task_scores: pd.DataFrame, task: str, metric: str) -> pd.DataFrame:
    """The from-scratch rows of ``common.read_task_scores`` (model, score, value, source)."""
    df = task_scores[task_scores["dataset"] == paths.SCRATCH]
    return pd.DataFrame({"model": df["model"], "score": f"{task}/{metric}", "value": df[metric].astype(float),
                         "source": [src_metrics(task, m, paths.SCRATCH, 0) for m in df["model"]]})


def read_seed_spread(path: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``analysis/seed_spread.csv`` if it exists (columns quantity, n_seeds, mean, std, min, max)."""
    if not os.path.exists(path):
        return None
    df = pd.read_csv(path)
    missing = {"quantity", "std"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return df


# ------------------------------------------------------------------ writers
SEEDS_ABSENT = "Seed spread not measured; run `make demo-seeds` (writes analysis/seed_spread.csv)."


def seed_note(seeds: pd.DataFrame | None) -> str:
    if seeds is None:
        return SEEDS_ABSENT
    n = seeds["n_seeds"].max() if "n_seeds" in seeds.columns else "?"
    return (f"Seed spread from {SRC_SEEDS} ({len(seeds)} quantities, up to {n} seeds): beside each effect, "
            f"the seed std of its quantities, the combined std sqrt(sum std^2) and whether |effect| > "
            f"{SEED_SIGMAS:g} x combined. The verdicts do not use it.")


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalars
        return _clean(x.item())
    return x


def findings_json(study_name: str, findings: Sequence[Finding], seeds: pd.DataFrame | None) -> str:
    doc = {"study": study_name, "verdicts": list(VERDICTS),
           "seed_spread": {"measured": seeds is not None, "source": SRC_SEEDS if seeds is not None else None,
                           "note": seed_note(seeds), "sigmas": SEED_SIGMAS},
           "constants": {"PROXY_R_MAX": PROXY_R_MAX, "SAME_TOP1": SAME_TOP1,
                         "LEARNED_RATIO_MAX": LEARNED_RATIO_MAX},
           "findings": [asdict(f) for f in findings]}
    return json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n"


def _effect_text(e: Effect, seeds_on: bool) -> str:
    text = f"{e.label}: {_fmt(e.value, True)}"
    if not seeds_on:
        return text
    if e.combined_std is None:
        have = [f"{q} {_fmt(s)}" for q, s in zip(e.quantities, e.stds) if s is not None]
        listed = f"; {', '.join(have)}" if have else ""
        return text + f" (seed std: not all quantities in seed_spread.csv{listed})"
    stds = ", ".join(_fmt(s) for s in e.stds)
    return (text + f" (seed std {stds}; combined {_fmt(e.combined_std)}; exceeds {SEED_SIGMAS:g} x combined: "
            f"{'yes' if e.exceeds else 'no'})")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def findings_markdown(study_name: str, findings: Sequence[Finding], seeds: pd.DataFrame | None) -> str:
    seeds_on = seeds is not None
    out = [f"# Findings — study {study_name}", "",
           "Each finding of the paper (Xie et al. 2022) as a rule computed from this study's results "
           "(mimlib/analysis/findings.py, docs/analysis.md). Verdicts: holds / does not hold / not testable. "
           "Every number links to the file it is read from.", "", seed_note(seeds), "",
           "| finding | verdict | reason |", "|---|---|---|"]
    out += [f"| [{_md_escape(f.title)}](#{f.key}) | **{f.verdict}** | {_md_escape(f.reason)} |" for f in findings]
    for f in findings:
        out += ["", f'<a id="{f.key}"></a>', f"## {f.title}", "", f"**Paper:** {f.statement}", "",
                f"**Rule:** {f.rule}", "", f"**Verdict: {f.verdict}** — {f.reason}", ""]
        out += [f"- {n}" for n in f.notes]
        if f.notes:
            out.append("")
        for c in f.checks:
            tag = "" if c.in_verdict else " *(not in the verdict)*"
            out.append(f"- **{c.name}**{tag}: {c.verdict}" + (f" ({c.reason})" if c.reason else "") + f" — {c.text}")
            out += [f"  - {_effect_text(e, seeds_on)}" for e in c.effects]
        numbers = dedupe(n for c in f.checks for n in c.numbers)
        if numbers:
            out += ["", "| number | value | seed std | source |", "|---|---|---|---|"]
            out += [f"| {_md_escape(n.label)} | [{_fmt(n.value)}]({n.source}) | "
                    f"{_fmt(n.std) if n.std is not None else ''} | {n.source} |" for n in numbers]
    return "\n".join(out) + "\n"


def findings_html(study_name: str, findings: Sequence[Finding], seeds: pd.DataFrame | None) -> str:
    e = html.escape
    seeds_on = seeds is not None
    title = f"Findings — study {study_name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{C._HTML_STYLE}li{{margin:2px 0}}.holds{{color:#1a7f37}}.fails{{color:#b42318}}"
             f".untestable{{color:#777}}</style></head><body><h2>{e(title)}</h2>",
             "<p class='note'>Each finding of the paper (Xie et al. 2022) as a rule computed from this study's "
             "results. Verdicts: holds / does not hold / not testable. Every number links to the file it is "
             "read from (relative links: open this page from results/analysis/).</p>",
             f"<p class='note'>{e(seed_note(seeds))}</p>"]
    css = {HOLDS: "holds", FAILS: "fails", UNTESTABLE: "untestable"}
    parts.append("<table><thead><tr><th>finding</th><th>verdict</th><th>reason</th></tr></thead><tbody>")
    parts += [f"<tr><td><a href='#{f.key}'>{e(f.title)}</a></td><td class='{css[f.verdict]}'><b>{e(f.verdict)}</b>"
              f"</td><td style='text-align:left'>{e(f.reason)}</td></tr>" for f in findings]
    parts.append("</tbody></table>")
    for f in findings:
        parts.append(f"<h3 id='{f.key}'>{e(f.title)}</h3><p class='note'><b>Paper:</b> {e(f.statement)}</p>"
                     f"<p class='note'><b>Rule:</b> {e(f.rule)}</p><p class='note'><b>Verdict: "
                     f"<span class='{css[f.verdict]}'>{e(f.verdict)}</span></b> — {e(f.reason)}</p>")
        if f.notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in f.notes) + "</ul>")
        if f.checks:
            parts.append("<ul>")
            for c in f.checks:
                tag = "" if c.in_verdict else " <i>(not in the verdict)</i>"
                parts.append(f"<li><b>{e(c.name)}</b>{tag}: <span class='{css[c.verdict]}'>{e(c.verdict)}</span>"
                             + (f" ({e(c.reason)})" if c.reason else "") + f" — {e(c.text)}")
                if c.effects:
                    parts.append("<ul>" + "".join(f"<li>{e(_effect_text(x, seeds_on))}</li>" for x in c.effects)
                                 + "</ul>")
                parts.append("</li>")
            parts.append("</ul>")
        numbers = dedupe(n for c in f.checks for n in c.numbers)
        if numbers:
            parts.append("<table><thead><tr><th>number</th><th>value</th><th>seed std</th><th>source</th></tr>"
                         "</thead><tbody>")
            parts += [f"<tr><td>{e(n.label)}</td><td><a href='{e(n.source)}'>{e(_fmt(n.value))}</a></td>"
                      f"<td>{e(_fmt(n.std)) if n.std is not None else ''}</td><td>{e(n.source)}</td></tr>"
                      for n in numbers]
            parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "".join(parts)
