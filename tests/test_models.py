import keras
import numpy as np
import pytest

from kernorm.models import build_model, count_trainable


@pytest.mark.parametrize("norm, params", [(None, 4600), ("none", 4600), ("bn", 4700), ("ln", 4700), ("gn", 4700)])
def test_trainable_parameters(norm, params):
    assert count_trainable(build_model(norm)) == params


def test_layer_output_shapes_follow_the_study():
    """The README's table of the study's network (its outputs are H×W×C), and each conv's parameters."""
    model = build_model("bn")
    x = keras.ops.zeros((1, 28, 28, 1))
    shapes, conv_params = [], []
    for layer in model.layers:
        for inner in getattr(layer, "layers", [layer]):
            x = inner(x)
            if type(inner).__name__ in ("Conv2D", "AveragePooling2D", "Flatten", "Dense"):
                shapes.append(tuple(x.shape[1:]))
            if type(inner).__name__ == "Conv2D":
                conv_params.append(inner.count_params())
    assert shapes == [(26, 26, 10), (24, 24, 10), (22, 22, 10), (11, 11, 10), (9, 9, 10), (7, 7, 10),
                      (3, 3, 10), (90,), (10,)]
    assert conv_params == [90, 900, 900, 900, 900]
    assert model.get_layer("logits").count_params() == 910


def test_model_normalises_raw_pixels_inside():
    model = build_model()
    normalize = model.get_layer("normalize_pixels")
    pixels = np.array([0.0, 255.0, 127.0], "float32").reshape(1, 3, 1, 1)
    np.testing.assert_allclose(normalize(pixels).numpy().ravel(),
                               (pixels.ravel() / 255 - 0.1307) / 0.3081, rtol=1e-5)  # MNIST's mean and std
    assert normalize.count_params() == 0
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
