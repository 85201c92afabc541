import hashlib
import os

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_json

import kernorm.export
from kernorm.cli import main
from kernorm.config import ExportConfig
from kernorm.errors import KernormError
from kernorm.models import build_model
from kernorm.runtime import TFLiteModel

# What `--quantize all` writes: the four kinds the README documents.
ALL_QUANTIZATIONS = ["float32", "float16", "dynamic", "int8"]


@pytest.mark.slow
def test_export_writes_every_checked_model_and_its_report(exported, mnist):
    export_dir = exported["export_dir"]
    assert sorted(os.listdir(export_dir)) == sorted(
        [".kernorm", "config.json", "export.json"] + [f"model_{q}.tflite" for q in ALL_QUANTIZATIONS])
    report = read_json(export_dir, "export.json")
    (_, _), (x_test, y_test) = mnist
    assert report["passed"] is True and report["test_images"] == len(y_test) == 10000
    assert report["calibration_images"] == 500 and report["max_drop"] == 0.3
    assert 0.9 < report["keras_acc"] <= 1
    for quantize, figures in report["models"].items():
        path = os.path.join(export_dir, figures["file"])
        with open(path, "rb") as f:
            content = f.read()
        assert figures["size_bytes"] == len(content) and figures["sha256"] == hashlib.sha256(content).hexdigest()
        assert figures["passed"] and figures["drop_points"] <= 0.3
        measured = TFLiteModel(content).predict(x_test[..., None]).argmax(-1)  # the written file, run again
        assert figures["tflite_acc"] == (measured == y_test).mean()
        assert 0 < figures["latency_us_p50"] <= figures["latency_us_p99"] and figures["throughput_ips"] > 0
        assert f"{quantize:8s} acc" in exported["output"]
    assert "all checks passed" in exported["output"]
    config = ExportConfig(**read_json(export_dir, "config.json"))
    assert (config.model, config.quantize, config.max_drop, config.calibration) == (
        exported["run_dir"], "all", 0.3, 500)


@pytest.mark.slow
def test_export_shows_each_model_s_steps_plainly_into_a_pipe(exported):
    lines = exported["output"].splitlines()
    assert "\x1b" not in exported["output"] and "\r" not in exported["output"]
    for quantize in ALL_QUANTIZATIONS:
        start = lines.index(f"the {quantize} model: converting")
        assert lines[start + 1] == (f"the {quantize} model: LiteRT on 10,000 test images, then 1,000 timed "
                                    f"one by one")
        assert lines[start + 2].startswith("11000/11000 - ") and lines[start + 2].endswith("/image")
        assert lines[start + 3].startswith(f"{quantize:8s} acc")


@pytest.mark.slow
def test_int8_model_has_uint8_raw_pixel_input_and_is_smaller(exported):
    models = read_json(exported["export_dir"], "export.json")["models"]
    assert models["float32"]["input"] == {"dtype": "float32", "quantization": [0.0, 0]}
    assert models["float32"]["output"]["dtype"] == "float32"
    # Calibration saw pixels 0 and 255, so the uint8 input holds raw pixels unchanged.
    assert models["int8"]["input"] == {"dtype": "uint8", "quantization": [1.0, 0]}
    scale, zero_point = models["int8"]["output"]["quantization"]
    assert models["int8"]["output"]["dtype"] == "int8" and scale > 0 and -128 <= zero_point <= 127
    assert models["int8"]["size_bytes"] < models["float32"]["size_bytes"]
    assert models["float16"]["size_bytes"] < models["float32"]["size_bytes"]


@pytest.mark.slow
def test_calibration_draws_from_the_training_set(exported, mnist):
    (x_train, _), (x_test, _) = mnist
    [(source, count, images)] = exported["calibration_calls"]  # one draw, for int8 only
    assert count == 500 and images.shape == (500, 28, 28, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(source, x_train)
    train_rows = {image.tobytes(): i for i, image in enumerate(x_train)}
    test_rows = {image.tobytes() for image in x_test}
    keys = [image[..., 0].astype(np.uint8).tobytes() for image in images]
    assert all(key in train_rows for key in keys) and len(set(keys)) == 500
    assert not any(key in test_rows for key in keys)


@pytest.mark.parametrize("lost, passed", [(30, True), (31, False)])
def test_a_drop_beyond_max_drop_is_refused_and_one_within_it_kept(lost, passed, tmp_path, data_dir, monkeypatch):
    """A converted model that misses `lost` of the 10,000 test images that Keras gets right: a drop of 0.30
    points passes --max-drop 0.3 exactly, 0.31 is refused with no model file."""
    real_check = kernorm.export.check

    def check_losing(flatbuffer, quantize, x_test, y_test, keras_pred, verbose=False):
        figures = real_check(flatbuffer, quantize, x_test, y_test, keras_pred, verbose)
        pred = keras_pred.copy()
        missed = np.flatnonzero(pred == y_test)[:lost]
        pred[missed] = (y_test[missed] + 1) % 10
        return {**figures, "tflite_acc": float((pred == y_test).mean())}

    monkeypatch.setattr(kernorm.export, "check", check_losing)
    monkeypatch.setattr(kernorm.export, "LATENCY_IMAGES", 10)
    build_model("ln").save(tmp_path / "model.keras")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model.keras"), "--quantize", "float32",
                                       "--max-drop", "0.3", "--out", str(out), "--data-dir", data_dir])
    figures = read_json(out, "export.json")["models"]["float32"]
    assert figures["drop_points"] == lost / 100 and figures["passed"] is passed
    assert result.exit_code == (0 if passed else 1), result.output
    assert (out / "model_float32.tflite").exists() is passed
    if not passed:
        assert "Error: accuracy check failed: float32 dropped 0.31 points" in result.output


