"""`--validation N`: held-out images, the epoch chosen on them, and the per-image predictions saved."""

import dataclasses

import numpy as np
import pytest
from helpers import read_json

import kernorm.train
from kernorm.config import TrainConfig
from kernorm.data import load_mnist, split_validation
from kernorm.errors import KernormError
from kernorm.rundir import CHOSEN_PREDICTIONS, PREDICTIONS, read_history, read_predictions, summarize
from kernorm.train import train


def test_validation_images_are_the_last_ones_and_never_training_images():
    images = np.arange(1000)  # each image its own index
    (train_images, train_labels), (val_images, val_labels) = split_validation(images, images % 10, 150)
    assert list(train_images) == list(range(850)) and list(val_images) == list(range(850, 1000))
    assert not set(train_images) & set(val_images)
    assert list(val_labels) == list(val_images % 10)
    assert split_validation(images, images, 0) == ((images, images), None)
    with pytest.raises(KernormError, match="--validation 1000: hold out fewer than the 1,000 training images"):
        split_validation(images, images, 1000)


def test_the_epoch_is_chosen_on_validation_never_on_test():
    row = dict(train_loss=1.0, train_acc=0.9, test_loss=0.5, lr=0.01, seconds=1.0, val_loss=0.4)
    history = [{"epoch": 1, **row, "test_acc": 0.95, "val_acc": 0.96},
               {"epoch": 2, **row, "test_acc": 0.99, "val_acc": 0.95},   # the best test epoch
               {"epoch": 3, **row, "test_acc": 0.97, "val_acc": 0.97},   # the best validation epoch
               {"epoch": 4, **row, "test_acc": 0.96, "val_acc": 0.97}]   # as good: the earlier one stays
    metrics = summarize(history, params=10, wall_time=1.0, interrupted=False)
    assert (metrics["chosen_epoch"], metrics["chosen_val_acc"], metrics["chosen_test_acc"]) == (3, 0.97, 0.97)
    assert (metrics["best_epoch"], metrics["best_test_acc"]) == (None, None)
    assert (metrics["final_test_acc"], metrics["final_test_loss"]) == (0.96, 0.5)
    without = summarize([{k: v for k, v in r.items() if not k.startswith("val")} for r in history], 10, 1.0, False)
    assert (without["best_epoch"], without["chosen_epoch"]) == (2, None)


@pytest.mark.slow  # two 4-epoch runs: about 30 s
def test_shuffled_test_labels_do_not_move_the_chosen_epoch(tmp_path, data_dir, monkeypatch):
    config = TrainConfig(norm="gn", epochs=4, limit=1200, validation=400, lr=0.05, deterministic=True,
                         data_dir=data_dir)
    train(dataclasses.replace(config, out=str(tmp_path / "a")), verbose=False)

    def shuffled_test_labels(*args):
        train_set, (x_test, y_test) = load_mnist(*args)
        return train_set, (x_test, np.random.default_rng(0).permutation(y_test))

    monkeypatch.setattr(kernorm.train, "load_mnist", shuffled_test_labels)
    train(dataclasses.replace(config, out=str(tmp_path / "b")), verbose=False)
    a, b = read_history(tmp_path / "a"), read_history(tmp_path / "b")
    assert [row["val_acc"] for row in a] == [row["val_acc"] for row in b]
    assert [row["test_acc"] for row in a] != [row["test_acc"] for row in b]
    metrics = [read_json(tmp_path / name, "metrics.json") for name in "ab"]
    assert metrics[0]["chosen_epoch"] == metrics[1]["chosen_epoch"]


def test_a_run_saves_every_test_image_s_predicted_class(tmp_path, data_dir):
    config = TrainConfig(norm="ln", epochs=2, limit=600, validation=100, data_dir=data_dir, out=str(tmp_path / "r"))
    metrics = train(config, verbose=False)
    _, (_, y_test) = load_mnist(data_dir)
    final, chosen = read_predictions(config.out, PREDICTIONS), read_predictions(config.out, CHOSEN_PREDICTIONS)
    assert final.shape == chosen.shape == y_test.shape
    assert (final == y_test).mean() == pytest.approx(metrics["final_test_acc"])
    assert (chosen == y_test).mean() == pytest.approx(metrics["chosen_test_acc"])
    history = read_history(config.out)
    assert list(history[0]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc",
                                "lr", "seconds"]
