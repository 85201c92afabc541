import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kernorm import reports
from kernorm.cli import main
from kernorm.config import TrainConfig
from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.rundir import Run, load_run


def controlled_probs(labels, wrong):
    """Probabilities that are right everywhere except at `wrong` {index: (predicted, confidence)}."""
    probs = np.full((len(labels), 10), 0.01)
    probs[np.arange(len(labels)), labels] = 0.91
    for index, (predicted, confidence) in wrong.items():
        probs[index] = (1 - confidence) / 9
        probs[index, predicted] = confidence
    return probs


def test_gallery_shows_exactly_the_wrong_images_with_their_captions():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30)
    wrong = {3: ((labels[3] + 1) % 10, 0.62), 7: ((labels[7] + 5) % 10, 0.875), 22: ((labels[22] + 9) % 10, 0.34)}
    fig = reports.draw_gallery(images, labels, controlled_probs(labels, wrong), count=20, title="T")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    for ax, (index, (predicted, confidence)) in zip(shown, sorted(wrong.items())):
        np.testing.assert_array_equal(ax.images[0].get_array(), images[index])
        assert ax.get_title() == f"true {labels[index]}, predicted {predicted}\nconfidence {confidence:.0%}"
    assert len(fig.axes) == 20  # the grid keeps its size; empty cells stay blank
    assert fig._suptitle.get_text() == "T: 3 of 3 errors in 30 images"


def test_gallery_takes_the_first_count_errors_in_order():
    labels = np.arange(40) % 10
    wrong = {i: ((labels[i] + 1) % 10, 0.5) for i in range(0, 40, 3)}
    assert [row[0] for row in reports.misclassified(labels, controlled_probs(labels, wrong), 5)] == [0, 3, 6, 9, 12]


@pytest.fixture
def always_three_run(tiny_study, tmp_path):
    """A run folder whose model predicts class 3 for every image, with confidence e²/(e² + 9)."""
    run = str(tmp_path / "always3")
    shutil.copytree(os.path.join(tiny_study[0], "runs", "ln-l2-seed1"), run)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, kernel_initializer="zeros",
                                                 bias_initializer=keras.initializers.Constant([0, 0, 0, 2] + [0] * 6))])
    model.save(os.path.join(run, "model.keras"))
    return run


@pytest.mark.slow
def test_gallery_command_runs_the_run_s_model(always_three_run, mnist, tmp_path, monkeypatch):
    drawn = []
    real_draw = reports.draw_gallery
    monkeypatch.setattr(reports, "draw_gallery", lambda *a, **kw: drawn.append(real_draw(*a, **kw)) or drawn[-1])
    out = str(tmp_path / "gallery.png")
    result = CliRunner().invoke(main, ["gallery", always_three_run, "--count", "12", "--out", out])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (1000, 750)  # 3 rows of 5
    (_, _), (x_test, y_test) = mnist
    expected = np.flatnonzero(y_test != 3)[:12]
    shown = [ax for ax in drawn[0].axes if ax.images]
    assert len(shown) == 12
    confidence = np.exp(2) / (np.exp(2) + 9)
    for ax, index in zip(shown, expected):
        np.testing.assert_array_equal(ax.images[0].get_array(), x_test[index])
        assert ax.get_title() == f"true {y_test[index]}, predicted 3\nconfidence {confidence:.0%}"


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    matrix = reports.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], classes=3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    fig = reports.draw_confusion(matrix, title="M")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1", "1", "1", "1", "2"]
    assert "accuracy 66.67% on 6 test images" in fig.axes[0].get_title()


@pytest.mark.slow
def test_plot_and_compare_commands_on_run_folders(tiny_study, tmp_path, data_dir):
    runs = [os.path.join(tiny_study[0], "runs", name) for name in ("bn-l1-l2-seed1", "gn-l1-seed1")]
    out = str(tmp_path / "figs" / "curves.png")
    result = CliRunner().invoke(main, ["plot", *runs, "--out", out])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (1200, 800)
    result = CliRunner().invoke(main, ["compare", *runs])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| run | experiment | params |") and "study" not in lines[0]
    assert [line.split(" | ")[:2] for line in lines[2:4]] == [["| bn-l1-l2-seed1", "BN + L1 + L2"],
                                                              ["| gn-l1-seed1", "GN + L1"]]
    # Two runs are also compared image by image, from the test predictions they saved.
    _, (_, labels) = load_mnist(data_dir)
    right = [np.load(os.path.join(run, "test_predictions.npy")) == labels for run in runs]
    only = [int((right[0] & ~right[1]).sum()), int((right[1] & ~right[0]).sum())]
    assert lines[-1].startswith(f"McNemar's exact test, bn-l1-l2-seed1 against gn-l1-seed1: {only[0]} test images "
                                f"only bn-l1-l2-seed1 gets right, {only[1]} only gn-l1-seed1")


