"""kernorm.findings on crafted runs: the decisions and their wording, the results table and the plots.

No training: each run is a `kernorm.rundir.Run` built from the figures the report reads.
"""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kernorm import findings, stats
from kernorm.config import TrainConfig
from kernorm.rundir import Run

KEY = "final_test_acc"
WHAT = "final test accuracy"


def crafted(cell, seed, accuracies, loss=0.03):
    """A finished run of `cell`: its test accuracy per epoch, the last one final."""
    history = [{"epoch": epoch, "test_acc": acc} for epoch, acc in enumerate(accuracies, 1)]
    return Run(f"{cell}-seed{seed}", TrainConfig(seed=seed, epochs=len(accuracies)), history,
               {"final_test_acc": accuracies[-1], "final_test_loss": loss, "chosen_epoch": None})


def cells(finals):
    """`{cell: {seed: Run}}` from `{cell: final test accuracy per seed, from seed 1}`."""
    return {cell: {seed: crafted(cell, seed, [acc]) for seed, acc in enumerate(accs, 1)}
            for cell, accs in finals.items()}


def report(finals, pairs):
    """The comparisons of `pairs` and the findings.md they give."""
    runs = cells(finals)
    rows = findings.compare(runs, pairs, KEY)
    return rows, findings.findings_markdown("T", findings.cell_results(runs), rows, KEY)


def test_a_difference_on_every_seed_is_found_and_worded_as_found():
    a = [0.9910, 0.9912, 0.9915, 0.9911, 0.9913]
    gains = [0.0010, 0.0012, 0.0009, 0.0011, 0.0010]
    (row,), text = report({"A": a, "B": list(np.add(a, gains))}, [("A", "B")])
    test = scipy_stats.ttest_1samp([0.10, 0.12, 0.09, 0.11, 0.10], 0.0)
    low, high = test.confidence_interval(0.95)
    assert row["difference"] == pytest.approx(0.104)
    assert row["t_p_holm"] == pytest.approx(test.pvalue) and row["t_p_holm"] < 0.001  # one comparison: m = 1
    assert (f"- **B** is 0.10 points better than **A** in final test accuracy: +0.10 points, 95 % CI "
            f"[{low:+.2f}, {high:+.2f}], p < 0.001 (paired t-test over 5 seeds, Holm-corrected; Wilcoxon "
            f"signed-rank p = 0.0625).") in text.splitlines()


def test_no_difference_says_what_these_seeds_could_detect_at_holm_s_level():
    finals = {"A": [0.95, 0.97, 0.96], "B": [0.96, 0.95, 0.97], "C": [0.97, 0.96, 0.95]}
    rows, text = report(finals, [("A", "B"), ("A", "C"), ("B", "C")])
    first = rows[0]  # B − A: +1, −2, +1 points
    assert (first["difference"], first["sd"]) == (pytest.approx(0.0), pytest.approx(3 ** 0.5))
    assert [row["alpha"] for row in rows] == [pytest.approx(0.05 / 3)] * 3
    assert first["detectable"] == pytest.approx(stats.detectable_difference(3 ** 0.5, 3, alpha=0.05 / 3))
    # The level matters: at 0.05 a 3-seed sweep of 3 comparisons would claim 14.97 where Holm needs 25.99.
    assert first["detectable"] / stats.detectable_difference(3 ** 0.5, 3) == pytest.approx(25.99 / 14.97, rel=1e-3)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 3 and not any("better" in line or "worse" in line for line in lines)
    assert lines[0].startswith("- No detectable difference between **A** and **B** in final test accuracy with 3 "
                               "seeds: +0.00 points, 95 % CI [")
    assert lines[0].endswith(f"These seeds could detect a difference of about {first['detectable']:.2f} points "
                             f"(with 80 % power at Holm's strictest level, α = 0.05 / 3 = 0.0167).")


def test_a_difference_without_spread_is_not_testable():
    rows, text = report({"A": [0.9912, 0.9913], "B": [0.9915, 0.9916], "C": [0.9912, 0.9913]},
                        [("A", "B"), ("A", "C")])
    for row in rows:
        assert (row["spread"], row["t_p"], row["t_p_holm"], row["ci"], row["detectable"]) == (
            False, None, None, None, None)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == [
        "- **B** − **A** in final test accuracy: +0.03 points on each of the 2 seeds; no spread: not testable with 2 "
        "seeds (the paired t-test needs differences that vary), so no difference is claimed; Wilcoxon signed-rank "
        "p = 1, Holm-corrected.",
        "- **C** − **A** in final test accuracy: +0.00 points on each of the 2 seeds; no spread: not testable with 2 "
        "seeds (the paired t-test needs differences that vary), so no difference is claimed; Wilcoxon signed-rank "
        "p = 1, Holm-corrected."]
    assert "p = 0 " not in text and "p < 0.001" not in text


