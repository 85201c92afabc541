import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from helpers import FINISHED_RUN, kernorm_command, read_json, run

from kernorm.cli import main
from kernorm.config import TrainConfig
from kernorm.models import build_model
from kernorm.rundir import read_history
from kernorm.steps import make_steps
from kernorm.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A 2-epoch CLI run on 512 images (several seconds: the tests that use it are slow)."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "tiny")
    result = CliRunner().invoke(main, ["train", "--norm", "ln", "--l2", "1e-4", "--epochs", "2", "--limit", "512",
                                       "--data-dir", data_dir, "--out", run_dir])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


@pytest.mark.slow
def test_cli_writes_every_artifact(tiny_run, data_dir):
    run_dir, output = tiny_run
    assert sorted(os.listdir(run_dir)) == FINISHED_RUN
    config = TrainConfig.load(os.path.join(run_dir, "config.json"))
    assert (config.norm, config.l2, config.epochs, config.limit, config.data_dir) == ("ln", 1e-4, 2, 512, data_dir)
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert 0 < row["train_loss"] < 3 and 0 <= row["test_acc"] <= 1
        assert row["lr"] == 0.01 and row["seconds"] > 0
    metrics = read_json(run_dir, "metrics.json")
    assert metrics["params"] == 4700 and metrics["epochs_completed"] == 2
    assert metrics["final_test_acc"] == pytest.approx(history[-1]["test_acc"])
    assert metrics["best_test_acc"] == max(r["test_acc"] for r in history)
    assert "Trainable parameters: 4,700" in output and "Epoch 2/2" in output
    assert "test_acc" in output and f"run folder {run_dir}" in output


@pytest.mark.slow
def test_saved_model_reloads_in_safe_mode_and_predicts_like_the_run(tiny_run, mnist):
    from kernorm.models import load_model

    run_dir, _ = tiny_run
    model = load_model(os.path.join(run_dir, "model.keras"))
    (_, _), (x_test, y_test) = mnist
    acc = (model.predict(x_test[..., None].astype("float32"), verbose=0).argmax(-1) == y_test).mean()
    assert acc == pytest.approx(read_history(run_dir)[-1]["test_acc"], abs=1e-4)
    assert type(model.get_layer("block1").layers[1]).__name__ == "LayerNorm"


@pytest.mark.slow
def test_no_overwrite_without_flag(tiny_run, data_dir):
    run_dir, _ = tiny_run
    before = open(os.path.join(run_dir, "history.csv")).read()
    result = CliRunner().invoke(main, ["train", "--epochs", "1", "--limit", "64", "--data-dir", data_dir,
                                       "--out", run_dir])
    assert result.exit_code == 1
    assert "already exists; pass --overwrite" in result.output
    assert open(os.path.join(run_dir, "history.csv")).read() == before


@pytest.mark.slow
def test_overwrite_replaces_a_run(tmp_path, data_dir):
    args = ["train", "--epochs", "1", "--limit", "64", "--data-dir", data_dir, "--out", str(tmp_path / "r")]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, args + ["--overwrite", "--norm", "gn"])
    assert result.exit_code == 0, result.output
    assert TrainConfig.load(str(tmp_path / "r" / "config.json")).norm == "gn"


@pytest.mark.slow
def test_config_file_repeats_a_run_with_overrides(tiny_run, tmp_path, data_dir):
    run_dir, _ = tiny_run
    out = str(tmp_path / "again")
    result = CliRunner().invoke(main, ["train", "--config", os.path.join(run_dir, "config.json"),
                                       "--epochs", "1", "--out", out])
    assert result.exit_code == 0, result.output
    config = TrainConfig.load(os.path.join(out, "config.json"))
    assert (config.norm, config.l2, config.limit, config.epochs) == ("ln", 1e-4, 512, 1)


@pytest.mark.parametrize("args, message", [
    (["--norm", "xn"], "Invalid value for '--norm'"),
    (["--epochs", "0"], "Invalid value for '--epochs'"),
    (["--l2", "-1"], "Invalid value for '--l2'"),
    (["--norm", "gn", "--groups", "3"], "groups=3 does not divide 10 channels"),
    (["--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist does not exist"),
])
def test_bad_options_give_one_clear_line(tmp_path, data_dir, args, message):
    argv = ["train", "--limit", "64", "--epochs", "1", "--out", str(tmp_path / "r")]
    if "--data-dir" not in args:
        argv += ["--data-dir", data_dir]
    result = CliRunner().invoke(main, argv + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_bad_config_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"norm": "bn", "colour": "red"}')
    result = CliRunner().invoke(main, ["train", "--config", str(bad)])
    assert result.exit_code == 1 and "not a kernorm training config" in result.output


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly(tmp_path, data_dir):
    def run(name):
        config = TrainConfig(norm="bn", l1=1e-4, epochs=2, limit=640, data_dir=data_dir, deterministic=True,
                             out=str(tmp_path / name))
        train(config, verbose=False)
        return read_history(config.out)

    first, second = run("a"), run("b")
    for a, b in zip(first, second):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_interrupt_keeps_finished_epochs(tmp_path, data_dir, monkeypatch):
    from kernorm import rundir

    real_save, calls = rundir.write_epoch, []

    def save_then_interrupt(*args):
        real_save(*args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "write_epoch", save_then_interrupt)
    config = TrainConfig(epochs=5, limit=256, data_dir=data_dir, out=str(tmp_path / "r"))
    metrics = train(config, verbose=False)
    assert metrics["interrupted"] and metrics["epochs_completed"] == 2
    assert len(read_history(config.out)) == 2
    assert read_json(config.out, "metrics.json")["interrupted"] is True
    assert [name for name in os.listdir(config.out) if name.startswith(".")] == [".kernorm"]  # no temp files left


@pytest.mark.slow
def test_one_epoch_of_bn_on_full_mnist_reaches_97_percent(tmp_path, data_dir):
    metrics = train(TrainConfig(norm="bn", epochs=1, data_dir=data_dir, out=str(tmp_path / "full")), verbose=False)
    assert metrics["final_test_acc"] >= 0.97


@pytest.mark.slow
def test_train_into_a_pipe_prints_one_plain_line_per_epoch(tmp_path, data_dir):
    result = run(kernorm_command("train", "--epochs", "2", "--limit", "512", "--data-dir", data_dir,
                                 "--out", tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    for control in ("\x1b", "\r", "\b"):  # no escape codes, no redraws
        assert control not in result.stdout
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in epochs] == ["Epoch 1/2", "Epoch 2/2"]
    assert all(" - test_acc " in line for line in epochs)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_training_loss_is_cross_entropy_against_smoothed_targets(smoothing):
    images = np.random.default_rng(0).uniform(0, 255, (8, 28, 28, 1)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32)
    model = build_model(norm="none", architecture="tiny")
    optimizer = keras.optimizers.SGD(learning_rate=0.0)  # the weights stay those the expected loss is taken at
    optimizer.build(model.trainable_variables)
    train_steps, _ = make_steps(model, optimizer, tf.distribute.get_strategy(), label_smoothing=smoothing)
    loss_sum, _, count = train_steps(iter(tf.data.Dataset.from_tensors((images, labels))), tf.constant(1)).numpy()

    log_probs = tf.nn.log_softmax(model(images)).numpy()
    targets = np.full((8, 10), smoothing / 10) + (1 - smoothing) * np.eye(10)[labels]
    assert count == 8
    np.testing.assert_allclose(loss_sum, -(targets * log_probs).sum(), rtol=1e-5)
