"""Before → after effect rows (infra/effects.py): intervals checked against textbook values and
the normal approximation, computed independently in float64, plus invariants as properties."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.effects import effect_row, format_effect, wilson_interval


def test_wilson_interval_matches_textbook_values():
    # Newcombe (1998), Table I: 81/263 → 0.2553–0.3662; 15/148 → 0.0624–0.1605
    assert wilson_interval(81 / 263, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(15 / 148, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


@given(st.integers(1, 5000), st.data())
def test_wilson_interval_holds_every_observed_proportion(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k / n, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_bootstrap_mean_interval_agrees_with_the_normal_approximation():
    rng = random.Random(7)
    n = 1500
    before = [rng.gauss(3.0, 0.8) for _ in range(n)]
    after = [b - 0.1 + rng.gauss(0, 0.3) for b in before]
    row = effect_row("pretrain", "loss", before, after, kind="mean", better="lower")
    # independent float64 reference: mean ± 1.96·s/√n for the paired difference
    diffs = [a - b for a, b in zip(after, before)]
    mean = math.fsum(diffs) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.959964 * sd / math.sqrt(n)
    assert row["delta"] == pytest.approx(mean, abs=1e-12)
    assert row["delta_lo"] == pytest.approx(mean - half, abs=0.15 * half)
    assert row["delta_hi"] == pytest.approx(mean + half, abs=0.15 * half)
    assert row["verdict"] == "improved"  # lower loss is better and the interval excludes 0


def test_weighted_mean_is_a_ratio_of_sums():
    row = effect_row("sft", "loss", [2.0, 4.0], [1.0, 4.0], kind="mean", better="lower", weights=[3, 1])
    assert row["before"] == pytest.approx((2 * 3 + 4 * 1) / 4) and row["after"] == pytest.approx((1 * 3 + 4) / 4)


def test_proportion_rows_use_wilson_and_a_paired_change():
    before = [0.0] * 60 + [1.0] * 40
    after = [1.0] * 100  # every item right after training
    row = effect_row("grpo", "arithmetic/accuracy", before, after, kind="proportion", better="higher")
    assert (row["before_lo"], row["before_hi"]) == pytest.approx(wilson_interval(0.4, 100))
    assert (row["after_lo"], row["after_hi"]) == pytest.approx(wilson_interval(1.0, 100))
    assert row["delta"] == pytest.approx(0.6) and row["delta_lo"] > 0.4 and row["verdict"] == "improved"
    assert "0.4 [" in format_effect(row) and "improved (n=100)" in format_effect(row)


def test_awkward_inputs():
    assert effect_row("dpo", "m", [], [], kind="mean", better="higher")["verdict"] == "no held-out items"
    with pytest.raises(ValueError, match="not paired"):
        effect_row("dpo", "m", [1.0], [1.0, 2.0], kind="mean", better="higher")
    one = effect_row("dpo", "m", [0.5], [0.7], kind="mean", better="higher")  # one item: a degenerate interval
    assert one["delta_lo"] == one["delta_hi"] == pytest.approx(0.2)
    assert one["verdict"] == "too few items for an interval"  # a zero-width interval is no evidence


values = st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(values, st.floats(-5, 5, allow_nan=False))
def test_shifting_every_after_value_shifts_the_change_and_its_interval(before, shift):
    same = effect_row("s", "m", before, before, kind="mean", better="higher")
    assert same["delta"] == 0 and same["delta_lo"] == 0 and same["delta_hi"] == 0
    assert same["verdict"] == ("no clear change" if len(before) > 1 else "too few items for an interval")
    moved = effect_row("s", "m", before, [b + shift for b in before], kind="mean", better="higher")
    for key in ("delta", "delta_lo", "delta_hi"):
        assert moved[key] == pytest.approx(shift, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=60), st.data())
def test_intervals_hold_their_estimates(before, data):
    after = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=len(before), max_size=len(before)))
    row = effect_row("s", "acc", before, after, kind="proportion", better="higher")
    assert row["before_lo"] <= row["before"] <= row["before_hi"] and row["after_lo"] <= row["after"] <= row["after_hi"]
    assert 0.0 <= row["before_lo"] and row["after_hi"] <= 1.0
    assert row["delta_lo"] <= row["delta_hi"]