def test_two_seeds_claim_nothing_they_cannot_show():
    rows, text = report({"A": [0.9912, 0.9920], "B": [0.9930, 0.9926]}, [("A", "B")])  # +0.18, +0.06 points
    (row,) = rows
    test = scipy_stats.ttest_1samp([0.18, 0.06], 0.0)
    assert row["t_p_holm"] == pytest.approx(test.pvalue) and row["t_p_holm"] > 0.05
    assert row["detectable"] == pytest.approx(stats.detectable_difference(row["sd"], 2))  # m = 1: α = 0.05
    low, high = test.confidence_interval(0.95)
    assert (f"- No detectable difference between **A** and **B** in final test accuracy with 2 seeds: +0.12 points, "
            f"95 % CI [{low:+.2f}, {high:+.2f}], p = {test.pvalue:.3g} (paired t-test over 2 seeds, Holm-corrected; "
            f"Wilcoxon signed-rank p = 0.5). These seeds could detect a difference of about {row['detectable']:.2f} "
            f"points (with 80 % power at Holm's strictest level, α = 0.05 / 1 = 0.05).") in text.splitlines()


def test_two_seeds_far_apart_keep_their_interval_within_what_a_difference_can_be():
    # +26.49 and +39.16 points: the t interval of the difference alone runs past +100.
    (row,), text = report({"A": [0.1849, 0.1559], "B": [0.4498, 0.5475]}, [("A", "B")])
    assert row["clipped"] and row["ci"][1] == 100.0 and row["ci"][0] < 0
    assert row["detectable"] > 100
    (line,) = [line for line in text.splitlines() if line.startswith("- ")]
    assert f"95 % CI [{row['ci'][0]:+.2f}, +100.00] (clipped), p = " in line
    assert line.endswith(f"These seeds could not detect even a difference of 100 points (with 80 % power at Holm's "
                         f"strictest level, α = 0.05 / 1 = 0.05, they would need {row['detectable']:.0f}).")


def test_the_results_table_clips_an_accuracy_interval_to_0_100_and_says_so():
    runs = cells({"wide": [0.3662, 0.5330], "flat": [0.99, 0.99], "one": [0.98]})
    table = findings.results_markdown("T", findings.cell_results(runs))
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["wide"][2] == "44.96 [0.00, 100.00] (clipped)"  # the t interval: [−61.01, 150.93]
    assert rows["flat"][2] == "99.00 (no spread)"
    assert rows["one"][2] == "98.00"
    assert "clipped to it and marked (clipped)" in table


def test_seeds_plot_stays_on_the_accuracy_scale():
    runs = cells({"wide": [0.3662, 0.5330], "tight": [0.9912, 0.9915, 0.9920]})
    fig = findings.draw_seeds(runs, findings.cell_results(runs), KEY)
    low, high = fig.axes[0].get_ylim()
    assert 0 <= low <= 36.62 and 99.20 <= high <= 100
    runs = cells({"tight": [0.9912, 0.9915, 0.9920]})
    low, high = findings.draw_seeds(runs, findings.cell_results(runs), KEY).axes[0].get_ylim()
    assert 98.5 < low < 99.12 and 99.20 < high < 99.5  # zoomed on the seeds and their interval


def test_one_epoch_curves_show_their_points_and_band():
    runs = {"A": {seed: crafted("A", seed, [acc]) for seed, acc in ((1, 0.97), (2, 0.99))},
            "B": {1: crafted("B", 1, [1.0])}}
    ax = findings.draw_cell_curves(runs).axes[0]
    means = [line for line in ax.lines if line.get_label().startswith(("A", "B"))]
    assert [line.get_marker() for line in means] == ["o", "o"]
    assert [tuple(line.get_xydata()[0]) for line in means] == [(1, pytest.approx(98.0)), (1, 100.0)]
    band = ax.collections[0].get_segments()[0]  # A's seeds span 97 to 99 %
    np.testing.assert_allclose(band, [[1, 97], [1, 99]])
    low, high = ax.get_ylim()
    assert 90 < low < 97 and high == 100  # a seed at 100 %: the axis stops there
