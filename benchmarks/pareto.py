"""Parameters against accuracy: kernorm's networks over seeds beside the published results at their sizes.

Reads finished run folders (a sweep's or `reproduce`'s folder stands for every
run in its `runs/`), groups them by network and experiment, and draws each
seed's final-epoch test accuracy, each group's mean, and the published
results of `PUBLISHED` on one plot, parameters on a log axis.

    python benchmarks/pareto.py FOLDER [FOLDER ...] [--out docs/accuracy-pareto.png]

Prints a markdown table: per group its parameters, runs, training images,
mean and range of the final test accuracy, and the training time per run
(median of the runs' wall time, and seconds per epoch).
"""

import argparse
import dataclasses
import os
import statistics
import sys

from kernorm.errors import KernormError
from kernorm.reports import new_figure, save_figure
from kernorm.rundir import load_run, why_not_reusable

# Published MNIST results at these sizes: (parameters, test accuracy %, what it is, the side its label goes).
PUBLISHED = [
    (1936, 99.10, "1,936 params, validation split", "right"),
    (997, 99.05, "997 params, best of hundreds of runs on the test set", "right"),
    (3762, 99.52, "3,762 params, final epoch of one seed", "left"),  # the compact preset's marks are right of it
]
MARKERS = {"bn": "o", "ln": "s", "gn": "^", "none": "x"}


def run_folders(folder):
    """`folder` itself if it is a run, else every folder in its `runs/`, sorted."""
    runs = os.path.join(folder, "runs")
    if not os.path.isdir(runs):
        return [folder]
    return [os.path.join(runs, name) for name in sorted(os.listdir(runs))
            if not name.startswith(".") and os.path.isdir(os.path.join(runs, name))]  # not the runs' locks


def grouped_runs(folders):
    """Finished runs by `(architecture, experiment label)`, in the order first met; an unfinished
    one is left out with a line on stderr."""
    groups = {}
    for folder in folders:
        for path in run_folders(folder):
            run = load_run(path)
            unfinished = why_not_reusable(dataclasses.replace(run.config, out=path))
            if unfinished:
                print(f"left out {path}: {unfinished}", file=sys.stderr)
                continue
            groups.setdefault((run.config.architecture, run.label), []).append(run)
    return groups


def training_images(run):
    """How many images a run trained on: all 60,000 less its limit and validation split."""
    return (run.config.limit or 60000) - run.config.validation


def draw(groups, path):
    """Each seed (small), each group's mean (large) and `PUBLISHED` (stars), parameters on a log axis."""
    fig = new_figure((8, 5))
    ax = fig.add_subplot()
    colors = {}
    for (architecture, label), runs in groups.items():
        color = colors.setdefault(architecture, f"C{len(colors)}")
        params = runs[0].metrics["params"]
        accuracies = [100 * run.metrics["final_test_acc"] for run in runs]
        marker = MARKERS.get(runs[0].config.norm, "o")
        ax.scatter([params] * len(runs), accuracies, s=12, alpha=0.4, color=color, marker=marker)
        ax.scatter([params], [statistics.fmean(accuracies)], s=70, color=color, marker=marker,
                   edgecolors="black", label=f"{architecture} {label} ({len(runs)} seeds)")
    for params, accuracy, what, side in PUBLISHED:
        ax.scatter([params], [accuracy], s=140, marker="*", color="grey", edgecolors="black")
        ax.annotate(f"published: {what}", (params, accuracy), textcoords="offset points",
                    xytext=(6 if side == "right" else -6, -12), ha="left" if side == "right" else "right", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("final-epoch test accuracy (%)")
    ax.set_title("Parameters against accuracy on MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def table(groups):
    """The markdown table of each group's figures."""
    lines = ["| network | experiment | params | runs | training images | final test acc: mean (min–max) "
             "| time per run: median | s / epoch: median |", "|---|---|---|---|---|---|---|---|"]
    for (architecture, label), runs in groups.items():
        accuracies = [100 * run.metrics["final_test_acc"] for run in runs]
        minutes = statistics.median(run.metrics["wall_time"] for run in runs) / 60
        per_epoch = statistics.median(run.metrics["seconds_per_epoch"] for run in runs)
        lines.append(f"| {architecture} | {label} | {runs[0].metrics['params']:,} | {len(runs)} "
                     f"| {training_images(runs[0]):,} | {statistics.fmean(accuracies):.2f} "
                     f"({min(accuracies):.2f}–{max(accuracies):.2f}) | {minutes:.1f} min | {per_epoch:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="run folders, or sweep/reproduce folders with a runs/ inside")
    parser.add_argument("--out", default="pareto.png", help="the plot's file (.png, .pdf or .svg)")
    args = parser.parse_args()
    try:
        groups = grouped_runs(args.folders)
        draw(groups, args.out)
    except KernormError as e:
        sys.exit(f"Error: {e}")
    print(table(groups))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
