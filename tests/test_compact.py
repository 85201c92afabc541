"""The compact preset: its network, its learning-rate schedule and its augmentation."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from helpers import read_json

from kernorm.cli import main
from kernorm.config import PRESETS, TrainConfig
from kernorm.data import augment, make_dataset
from kernorm.errors import KernormError
from kernorm.models import build_model, count_trainable, load_model
from kernorm.steps import learning_rate

NORM_KINDS = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm"}


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory, data_dir):
    """`kernorm train --preset compact` for 2 epochs on 640 images: (run folder, CLI output)."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "compact")
    result = CliRunner().invoke(main, ["train", "--preset", "compact", "--norm", "gn", "--epochs", "2",
                                       "--limit", "640", "--data-dir", data_dir, "--out", run_dir])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_compact_network_keeps_the_parameter_budget(norm):
    model = build_model(norm, architecture="compact")
    assert count_trainable(model) == 4490 <= count_trainable(build_model(norm))  # the study's network: 4,700
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    # Built from the factories: a stem conv, then two separable conv blocks with a transition between them.
    assert [layer.name for layer in model.layers] == ["normalize_pixels", "stem", "block1", "transition1",
                                                      "block2", "pool", "logits"]
    assert [type(inner).__name__ for inner in model.get_layer("block2").layers] == [
        "SeparableConv2D", NORM_KINDS[norm]] * 3


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_small_network_is_the_compact_plan_within_2000_parameters(norm):
    model = build_model(norm, architecture="small")
    assert count_trainable(model) == 1936 <= 2000
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    # The compact plan, narrower: every layer of it, in the same order.
    compact = build_model(norm, architecture="compact")
    assert [layer.name for layer in model.layers] == [layer.name for layer in compact.layers]


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_tiny_network_keeps_block1_s_map_dilates_block2_and_averages_a_channel_a_class(norm):
    model = build_model(norm, architecture="tiny")
    assert count_trainable(model) == 996 <= 1000
    assert [layer.name for layer in model.layers] == ["normalize_pixels", "stem", "block1", "block2", "pool",
                                                      "logits"]
    assert [layer.output.shape[1:] for layer in model.layers[1:]] == [
        (26, 26, 4), (22, 22, 8), (10, 10, 10), (10,), (10,)]  # no pool: block 2 loses 4 pixels a conv
    block2 = model.get_layer("block2").layers
    assert [type(inner).__name__ for inner in block2] == ["SeparableConv2D", NORM_KINDS[norm]] * 3
    assert {inner.dilation_rate for inner in block2[::2]} == {(2, 2)}
    # No dense layer: each logit is the average of its channel after the last norm, computed in float32.
    assert model.get_layer("logits").weights == [] and model.get_layer("logits").dtype_policy.name == "float32"
    images = np.random.default_rng(0).uniform(0, 255, (4, 28, 28, 1)).astype(np.float32)
    features = keras.Model(model.inputs, model.get_layer("block2").output)(images)
    np.testing.assert_allclose(model(images), np.mean(features, axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset, budget", [("small", 2000), ("tiny", 1000)])
def test_small_and_tiny_presets_train_their_network_with_the_compact_recipe_for_30_epochs(preset, budget):
    config, compact = PRESETS[preset], PRESETS["compact"]
    assert (config.architecture, config.epochs) == (preset, 30)
    assert (config.schedule, config.lr, config.augment, config.batch_size) == (
        compact.schedule, compact.lr, compact.augment, compact.batch_size)
    assert count_trainable(build_model(**config.network())) <= budget


def test_onecycle_schedule_warms_up_peaks_and_ends_at_zero():
    config = TrainConfig(epochs=15, lr=0.1, schedule="onecycle")
    schedule = learning_rate(config, steps_per_epoch=100)
    lr = np.array([float(schedule(step)) for step in range(0, 1501)])
    peak = int(lr.argmax())
    assert peak == 300  # 20 % of 1,500 steps
    assert lr[0] == pytest.approx(0.1 / 25) and lr[peak] == pytest.approx(0.1)  # the README's lr/25 to lr
    assert np.all(np.diff(lr[:peak + 1]) > 0) and np.all(np.diff(lr[peak:]) <= 0)
    assert lr[900] == pytest.approx(0.05, rel=1e-3)  # half-way down the cosine
    assert lr[-1] == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(TrainConfig(lr=0.01), steps_per_epoch=100) == 0.01


def test_augmentation_is_seeded_and_keeps_labels(mnist):
    (x_train, y_train), _ = mnist
    x, y = x_train[:256], y_train[:256]

    def first_batch(seed, augment_images):
        images, labels = next(iter(make_dataset(x, y, 128, seed=seed, augment_images=augment_images)))
        return images.numpy(), labels.numpy()

    plain, plain_labels = first_batch(3, False)
    moved, moved_labels = first_batch(3, True)
    again, _ = first_batch(3, True)
    other, _ = first_batch(4, True)
    np.testing.assert_array_equal(moved, again)
    np.testing.assert_array_equal(moved_labels, plain_labels)
    assert moved.shape == plain.shape and moved.dtype == plain.dtype
    changed = np.abs(moved - plain).reshape(len(moved), -1).max(axis=1) > 0
    assert changed.mean() > 0.85  # a draw of under half a pixel and a tiny angle leaves an image as it was
    # Small moves: the ink stays roughly the same and stays within the pixel range.
    assert moved.min() >= 0 and moved.max() <= 255
    np.testing.assert_allclose(moved.sum(axis=(1, 2, 3)), plain.sum(axis=(1, 2, 3)), rtol=0.25)
    # Nearest sampling copies pixels: no image gains a grey level it did not hold (no blur).
    for m, p in zip(moved, plain):
        assert set(np.unique(m)) <= set(np.unique(p)) | {0.0}
    assert not np.array_equal(first_batch(4, False)[0], other)


def test_zoom_scales_each_image_and_leaves_the_rotations_and_shifts_as_they_were():
    squares = np.zeros((64, 28, 28, 1), "float32")
    squares[:, 10:18, 10:18] = 255  # 64 pixels of ink each
    seed = tf.constant([5, 6], tf.int64)
    plain = augment(squares, seed).numpy()
    np.testing.assert_array_equal(augment(squares, seed, zoom=0.0).numpy(), plain)  # old runs draw as before
    ink = (augment(squares, seed, zoom=0.3).numpy() > 0).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal((augment(squares, seed, zoom=0.3).numpy() > 0).sum(axis=(1, 2, 3)), ink)
    assert np.all(np.abs((plain > 0).sum(axis=(1, 2, 3)) - 64) <= 2)  # rotations and shifts keep the area
    # Scaled by 0.7 to 1.3: the area by 0.49 to 1.69, some images grown, some shrunk.
    assert ink.min() >= 0.49 * 64 * 0.8 and ink.max() <= 1.69 * 64 * 1.2
    assert (ink > 1.2 * 64).any() and (ink < 0.8 * 64).any()


def test_zoom_needs_augmentation_and_a_fraction_below_one(tmp_path, data_dir):
    TrainConfig(augment=True, zoom=0.1).check()
    with pytest.raises(KernormError, match="zoom 1: choose a fraction"):
        TrainConfig(augment=True, zoom=1.0).check()
    result = CliRunner().invoke(main, ["train", "--zoom", "0.1", "--limit", "64", "--data-dir", data_dir,
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: zoom 0.1 scales the augmented images: add --augment or leave "
                                     "--zoom out")
    assert not (tmp_path / "r").exists()


def test_no_augment_also_turns_off_the_starting_recipe_s_zoom(tmp_path, data_dir):
    TrainConfig(architecture="tiny", augment=True, zoom=0.1).save(tmp_path / "zoomed.json")
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "zoomed.json"), "--no-augment",
                                       "--epochs", "1", "--limit", "128", "--data-dir", data_dir,
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    config = TrainConfig.load(tmp_path / "r" / "config.json")
    assert (config.augment, config.zoom) == (False, 0.0)


@pytest.mark.slow
def test_compact_preset_writes_its_recipe_and_command_line_overrides_it(compact_run):
    run_dir, output = compact_run
    config = TrainConfig.load(os.path.join(run_dir, "config.json"))
    # The recipe the README gives for --preset compact.
    assert (config.architecture, config.schedule, config.augment, config.lr, config.l2) == (
        "compact", "onecycle", True, 0.1, 2.5e-4)
    assert (config.norm, config.epochs, config.limit) == ("gn", 2, 640)
    assert "Trainable parameters: 4,490" in output
    assert read_json(run_dir, "metrics.json")["params"] == 4490


@pytest.mark.slow
def test_saved_compact_model_holds_no_augmentation_and_evaluates_on_plain_images(compact_run, mnist):
    run_dir, _ = compact_run
    model = load_model(os.path.join(run_dir, "model.keras"))
    kinds = {type(inner).__name__ for layer in model.layers for inner in getattr(layer, "layers", [layer])}
    assert kinds == {"Rescaling", "Conv2D", "SeparableConv2D", "GroupNorm", "AveragePooling2D",
                     "GlobalAveragePooling2D", "Dense"}
    (_, _), (x_test, y_test) = mnist
    images = x_test[..., None].astype("float32")
    first = model.predict(images, verbose=0)
    np.testing.assert_array_equal(first, model.predict(images, verbose=0))
    # The history's test accuracy is the saved model's on the untouched test images.
    final = read_json(run_dir, "metrics.json")["final_test_acc"]
    assert (first.argmax(-1) == y_test).mean() == pytest.approx(final, abs=1e-4)


@pytest.mark.slow
def test_exported_compact_model_has_no_image_transform(compact_run):
    from ai_edge_litert.interpreter import Interpreter

    from kernorm.export import convert

    run_dir, _ = compact_run
    model = load_model(os.path.join(run_dir, "model.keras"))
    interpreter = Interpreter(model_content=convert(model, "float32"))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert "CONV_2D" in ops and not any("TRANSFORM" in op or "FLEX" in op.upper() for op in ops)
    interpreter.allocate_tensors()
    pixels = keras.random.uniform((1, 28, 28, 1), 0, 255, seed=0).numpy()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
                               model(pixels).numpy(), atol=1e-4)


def test_unknown_architecture_is_one_clear_line(tmp_path, data_dir):
    result = CliRunner().invoke(main, ["train", "--architecture", "huge", "--limit", "64", "--data-dir", data_dir,
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert ("Invalid value for '--architecture': 'huge' is not one of 'study', 'compact', 'small', 'tiny'."
            in result.output)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "huge"}))
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--limit", "64", "--data-dir", data_dir,
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown architecture 'huge'; choose one of study, compact, small, tiny"
    assert not (tmp_path / "r").exists()


def test_preset_and_config_together_are_refused(tmp_path):
    config = tmp_path / "config.json"
    TrainConfig().save(str(config))
    result = CliRunner().invoke(main, ["train", "--preset", "compact", "--config", str(config)])
    assert result.exit_code == 2 and "--config and --preset" in result.output
