"""A sweep's statistics: the spread of a config over its seeds and the difference of two configs,
against scipy's Welch t-test."""

import math

import numpy as np
import pytest
from scipy import stats

from ditlab.metrics.across_seeds import difference, spread

pytestmark = pytest.mark.unit


def test_spread_of_a_config_over_its_seeds():
    s = spread([2.0, 3.0, None, 4.0], [0.3, 0.4, None, 0.5], [1.5, 2.4, None, 3.1], [2.5, 3.6, None, 4.9])
    assert (s.n, s.mean, s.sd) == (3, 3.0, 1.0)
    assert s.within_se == pytest.approx(math.sqrt((0.09 + 0.16 + 0.25) / 3))
    assert s.runs == ((2.0, 1.5, 2.5), (3.0, 2.4, 3.6), (4.0, 3.1, 4.9))
    one = spread([2.0, math.nan], [None, None], [None, None], [None, None])
    assert one.n == 1 and math.isnan(one.sd) and one.within_se is None
    assert spread([None], [None], [None], [None]) is None


def test_difference_is_welchs_interval_across_seeds():
    a_values, b_values = [2.1, 2.6, 1.9], [3.0, 3.4, 2.7, 3.9]
    a = spread(a_values, [None] * 3, [None] * 3, [None] * 3)
    b = spread(b_values, [None] * 4, [None] * 4, [None] * 4)
    found = difference(a, b, level=0.9)
    welch = stats.ttest_ind(b_values, a_values, equal_var=False).confidence_interval(0.9)
    assert (found.low, found.high) == pytest.approx((welch.low, welch.high), rel=1e-12)
    assert found.estimate == pytest.approx(np.mean(b_values) - np.mean(a_values))
    assert found.resolved and found.method.startswith("Welch, 3+4 seeds")
    assert not difference(a, a).resolved


def test_one_seed_each_falls_back_to_the_runs_own_se():
    a = spread([2.0], [0.3], [None], [None])
    b = spread([2.5], [0.4], [None], [None])
    found = difference(a, b)
    assert found.high - found.estimate == pytest.approx(1.959964 * 0.5, rel=1e-5)  # sqrt(0.3^2 + 0.4^2)
    assert "seed-to-seed variation unmeasured" in found.method and not found.resolved
    assert difference(spread([2.0], [None], [None], [None]), b) is None
