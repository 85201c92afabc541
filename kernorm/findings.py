"""The statistical report of configurations trained over several seeds: tables, findings and plots.

`write_report` reads the finished run folders of each cell (a configuration
and its seeds) and writes, into the report folder:

- `results.json` and `results.md`: per cell, the number of seeds and the mean,
  standard deviation, 95 % confidence interval (clipped to the figure's range)
  and every seed's value of the final test accuracy, the test accuracy at the
  epoch chosen on validation (with a validation split) and the final test loss;
- `findings.md`: each comparison of two cells over their matched seeds in
  words that match its numbers: the difference, its confidence interval and
  Holm-corrected p-values, or the smallest difference these seeds could have
  detected at the level the decision uses, or that a difference without
  spread over the seeds is not testable;
- `seeds.png` (every seed's value per cell, with the mean and its confidence
  interval) and `curves.png` (per cell, the mean test and validation accuracy
  per epoch over the seeds, with their min–max band).
"""

import math
import os

import numpy as np
from matplotlib import colormaps

from kernorm import reports, stats
from kernorm.files import write_json, write_text
from kernorm.rundir import load_run, read_predictions, why_not_reusable

# (metrics.json key, what it is called in the report, shown in percent); percent figures are accuracies in
# [0, 1], the others losses in [0, ∞): the bounds their confidence intervals are clipped to.
FIGURES = (("final_test_acc", "final test accuracy", True),
           ("chosen_test_acc", "test accuracy at the epoch chosen on validation", True),
           ("final_test_loss", "final test loss", False))
ACCURACY, LOSS = (0.0, 1.0), (0.0, math.inf)
DIFFERENCE = (-100.0, 100.0)  # of two accuracies, in percentage points
SIGNIFICANCE = 0.05
SEEDS_SIZE = (0.9, 5.0)  # inches per cell, height
CURVES_SIZE = (12, 8.5)


def finished_runs(cells):
    """`{cell: {seed: Run}}` of the runs that have finished; unfinished and missing ones are left out."""
    return {name: {config.seed: load_run(config.run_dir) for config in configs if why_not_reusable(config) is None}
            for name, configs in cells.items()}


def comparison_key(runs):
    """The figure comparisons use: the test accuracy at the epoch chosen on validation when every run
    has one, else the final test accuracy. Neither is chosen by a test figure."""
    every = [run for seeds in runs.values() for run in seeds.values()]
    return "chosen_test_acc" if every and all(run.metrics.get("chosen_epoch") for run in every) else "final_test_acc"


def cell_results(runs):
    """Per cell: `n`, `seeds` and, per figure of `FIGURES` that its runs hold, `stats.describe` within its bounds."""
    results = {}
    for name, seeds in runs.items():
        entry = {"n": len(seeds), "seeds": sorted(seeds)}
        for key, _, percent in FIGURES:
            values = [seeds[seed].metrics.get(key) for seed in sorted(seeds)]  # runs of older kernorm lack some
            if values and None not in values:
                entry[key] = stats.describe(values, ACCURACY if percent else LOSS)
        results[name] = entry
    return results


def compare(runs, pairs, key):
    """Paired comparisons of `key` over matched seeds, in percentage points, Holm-corrected over all of them.

    Args:
        runs: `{cell: {seed: Run}}`.
        pairs: `(a, b)` cell names; each compares b with a. Pairs with fewer
            than two matched seeds are left out.
        key: the metrics.json figure compared, an accuracy.

    Returns:
        A list of dicts: `a`, `b`, `seeds` and `stats.paired`'s figures (the
        differences rounded to `stats.RESOLUTION`, one test image, and their
        interval clipped to `DIFFERENCE`), with
        `t_p_holm` and `wilcoxon_p_holm` added, `family` (m, the number of
        comparisons), `alpha` (Holm's strictest level, `SIGNIFICANCE / m`) and
        `detectable`: the smallest difference the paired t-test finds with
        `stats.POWER` at `alpha` (None without spread: not testable).
    """
    rows = []
    for a, b in pairs:
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if len(seeds) >= 2:
            values = [[100 * runs[cell][seed].metrics[key] for seed in seeds] for cell in (a, b)]
            rows.append({"a": a, "b": b, "seeds": seeds, **stats.paired(*values, bounds=DIFFERENCE)})
    for test in ("t_p", "wilcoxon_p"):
        for row, adjusted in zip(rows, stats.holm([row[test] for row in rows])):
            row[f"{test}_holm"] = adjusted
    for row in rows:
        row.update(family=len(rows), alpha=SIGNIFICANCE / len(rows))
        row["detectable"] = stats.detectable_difference(row["sd"], row["n"], row["alpha"]) if row["spread"] else None
    return rows


