"""Before → after effects of a training stage on held-out items, with 95% intervals.

Every training stage is measured twice on the same held-out items: with the model it started from
("before") and with the model it produced ("after"). An effect row holds both means with their
intervals and the paired change with its own interval:

- a proportion (accuracy, 0/1 per item; a tie may count ½) gets the Wilson score interval;
- a mean over items weighted by a size (loss per token = Σ loss / Σ tokens) gets a percentile
  bootstrap interval (items resampled with a fixed seed, so equal inputs give equal rows);
- the change after − before is bootstrapped over the same resampled items (paired), which is the
  test that matters: the items are shared, so their difficulty cancels.

``verdict`` says "improved" / "worse" when the change's interval excludes 0, else "no clear change"
(one item has no interval: "too few items for an interval").
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

Z95 = 1.959964
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
EFFECTS_TABLE = "effects"


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` items."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside despite rounding at 0 and 1


def _ratio(values: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights))) / total if total else 0.0


def bootstrap_intervals(
    before: Sequence[float], after: Sequence[float], weights: Sequence[float] | None = None,
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """95% percentile-bootstrap intervals of the weighted means of ``before`` and ``after`` and of their
    paired difference (after − before), resampling item indices together."""
    import numpy as np

    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(b), size=(BOOTSTRAP_SAMPLES, len(b)))
    wsum = np.maximum(w[idx].sum(axis=1), 1e-300)
    b_s, a_s = (b * w)[idx].sum(axis=1) / wsum, (a * w)[idx].sum(axis=1) / wsum
    return tuple(tuple(float(x) for x in np.percentile(s, [2.5, 97.5])) for s in (b_s, a_s, a_s - b_s))


def effect_row(
    stage: str, metric: str, before: Sequence[float], after: Sequence[float], *,
    kind: Literal["proportion", "mean"], better: Literal["higher", "lower"],
    weights: Sequence[float] | None = None, unit: str = "",
) -> dict:
    """One before → after row over paired held-out items (``before[i]`` and ``after[i]`` score item i).

    ``kind="proportion"``: per-item values in [0, 1] (0/1, ½ for a tie), Wilson intervals on the means.
    ``kind="mean"``: weighted mean Σ wᵢvᵢ / Σ wᵢ (``weights`` e.g. tokens per item), bootstrap intervals.
    The change's interval is always the paired bootstrap.
    """
    if len(before) != len(after):
        raise ValueError(f"{stage}/{metric}: {len(before)} items before but {len(after)} after (not paired)")
    n = len(before)
    if weights is not None and len(weights) != n:
        raise ValueError(f"{stage}/{metric}: {len(weights)} weights for {n} items")
    row = {"stage": stage, "metric": metric, "unit": unit, "better": better, "n": n}
    if n == 0:
        return {**row, "before": None, "after": None, "delta": None, "verdict": "no held-out items"}
    w = list(weights) if weights is not None else [1.0] * n
    b, a = _ratio(before, w), _ratio(after, w)
    b_ci, a_ci, d_ci = bootstrap_intervals(before, after, w)
    if kind == "proportion":
        b_ci, a_ci = wilson_interval(b, n), wilson_interval(a, n)
    if n < 2:
        verdict = "too few items for an interval"
    elif d_ci[0] > 0 or d_ci[1] < 0:
        verdict = "improved" if (d_ci[0] > 0) == (better == "higher") else "worse"
    else:
        verdict = "no clear change"
    return {**row, "before": b, "before_lo": b_ci[0], "before_hi": b_ci[1], "after": a, "after_lo": a_ci[0],
            "after_hi": a_ci[1], "delta": a - b, "delta_lo": d_ci[0], "delta_hi": d_ci[1], "verdict": verdict}


def format_effect(row: dict) -> str:
    """``metric  before [lo, hi] → after [lo, hi]  Δ +x [lo, hi]  verdict (n=…)`` on one line."""
    if row.get("before") is None:
        return f"{row['metric']}: {row['verdict']}"
    return (f"{row['metric']} {row['before']:.4g} [{row['before_lo']:.4g}, {row['before_hi']:.4g}] → "
            f"{row['after']:.4g} [{row['after_lo']:.4g}, {row['after_hi']:.4g}]  "
            f"Δ {row['delta']:+.4g} [{row['delta_lo']:+.4g}, {row['delta_hi']:+.4g}]  {row['verdict']} (n={row['n']})")


def effect_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """Flat manifest metrics ``effect/<metric>/{before,after,delta}`` of effect rows."""
    return {f"effect/{r['metric']}/{k}": r[k] for r in rows for k in ("before", "after", "delta") if r.get(k) is not None}
