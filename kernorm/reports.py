"""Reports on run folders: learning curves, misclassified galleries, confusion matrices, results tables.

Figures are drawn on matplotlib `Figure` objects and saved through the Agg
canvas, never through pyplot: nothing needs a display, and no global figure
state is left behind. Each `draw_*` function returns a `Figure` (so tests can
read what it shows); `save_figure` writes it whole or not at all.
"""

import math
import os

import keras
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kernorm.errors import KernormError
from kernorm.files import atomic_path

DPI = 100
CURVES_SIZE = (12, 8)  # inches; 1200×800 px at DPI
CONFUSION_SIZE = (7, 6.4)  # 700×640 px
GALLERY_COLUMNS = 5
GALLERY_CELL = (2.0, 2.3)  # inches per image and its caption
GALLERY_TITLE = 0.6  # inches above the images
CLASSES = 10
# Every curve is drawn with markers, so that a curve of one epoch (one point) shows too.
LINE = {"marker": "o", "markersize": 3, "linewidth": 1.6}


def run_labels(runs):
    """One legend label per run: its experiment label, or its folder name where labels repeat."""
    labels = [run.label for run in runs]
    return [label if labels.count(label) == 1 else f"{label} ({os.path.basename(os.path.normpath(run.path))})"
            for label, run in zip(labels, runs)]


def save_figure(fig, path):
    """Writes `fig` to `path` (format from its suffix: .png, .pdf, .svg, ...), atomically."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise KernormError(f"{path}: cannot write a figure as {fmt or 'a file without suffix'}; "
                           f"name it .png, .pdf or .svg")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=fmt)


def new_figure(size):
    """A constrained-layout `Figure` of `size` inches, drawn without pyplot."""
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def percent_ylim(ax, low, high):
    """Shows `low` to `high` percent on `ax`'s y axis with a margin of a tenth, never below 0 or above 100 %."""
    margin = 0.1 * (high - low) or 0.05
    ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))


# (history column, panel title, y label, shown in percent)
PANELS = [("train_loss", "Train loss", "cross-entropy", False), ("test_loss", "Test loss", "cross-entropy", False),
          ("train_acc", "Train accuracy", "accuracy (%)", True), ("test_acc", "Test accuracy", "accuracy (%)", True)]


def draw_curves(runs):
    """Four panels (train loss, test loss, train accuracy, test accuracy), one line per run.

    Each run's best test epoch (or, with a validation split, the epoch chosen
    on it) is marked with a star on the two test panels, and its test
    accuracy at that epoch is given in the legend. Every epoch is a marker (a
    one-epoch run shows as points), and the accuracy panels stay within
    [0, 100] %.

    Args:
        runs: a list of `kernorm.rundir.Run`s.

    Returns:
        A `Figure` of `CURVES_SIZE` inches.
    """
    fig = new_figure(CURVES_SIZE)
    axes = fig.subplots(2, 2, sharex=True)
    handles, kinds = [], set()
    for run, label in zip(runs, run_labels(runs)):
        epochs = [row["epoch"] for row in run.history]
        chosen = run.metrics.get("chosen_epoch")
        best = chosen or run.metrics["best_epoch"]
        best_acc = run.metrics["chosen_test_acc"] if chosen else run.metrics["best_test_acc"]
        kind = "chosen on validation" if chosen else "best test"
        kinds.add("epoch chosen on validation" if chosen else "best test epoch")
        for ax, (key, _, _, percent) in zip(axes.flat, PANELS):
            values = [row[key] * (100 if percent else 1) for row in run.history]
            line, = ax.plot(epochs, values, **LINE, label=f"{label}: {kind} {100 * best_acc:.2f} % (epoch {best})")
            if key.startswith("test") and best in epochs:
                ax.plot(best, values[epochs.index(best)], marker="*", markersize=15, color=line.get_color(),
                        markeredgecolor="black", linestyle="none")
        handles.append(line)
    handles.append(Line2D([], [], marker="*", markersize=15, color="white", markeredgecolor="black",
                          linestyle="none", label=" / ".join(sorted(kinds))))
    for ax, (_, title, ylabel, percent) in zip(axes.flat, PANELS):
        if percent:
            percent_ylim(ax, *ax.dataLim.intervaly)
        ax.set_title(title, fontsize=13)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_xticks(epoch_ticks(max(row["epoch"] for run in runs for row in run.history)))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle("Learning curves", fontsize=15)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=10,
               frameon=False)
    return fig


def epoch_ticks(last):
    """Epoch 1, then every 5th (every epoch for short runs): epochs count from 1, not 0."""
    return list(range(1, last + 1)) if last <= 10 else [1] + list(range(5, last + 1, 5))


def predict_probs(model, images):
    """Class probabilities of `model` (which outputs logits) for uint8 images `(N, 28, 28)` → `(N, 10)`."""
    logits = model.predict(images[..., None].astype("float32"), batch_size=1000, verbose=0)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


def misclassified(labels, probs, count):
    """The first `count` images (in test-set order) whose predicted class is not their label.

    Args:
        labels: `(N,)` true classes.
        probs: `(N, 10)` predicted class probabilities.
        count: how many to return at most.

    Returns:
        A list of `(index, true label, predicted label, confidence)`, confidence
        being the probability given to the predicted class.
    """
    predicted = probs.argmax(-1)
    wrong = np.flatnonzero(predicted != labels)[:count]
    return [(int(i), int(labels[i]), int(predicted[i]), float(probs[i, predicted[i]])) for i in wrong]


