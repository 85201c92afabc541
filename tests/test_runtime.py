"""On-device inference: the exported models run by kernorm.runtime (LiteRT alone)."""

import os
import re

import numpy as np
import pytest

from kernorm.errors import KernormError
from kernorm.runtime import dequantize, load_tflite, quantize, softmax


def model_path(exported, quantize):
    return os.path.join(exported["export_dir"], f"model_{quantize}.tflite")


@pytest.fixture(scope="module")
def keras_pred(exported, mnist):
    from kernorm.models import load_model

    (_, _), (x_test, _) = mnist
    model = load_model(os.path.join(exported["run_dir"], "model.keras"))
    return model.predict(x_test[..., None].astype("float32"), batch_size=1000, verbose=0).argmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("quantize, input_dtype, output_dtype", [
    ("float32", np.float32, np.float32), ("float16", np.float32, np.float32),
    ("dynamic", np.float32, np.float32), ("int8", np.uint8, np.int8),
])
def test_shapes_dtypes_and_quantization_parameters(exported, quantize, input_dtype, output_dtype):
    model = load_tflite(model_path(exported, quantize))
    inp, out = model.input_details, model.output_details
    assert model.image_shape == (28, 28, 1) and model.num_classes == 10
    assert list(inp["shape_signature"]) == [-1, 28, 28, 1] and list(out["shape"]) == [1, 10]
    assert inp["dtype"] == input_dtype and out["dtype"] == output_dtype
    if quantize == "int8":
        assert inp["quantization"] == (1.0, 0)
        assert out["quantization"][0] > 0
    else:
        assert inp["quantization"] == out["quantization"] == (0.0, 0)
    probabilities = model.predict(np.zeros((3, 28, 28), np.uint8))
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quantize, least_agreement", [("float32", 0.999), ("int8", 0.99)])
def test_tflite_agrees_with_keras(exported, mnist, keras_pred, quantize, least_agreement):
    (_, _), (x_test, y_test) = mnist
    pred = load_tflite(model_path(exported, quantize)).predict(x_test, batch_size=500).argmax(-1)
    assert len(pred) == 10000
    assert (pred == keras_pred).mean() >= least_agreement
    assert abs((pred == y_test).mean() - (keras_pred == y_test).mean()) <= 0.003


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["float32", "int8"])
def test_batch_1_and_batch_64_predict_the_same(exported, mnist, quantize):
    (_, _), (x_test, _) = mnist
    model = load_tflite(model_path(exported, quantize))
    images = x_test[:192]
    one = np.concatenate([model.predict(images[i:i + 1]) for i in range(len(images))])
    many = model.predict(images, batch_size=64)
    np.testing.assert_array_equal(one.argmax(-1), many.argmax(-1))
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_array_equal(model.predict(images[:5], batch_size=3), many[:5])  # ragged last batch


@pytest.mark.slow
def test_int8_input_is_quantized_from_the_models_own_parameters(exported, mnist):
    (_, _), (x_test, _) = mnist
    model = load_tflite(model_path(exported, "int8"))
    images = x_test[:32]
    as_uint8 = model.logits(images)
    np.testing.assert_array_equal(model.logits(images.astype(np.float64)), as_uint8)
    nudged = np.clip(images + np.float32(0.3), 0, 255)  # rounds back to the same pixels
    np.testing.assert_array_equal(model.logits(nudged), as_uint8)
    scale, zero_point = model.output_details["quantization"]
    steps = as_uint8 / scale + zero_point  # dequantized logits sit on the output's int8 grid
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert steps.min() >= -128 and steps.max() <= 127


def test_quantize_and_dequantize_follow_scale_and_zero_point():
    details = {"dtype": np.int8, "quantization": (0.5, -3)}
    np.testing.assert_array_equal(quantize(np.array([0.0, 1.0, 1.2, 100.0, -1000.0]), details),
                                  np.array([-3, -1, -1, 127, -128], np.int8))
    np.testing.assert_allclose(dequantize(np.array([-3, 7], np.int8), details), [0.0, 5.0])
    floats = {"dtype": np.float32, "quantization": (0.0, 0)}
    np.testing.assert_array_equal(quantize(np.array([7, 255], np.uint8), floats), np.array([7.0, 255.0], np.float32))
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]])), [[0.25, 0.75], [0.5, 0.5]])


@pytest.mark.slow
def test_bad_model_files_raise_one_clear_error(exported, tmp_path):
    with open(model_path(exported, "int8"), "rb") as f:
        content = f.read()
    cases = {
        "truncated.tflite": (content[:len(content) // 2], "corrupt or truncated TFLite model"),
        "header_only.tflite": (content[:64], "corrupt or truncated TFLite model"),
        "garbled.tflite": (content[:8] + bytes(range(256)) * 8, "corrupt or truncated TFLite model"),
        "text.tflite": (b"this is not a model\n", "not a TFLite model (no TFL3 identifier)"),
        "empty.tflite": (b"", "not a TFLite model"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KernormError, match=re.escape(message)) as error:
            load_tflite(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(KernormError, match="cannot read"):
        load_tflite(tmp_path / "missing.tflite")


@pytest.mark.slow
@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 28, 28, 3)), r"shape \(2, 28, 28, 3\); the model takes \(N, 28, 28, 1\) or \(N, 28, 28\)"),
    (np.zeros((28, 28)), r"shape \(28, 28\)"),
    (np.zeros((4, 32, 32)), r"shape \(4, 32, 32\)"),
    (np.full((1, 28, 28), "7"), "numeric array of raw pixels, got dtype <U1"),
    (np.full((1, 28, 28), 256.0), "raw pixels in 0–255"),
    (np.full((1, 28, 28), -1), "raw pixels in 0–255"),
    (np.full((1, 28, 28), np.nan), "raw pixels in 0–255"),
])
def test_wrong_inputs_raise_one_clear_error(exported, images, message):
    for kind in ("float32", "int8"):
        with pytest.raises(KernormError, match=message):
            load_tflite(model_path(exported, kind)).predict(images)

