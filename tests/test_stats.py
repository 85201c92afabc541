"""kernorm.stats against values worked out by hand for small fixed examples."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kernorm import stats

# Student t's 97.5 % point with 4 degrees of freedom, from a printed table.
T_975_DF4 = 2.7764451


def test_describe_gives_mean_sd_and_the_t_interval():
    result = stats.describe([1, 2, 3, 4, 5])
    sd = math.sqrt(10 / 4)  # squared deviations 4 + 1 + 0 + 1 + 4 over n − 1
    half_width = T_975_DF4 * sd / math.sqrt(5)
    assert (result["n"], result["mean"]) == (5, 3.0)
    assert result["sd"] == pytest.approx(sd)
    assert result["ci"] == pytest.approx([3 - half_width, 3 + half_width])
    assert stats.describe([0.99])["ci"] is None


def test_describe_clips_the_interval_to_what_the_figure_can_be():
    # Two seeds far apart: the t interval (12.7 standard errors each side) runs from −61 to 151 %.
    unbounded = stats.describe([0.3662, 0.5330])
    assert unbounded["ci"][0] < 0 and unbounded["ci"][1] > 1 and not unbounded["clipped"]
    result = stats.describe([0.3662, 0.5330], bounds=(0, 1))
    assert (result["ci"], result["clipped"]) == ([0.0, 1.0], True)
    assert result["mean"] == pytest.approx(0.4496)
    inside = stats.describe([1, 2, 3, 4, 5], bounds=(0, 10))
    assert inside["ci"] == pytest.approx(stats.describe([1, 2, 3, 4, 5])["ci"]) and not inside["clipped"]


def test_describe_gives_no_interval_without_spread():
    result = stats.describe([0.99, 0.99, 0.99], bounds=(0, 1))
    assert (result["mean"], result["sd"], result["ci"]) == (0.99, 0.0, None)


def test_paired_compares_matched_seeds():
    # Differences b − a: 1, 0.5, 1, 1.5, 1: mean 1, sd √(0.5 / 4).
    result = stats.paired([1, 2, 3, 4, 5], [2, 2.5, 4, 5.5, 6])
    se = math.sqrt(0.5 / 4) / math.sqrt(5)
    assert result["difference"] == pytest.approx(1.0)
    assert result["ci"] == pytest.approx([1 - T_975_DF4 * se, 1 + T_975_DF4 * se])
    assert result["t_p"] == pytest.approx(0.0032, abs=1e-4)  # t = 1 / se = 6.32 on 4 degrees of freedom
    # All five differences positive: the exact signed-rank test's two-sided p is 2 · (1/2)^5.
    assert result["wilcoxon_p"] == pytest.approx(2 / 32)


def test_paired_clips_the_difference_s_interval_to_its_bounds():
    unbounded = stats.paired([10, 20], [40, 45])  # +30, +25: t interval about [−4, +59]
    bounded = stats.paired([10, 20], [40, 45], bounds=(0, 50))
    assert unbounded["ci"][0] < 0 < 50 < unbounded["ci"][1] and not unbounded["clipped"]
    assert (bounded["ci"], bounded["clipped"], bounded["t_p"]) == ([0.0, 50.0], True, unbounded["t_p"])


def test_paired_order_sets_the_sign():
    assert stats.paired([2, 2.5, 4, 5.5, 6], [1, 2, 3, 4, 5])["difference"] == pytest.approx(-1.0)


def test_identical_seeds_show_no_difference_and_no_spread():
    result = stats.paired([0.99, 0.98], [0.99, 0.98])
    assert (result["difference"], result["spread"], result["t_p"], result["wilcoxon_p"]) == (0.0, False, None, 1.0)


def test_a_constant_difference_has_no_spread_and_no_p():
    # 99.15 − 99.12 and 99.16 − 99.13 differ by float noise only: the t-test would give p = 0 on it.
    result = stats.paired([99.12, 99.13], [99.15, 99.16])
    assert result["difference"] == pytest.approx(0.03)
    assert (result["sd"], result["spread"], result["ci"], result["t_p"]) == (0.0, False, None, None)
    assert result["wilcoxon_p"] == 0.5  # both differences positive: 2 · (1/2)^2, the least two seeds can give


def test_differences_are_rounded_to_one_test_image_before_the_tests():
    a, b = np.array([0.9912, 0.9913, 0.9920, 0.9901]), np.array([0.9915, 0.9910, 0.9924, 0.9904])
    result = stats.paired(100 * a, 100 * b)
    # +0.03, −0.03, +0.04, +0.03 points: three tied ranks (2 each) and 4; the exact two-sided p is 8 of the
    # 16 sign patterns (T+ ≥ 8 or ≤ 2). Float noise in 100 · accuracy would split the ties and give 0.375.
    assert result["wilcoxon_p"] == pytest.approx(0.5)
    assert result["difference"] == pytest.approx(0.0175)


def test_holm_multiplies_by_the_remaining_count_and_keeps_order():
    # Sorted: 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 raised to the 0.06 before it.
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_holm_counts_an_untestable_comparison_in_the_family_and_leaves_it_untested():
    assert stats.holm([0.01, None, 0.03]) == [pytest.approx(0.03), None, pytest.approx(0.06)]


def test_detectable_difference_shrinks_with_seeds_towards_the_normal_formula():
    sizes = [stats.detectable_difference(1.0, n) for n in (3, 5, 10, 100)]
    assert sizes == sorted(sizes, reverse=True)
    # For many seeds, (z_0.975 + z_0.8) · sd / √n = 2.8016 / 10; the t test needs a little more.
    assert 0.2802 < sizes[-1] < 0.29
    assert stats.detectable_difference(2.0, 5) == pytest.approx(2 * sizes[1])


def test_detectable_difference_at_a_strict_level_with_two_seeds():
    # Two seeds at Holm's strictest level over 10 comparisons need over a hundred standard deviations.
    alpha, size = 0.005, stats.detectable_difference(1.0, 2, alpha=0.005)
    critical = scipy_stats.t.ppf(1 - alpha / 2, 1)
    assert size > 100
    assert scipy_stats.nct.sf(critical, 1, size * math.sqrt(2)) == pytest.approx(stats.POWER)


def test_mcnemar_counts_discordant_images():
    labels = [0] * 10
    a = [0] * 8 + [1] * 2  # right on images 0-7
    b = [0] * 5 + [1] * 5  # right on images 0-4
    result = stats.mcnemar(a, b, labels)
    assert (result["a_only"], result["b_only"]) == (3, 0)
    assert (result["accuracy_a"], result["accuracy_b"]) == (0.8, 0.5)
    assert result["p"] == pytest.approx(2 / 8)  # 3 of 3 discordant images one way: 2 · (1/2)^3
    assert stats.mcnemar(a, a, labels)["p"] == 1.0