def caption(true, predicted, confidence):
    return f"true {true}, predicted {predicted}\nconfidence {confidence:.0%}"


def gallery_size(count):
    """The gallery's figure size in inches for `count` images."""
    rows = max(1, math.ceil(count / GALLERY_COLUMNS))
    return GALLERY_COLUMNS * GALLERY_CELL[0], rows * GALLERY_CELL[1] + GALLERY_TITLE


def draw_gallery(images, labels, probs, count=20, title="Misclassified test images"):
    """A grid of the first `count` misclassified images, dark ink on white, each captioned.

    Args:
        images: `(N, 28, 28)` images.
        labels: `(N,)` true classes.
        probs: `(N, 10)` predicted probabilities (see `predict_probs`).
        count: images to show; fewer appear when fewer are wrong.
        title: the figure's title; the number of errors is appended.

    Returns:
        A `Figure` of `gallery_size(count)` inches. Its image axes, in order,
        show the images `misclassified` returns, titled with `caption`.
    """
    shown = misclassified(labels, probs, count)
    errors = int((probs.argmax(-1) != labels).sum())
    fig = new_figure(gallery_size(count))
    axes = fig.subplots(max(1, math.ceil(count / GALLERY_COLUMNS)), GALLERY_COLUMNS, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (index, true, predicted, confidence) in zip(axes.flat, shown):
        ax.imshow(images[index], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(caption(true, predicted, confidence), fontsize=10)
    fig.suptitle(f"{title}: {len(shown)} of {errors:,} errors in {len(labels):,} images", fontsize=13)
    return fig


def confusion_matrix(labels, predicted, classes=CLASSES):
    """`(classes, classes)` counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def draw_confusion(matrix, title="Confusion matrix"):
    """The confusion matrix as a grid of counts, colour on a log scale so that rare errors show.

    Args:
        matrix: `(C, C)` counts from `confusion_matrix`.
        title: the figure's title; the accuracy is appended.

    Returns:
        A `Figure` of `CONFUSION_SIZE` inches.
    """
    classes = len(matrix)
    fig = new_figure(CONFUSION_SIZE)
    ax = fig.subplots()
    shown = np.ma.masked_equal(matrix, 0)
    image = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=0.5, vmax=max(2, matrix.max())))
    for (row, col), n in np.ndenumerate(matrix):
        if n:
            ax.text(col, row, str(n), ha="center", va="center", fontsize=9,
                    color="white" if n > matrix.max() ** 0.6 else "black")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    ax.set_title(f"{title}\naccuracy {accuracy:.2%} on {matrix.sum():,} test images", fontsize=12)
    fig.colorbar(image, ax=ax, label="images (log scale)", shrink=0.8)
    return fig


SUMMARY_FIELDS = ["params", "best_train_acc", "best_test_acc", "best_epoch", "final_test_acc",
                  "seconds_per_epoch", "epochs_completed"]
# With a validation split: the epoch chosen on it and its test accuracy (runs trained before it existed lack them).
CHOSEN_FIELDS = ["chosen_test_acc", "chosen_epoch"]


def summarize_run(run):
    """A run's row of the results table: its label and folder, and its `metrics.json` figures."""
    return {"experiment": run.label, "run": run.path, **{key: run.metrics[key] for key in SUMMARY_FIELDS},
            **{key: run.metrics.get(key) for key in CHOSEN_FIELDS}}


def _percent(value):
    return "–" if value is None else f"{100 * value:.2f}"


def results_markdown(rows):
    """A markdown table of `summarize_run` rows (accuracies in percent), one per run, named by its folder.

    Rows of runs trained with a validation split get the test accuracy at the
    epoch chosen on it in a column of its own. Rows that carry a `"study"`
    dict (`best_train_acc`, `best_test_acc`, `notebook_best_test_acc`,
    `notebook_final_test_acc`) get the study's own figures in extra columns beside ours.
    """
    study = any("study" in row for row in rows)
    chosen = any(row.get("chosen_epoch") for row in rows)
    head = ["run", "experiment", "params", "best train acc", "best test acc (epoch)", "final test acc", "s / epoch"]
    if chosen:
        head.insert(5, "chosen on validation: test acc (epoch)")
    if study:
        head += ["study: best train / best test", "study notebook: best / final test"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [os.path.basename(os.path.normpath(row["run"])), row["experiment"], f"{row['params']:,}",
                 _percent(row["best_train_acc"]), f"{_percent(row['best_test_acc'])} ({row['best_epoch'] or '–'})",
                 _percent(row["final_test_acc"]), f"{row['seconds_per_epoch']:.1f}"]
        if chosen:
            cells.insert(5, f"{_percent(row.get('chosen_test_acc'))} ({row.get('chosen_epoch') or '–'})")
        if study:
            s = row.get("study") or {}
            cells += [f"{_percent(s.get('best_train_acc'))} / {_percent(s.get('best_test_acc'))}",
                      f"{_percent(s.get('notebook_best_test_acc'))} / {_percent(s.get('notebook_final_test_acc'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
