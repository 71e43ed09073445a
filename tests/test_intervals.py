"""Bootstrap intervals of summary means and the paired comparison of runs."""
from __future__ import annotations

import random

import pytest

from medit.evaluation.intervals import bootstrap_ci, half_width, paired_difference
from medit.evaluation.summary import summarise, summary_table


def _records(values: list[float], pre: list[float] | None = None) -> list[dict]:
    return [{"case_id": str(i), "metrics": {"reliability": {"token_acc": {"pre": None if pre is None else pre[i],
                                                                          "post": v}}}, "efficiency": {}}
            for i, v in enumerate(values)]


@pytest.mark.parametrize("v", [0.0, 1.0, 0.1, 0.95, 2.0 / 3.0])
def test_constant_metric_has_the_point_interval(v):
    assert bootstrap_ci([v] * 20) == [v, v]
    s = summarise(_records([v] * 20, [v] * 20), "m", "model", "single", 0.0)
    e = s["metrics"]["reliability"]["token_acc"]
    assert e["ci95"] == [v, v] and e["delta_ci95"] == [0.0, 0.0] and e["n"] == 20


def test_interval_is_seeded_covers_the_mean_and_shrinks_with_n():
    rng = random.Random(3)
    xs = [float(rng.random() < 0.9) for _ in range(20)]
    ci = bootstrap_ci(xs)
    assert ci == bootstrap_ci(xs)  # seeded: the same summary every time
    m = sum(xs) / len(xs)
    assert ci[0] <= m <= ci[1] and 0.0 <= ci[0] and ci[1] <= 1.0
    # at n = 20 a reliability near 0.9 is uncertain by about ±0.1-0.15, as the normal approximation says
    assert 0.1 < ci[1] - ci[0] < 0.4
    wide = bootstrap_ci([float(i % 2) for i in range(20)])
    narrow = bootstrap_ci([float(i % 2) for i in range(2000)])
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5


def test_one_case_gives_no_interval():
    assert bootstrap_ci([0.7]) is None and bootstrap_ci([]) is None
    e = summarise(_records([0.7]), "m", "model", "single", 0.0)["metrics"]["reliability"]["token_acc"]
    assert "ci95" not in e and e["n"] == 1


def test_paired_comparison_of_a_run_with_itself_marks_nothing():
    rng = random.Random(0)
    xs = [rng.random() for _ in range(50)]
    d = paired_difference(xs, xs)
    assert d == {"n": 50, "diff": 0.0, "ci95": [0.0, 0.0], "significant": False}


def test_paired_comparison_marks_a_consistent_difference_only():
    rng = random.Random(1)
    a = [rng.random() for _ in range(50)]
    assert paired_difference(a, [x + 0.05 for x in a])["significant"]  # small but on every case
    d = paired_difference(a, [x + (0.2 if i % 2 else -0.2) for i, x in enumerate(a)])  # no net change
    assert d["ci95"][0] < 0.0 < d["ci95"][1] and not d["significant"]
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def test_table_shows_the_half_width():
    s = summarise(_records([1.0] * 18 + [0.0] * 2), "m", "model", "single", 0.0)
    e = s["metrics"]["reliability"]["token_acc"]
    hw = half_width(e["post"], e["ci95"])
    assert 0.05 < hw < 0.2
    assert f"0.900 ±{hw:.3f}" in summary_table(s)