def test_calibration_sampler_rejects_impossible_counts(mnist):
    (x_train, _), _ = mnist
    with pytest.raises(KernormError, match="choose between 1 and the 60000"):
        kernorm.export.calibration_images(x_train, 60001)


@pytest.mark.slow
def test_failed_check_exits_nonzero_and_writes_no_model(exported, tmp_path, data_dir, monkeypatch):
    """A conversion that really loses accuracy (it converts an untrained network) must be caught."""
    real_convert = kernorm.export.convert
    monkeypatch.setattr(kernorm.export, "convert",
                        lambda model, quantize, calibration=None: real_convert(build_model("ln"), quantize))
    out = tmp_path / "bad"
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--quantize", "float32", "--out", str(out),
                                       "--data-dir", data_dir])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: accuracy check failed: float32 dropped ") and "--max-drop 0.3" in last
    assert "Traceback" not in result.output
    assert sorted(os.listdir(out)) == [".kernorm", "config.json", "export.json"]
    report = read_json(out, "export.json")
    assert report["passed"] is False
    assert report["models"]["float32"]["passed"] is False and report["models"]["float32"]["file"] is None
    assert report["models"]["float32"]["drop_points"] > 10


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--quantize", "int4"], "Invalid value for '--quantize'"),
    (["--max-drop", "-1"], "Invalid value for '--max-drop'"),
    (["--calibration", "0"], "Invalid value for '--calibration'"),
    (["--calibration", "70000"], "--calibration 70000: choose between 1 and the 60000 training images"),
])
def test_bad_export_options_give_one_clear_line(exported, tmp_path, data_dir, args, message):
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--out", str(out), "--data-dir", data_dir] + args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
def test_export_of_a_missing_model_or_into_an_existing_folder(exported, tmp_path, data_dir):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nowhere"), "--data-dir", data_dir])
    assert result.exit_code == 1 and "nowhere not found; pass a run folder or a .keras file" in result.output
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--out", exported["export_dir"],
                                       "--data-dir", data_dir])
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output


@pytest.mark.parametrize("norm", ["ln", "gn", "bn"])
def test_int8_models_are_integer_throughout(norm, mnist, tmp_path):
    """No float islands: the only QUANTIZE is the uint8 input's, and nothing is dequantized."""
    from ai_edge_litert.interpreter import Interpreter

    from kernorm.runtime import graph_stats

    (x_train, _), _ = mnist
    flatbuffer = kernorm.export.convert(build_model(norm), "int8", kernorm.export.calibration_images(x_train, 20))
    (tmp_path / "model.tflite").write_bytes(flatbuffer)
    ops, pieces = graph_stats(tmp_path / "model.tflite")
    assert ops["QUANTIZE"] == 1 and ops["CONV_2D"] >= 5 and "DEQUANTIZE" not in ops  # GN mixes groups by conv too
    assert pieces >= 1  # XNNPACK takes the graph, in one piece or more
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    float_tensors = [t["name"] for t in interpreter.get_tensor_details()
                     if t["dtype"] == np.float32 and t["name"] and "shape" not in t["name"].lower()]
    assert not float_tensors


def test_a_model_saved_with_keras_flatten_exports_one_reshape_and_the_same_logits(tmp_path):
    """A study network saved before kernorm had its own flatten: the export swaps in kernorm's, whose
    constant shape needs no SHAPE, STRIDED_SLICE or PACK op, and runs at any batch size as before."""
    import keras

    from kernorm.models import load_model
    from kernorm.runtime import graph_ops

    model = build_model("ln")
    old = keras.Sequential([keras.Input((28, 28, 1))] + [
        keras.layers.Flatten(name=layer.name) if layer.name == "flatten" else layer for layer in model.layers])
    old.save(tmp_path / "old.keras")
    loaded = load_model(str(tmp_path / "old.keras"))
    assert type(loaded.get_layer("flatten")) is keras.layers.Flatten
    flatbuffer = kernorm.export.convert(loaded, "float32")
    names = [op["name"] for op in graph_ops(flatbuffer)]
    assert names.count("RESHAPE") == 1 and not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(names)
    images = np.random.default_rng(0).uniform(0, 255, (3, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(TFLiteModel(flatbuffer, "old").logits(images),
                               loaded.predict(images[..., None], verbose=0), rtol=1e-4, atol=1e-4)