@pytest.mark.slow
def test_curves_mark_each_run_s_best_test_epoch(tiny_study):
    run = load_run(os.path.join(tiny_study[0], "runs", "ln-l2-seed1"))
    fig = reports.draw_curves([run, run])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    best = f"best test {100 * run.metrics['best_test_acc']:.2f} % (epoch {run.metrics['best_epoch']})"
    assert labels == [f"LN + L2 (ln-l2-seed1): {best}"] * 2 + ["best test epoch"]
    test_acc = fig.axes[3]
    stars = [line for line in test_acc.lines if line.get_marker() == "*"]
    best_point = (run.metrics["best_epoch"], 100 * run.metrics["best_test_acc"])
    assert [tuple(s.get_xydata()[0]) for s in stars] == [best_point] * 2
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "epoch", "epoch"]
    assert test_acc.lines[0].get_xdata()[0] == 1  # epochs count from 1


def test_curves_of_one_epoch_show_their_points_on_the_accuracy_scale():
    history = [{"epoch": 1, "train_loss": 0.2, "test_loss": 0.1, "train_acc": 1.0, "test_acc": 0.97}]
    run = Run("one-epoch", TrainConfig(norm="ln", l2=1e-4, epochs=1), history,
              {"best_epoch": 1, "best_test_acc": 0.97, "chosen_epoch": None})
    fig = reports.draw_curves([run])
    for ax, (key, _, _, percent) in zip(fig.axes, reports.PANELS):
        value = history[0][key] * (100 if percent else 1)
        assert ax.lines[0].get_marker() == "o" and tuple(ax.lines[0].get_xydata()[0]) == (1, value)
        if percent:
            low, high = ax.get_ylim()
            assert 0 <= low < value <= high <= 100  # 100 % train accuracy: the axis stops there


@pytest.mark.slow
def test_user_errors_end_in_one_line(tiny_study, tmp_path):
    run = os.path.join(tiny_study[0], "runs", "bn-l1-l2-seed1")
    result = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "is not a finished kernorm run folder (no config.json)" in result.output
    result = CliRunner().invoke(main, ["plot", run, "--out", str(tmp_path / "c.xyz")])
    assert result.exit_code == 1 and "name it .png, .pdf or .svg" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(os.path.join(run, "config.json"), half)
    with pytest.raises(KernormError, match="no history.csv"):
        load_run(str(half))


def fake_run(folder, seed, validation, test_accs, predictions):
    """A finished run folder of LN, written as `kernorm train` writes one, without training: its history
    has `test_accs` per epoch (and validation accuracies peaking at epoch 2 with `validation`)."""
    from kernorm.config import TrainConfig
    from kernorm.rundir import PREDICTIONS, summarize, write_metrics, write_predictions

    os.makedirs(folder)
    TrainConfig(norm="ln", seed=seed, validation=validation, epochs=len(test_accs)).save(
        os.path.join(folder, "config.json"))
    history = [{"epoch": epoch, "train_loss": 0.5, "train_acc": 0.9, "test_loss": 0.1, "test_acc": acc,
                **({"val_loss": 0.1, "val_acc": 0.99 if epoch == 2 else 0.98} if validation else {}),
                "lr": 0.01, "seconds": 2.0} for epoch, acc in enumerate(test_accs, 1)]
    with open(os.path.join(folder, "history.csv"), "w") as f:
        f.write(",".join(history[0]) + "\n" + "".join(",".join(map(str, row.values())) + "\n" for row in history))
    write_metrics(folder, summarize(history, 4700, 10.0, False))
    write_predictions(folder, PREDICTIONS, predictions)
    return str(folder)


def test_compare_names_each_run_by_its_folder_and_shows_the_validation_choice(tmp_path, mnist, data_dir):
    _, (_, labels) = mnist
    runs = [fake_run(tmp_path / "ln-seed1", 1, 0, [0.981, 0.985, 0.983], labels),
            fake_run(tmp_path / "ln-seed2", 2, 5000, [0.982, 0.987, 0.984], (labels + 1) % 10)]
    result = CliRunner().invoke(main, ["compare", *runs, "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:4]]
    assert head[:2] == ["run", "experiment"] and [row[:2] for row in rows] == [["ln-seed1", "LN"], ["ln-seed2", "LN"]]
    chosen = head.index("chosen on validation: test acc (epoch)")
    assert [row[chosen] for row in rows] == ["– (–)", "98.70 (2)"]  # the first run has no validation split
    best = head.index("best test acc (epoch)")
    assert [row[best] for row in rows] == ["98.50 (2)", "– (–)"]  # with a validation split no test figure picks
    assert lines[-1].startswith("McNemar's exact test, ln-seed1 against ln-seed2: 10000 test images only ln-seed1")