def p_text(p):
    """A p-value as findings write it: "p = 0.004", or "p < 0.001"."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def finding(row, what):
    """One comparison of `compare` in words that match its numbers."""
    d, n = row["difference"], row["n"]
    wilcoxon = f"Wilcoxon signed-rank {p_text(row['wilcoxon_p_holm'])}"
    if not row["spread"]:
        return (f"- **{row['b']}** − **{row['a']}** in {what}: {d:+.2f} points on each of the {n} seeds; "
                f"no spread: not testable with {n} seeds (the paired t-test needs differences that vary), so no "
                f"difference is claimed; {wilcoxon}, Holm-corrected.")
    low, high = row["ci"]
    numbers = (f"{d:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}]{' (clipped)' if row['clipped'] else ''}, "
               f"{p_text(row['t_p_holm'])} "
               f"(paired t-test over {n} seeds, Holm-corrected; {wilcoxon})")
    if row["t_p_holm"] < SIGNIFICANCE:
        side = "better" if d > 0 else "worse"
        return f"- **{row['b']}** is {abs(d):.2f} points {side} than **{row['a']}** in {what}: {numbers}."
    level = (f"with {100 * stats.POWER:.0f} % power at Holm's strictest level, α = {SIGNIFICANCE} / {row['family']} "
             f"= {row['alpha']:.3g}")
    detect = (f"could detect a difference of about {row['detectable']:.2f} points ({level})"
              if row["detectable"] < DIFFERENCE[1] else
              f"could not detect even a difference of {DIFFERENCE[1]:.0f} points ({level}, they would need "
              f"{row['detectable']:.0f})")
    return (f"- No detectable difference between **{row['a']}** and **{row['b']}** in {what} with {n} seeds: "
            f"{numbers}. These seeds {detect}.")


def _cell_line(name, entry):
    cells = [name, str(entry["n"])]
    for key, _, percent in FIGURES:
        figure = entry.get(key)
        if figure is None:
            cells += ["–", "–"]
            continue
        scale, digits = (100, 2) if percent else (1, 4)
        mean = f"{scale * figure['mean']:.{digits}f}"
        if figure["ci"]:
            mean += f" [{scale * figure['ci'][0]:.{digits}f}, {scale * figure['ci'][1]:.{digits}f}]"
            mean += " (clipped)" if figure["clipped"] else ""
        elif figure["n"] > 1:
            mean += " (no spread)"
        cells += [mean, " / ".join(f"{scale * v:.{digits}f}" for v in figure["values"])]
    return "| " + " | ".join(cells) + " |"


def results_markdown(title, results):
    head = ["cell", "seeds"]
    for _, name, percent in FIGURES:
        head += [f"{name}{' (%)' if percent else ''}: mean [95 % CI]", "by seed"]
    return "\n".join([f"# {title}: results", "",
                      "Mean over the finished seeds with its 95 % confidence interval (Student t), then every "
                      "seed's value in seed order. An interval that would leave what the figure can be, [0, 100] % "
                      "for an accuracy and 0 or more for a loss, is clipped to it and marked (clipped); seeds that "
                      "all give the same value have no spread, and no interval.", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *(_cell_line(name, entry) for name, entry in results.items()), ""])


def findings_markdown(title, results, comparisons, key):
    what = dict((k, name) for k, name, _ in FIGURES)[key]
    seeds = sorted({entry["n"] for entry in results.values()})
    lines = [f"# {title}: findings", "",
             f"Each comparison is of the {what}, over the seeds both cells finished, as the second cell less the "
             f"first, in percentage points. The same seed gives both cells the same initial weights and data order "
             f"where their networks allow it. p-values are Holm-corrected over the {len(comparisons)} comparisons "
             f"below; a difference is reported as found when the corrected paired t-test gives p < {SIGNIFICANCE}. "
             f"With n seeds the Wilcoxon signed-rank test cannot give p below 2 / 2^n. Differences are rounded to "
             f"{stats.RESOLUTION} points (one test image in 10,000) before any test; a difference that is the same "
             f"on every seed has no spread, so the t-test is undefined and it is reported as not testable. The "
             f"difference these seeds could detect is that of the paired t-test with {100 * stats.POWER:.0f} % power "
             f"at Holm's strictest level, {SIGNIFICANCE} divided by the number of comparisons.", "",
             f"Cells: {len(results)}; seeds per cell: {', '.join(map(str, seeds)) or 'none finished'}.", ""]
    lines += [finding(row, what) for row in comparisons] or ["No two cells share two finished seeds yet."]
    return "\n".join(lines) + "\n"


def draw_seeds(runs, results, key):
    """Every seed's `key` per cell, with the mean and its 95 % confidence interval.

    The axis spans the seeds and the intervals, never below 0 or above 100 %.
    """
    names = list(results)
    fig = reports.new_figure((max(6.0, SEEDS_SIZE[0] * len(names) + 2), SEEDS_SIZE[1]))
    ax = fig.subplots()
    jitter = np.random.default_rng(0)
    for x, name in enumerate(names):
        figure = results[name].get(key)
        if figure is None:
            continue
        values = 100 * np.array(figure["values"])
        ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=18, color="tab:blue", alpha=0.6)
        mean = 100 * figure["mean"]
        if figure["ci"]:
            low, high = (100 * v for v in figure["ci"])
            ax.errorbar(x + 0.25, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=4)
        else:
            ax.plot(x + 0.25, mean, "o", color="black")
    reports.percent_ylim(ax, *ax.dataLim.intervaly)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{dict((k, n) for k, n, _ in FIGURES)[key]} (%)")
    ax.set_title("Each seed (blue); the mean and its 95 % CI (black)", fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    return fig


def draw_cell_curves(runs):
    """Per cell, the mean test (and validation) accuracy per epoch over its seeds, with the min–max band.

    Means carry markers and a one-epoch band is a bar, so a one-epoch sweep shows; the axes stay within
    [0, 100] %.
    """
    panels = [("test_acc", "Test accuracy")]
    if any("val_acc" in run.history[0] for seeds in runs.values() for run in seeds.values()):
        panels.append(("val_acc", "Validation accuracy"))
    fig = reports.new_figure(CURVES_SIZE)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    lows, last = {column: [] for column, _ in panels}, 1
    for index, (name, seeds) in enumerate(runs.items()):
        epochs = min(len(run.history) for run in seeds.values())
        last = max(last, epochs)
        for ax, (column, _) in zip(axes, panels):
            values = 100 * np.array([[row[column] for row in run.history[:epochs]] for run in seeds.values()])
            x = np.arange(1, epochs + 1)
            color = cmap(index % cmap.N)
            ax.plot(x, values.mean(0), color=color, **reports.LINE, label=f"{name} ({len(seeds)} seeds)")
            if epochs == 1:  # a band over one epoch has no width: a bar shows it
                ax.vlines(x, values.min(0), values.max(0), color=color, alpha=0.3, linewidth=6)
            else:
                ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.15, linewidth=0)
            lows[column].append(values.min(0)[epochs // 4:].min())
    for ax, (column, title) in zip(axes, panels):
        # The first epochs climb steeply; the scale starts where the band of the last three quarters does.
        reports.percent_ylim(ax, min(lows[column]), ax.dataLim.intervaly[1])
        ax.set_xticks(reports.epoch_ticks(last))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), frameon=False)
    fig.suptitle("Mean over the seeds, and the band from the lowest to the highest seed")
    return fig


def mcnemar_line(a, b, labels):
    """Two finished runs (`kernorm.rundir.Run`) compared image by image on the test set, in words:
    McNemar's exact test on their final models' predictions."""
    result = stats.mcnemar(read_predictions(a.path), read_predictions(b.path), labels)
    names = [os.path.basename(os.path.normpath(run.path)) for run in (a, b)]
    verdict = "a detectable difference" if result["p"] < SIGNIFICANCE else "no detectable difference"
    return (f"McNemar's exact test, {names[0]} against {names[1]}: {result['a_only']} test images only "
            f"{names[0]} gets right, {result['b_only']} only {names[1]} ({100 * result['accuracy_a']:.2f} % against "
            f"{100 * result['accuracy_b']:.2f} %); {p_text(result['p'])}: {verdict}.")


def write_report(out, cells, pairs, title):
    """Writes the statistical report of `cells` into `out`; returns what `results.json` holds.

    Args:
        out: the report folder.
        cells: `{cell name: TrainConfig per seed}`.
        pairs: `(a, b)` cell names to compare, b against a.
        title: the report's title, e.g. "Sweep".
    """
    runs = finished_runs(cells)
    key = comparison_key(runs)
    results = cell_results(runs)
    comparisons = compare(runs, pairs, key)
    report = {"title": title, "compared": key, "cells": results, "comparisons": comparisons}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), report)
    write_text(os.path.join(out, "results.md"), results_markdown(title, results))
    write_text(os.path.join(out, "findings.md"), findings_markdown(title, results, comparisons, key))
    if any(runs.values()):
        reports.save_figure(draw_seeds(runs, results, key), os.path.join(out, "seeds.png"))
        reports.save_figure(draw_cell_curves({k: v for k, v in runs.items() if v}), os.path.join(out, "curves.png"))
    return report
