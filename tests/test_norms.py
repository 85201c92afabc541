"""The norm layers' arithmetic against NumPy, and their hand-written gradients against Keras's own layers.

The arithmetic and gradient tests run on both training paths: kernorm's C++
ops and the XLA fallback.
"""

import os
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from kernorm import native
from kernorm.errors import KernormError
from kernorm.norms import BatchNorm, GroupNorm, LayerNorm, _normalize_xla, create_norm_layer, normalize_groups


def feature_maps(seed=0, shape=(4, 5, 5, 6)):
    rng = np.random.default_rng(seed)
    return (np.maximum(rng.normal(size=shape), 0) * 3 + 1).astype("float32")  # post-ReLU-like, mean far from 0


def with_affine(layer, x, seed=1):
    """Builds `layer` on `x`, sets random γ/β, returns (γ, β)."""
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    gamma, beta = rng.normal(size=x.shape[-1]), rng.normal(size=x.shape[-1])
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return gamma, beta


def numpy_group_norm(x, groups):
    n, h, w, c = x.shape
    grouped = x.reshape(n, h, w, groups, c // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    return ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)


@pytest.mark.usefixtures("norm_path")
def test_batch_norm_training_and_inference_match_numpy():
    x = feature_maps()
    layer = create_norm_layer("bn", 6)
    gamma, beta = with_affine(layer, x)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    expected = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(layer(x, training=True), expected, atol=1e-5)
    # moving statistics after one step: 0.9 · old + 0.1 · batch (PyTorch's momentum 0.1)
    np.testing.assert_allclose(layer.moving_mean, 0.1 * mean, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, 0.9 + 0.1 * var, atol=1e-5)
    moving = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5) * gamma + beta
    np.testing.assert_allclose(layer(x, training=False), moving, atol=1e-5)


@pytest.mark.usefixtures("norm_path")
@pytest.mark.parametrize("training", [True, False])
def test_layer_norm_uses_all_of_hwc_per_sample(training):
    x = feature_maps()
    layer = create_norm_layer("ln", 6)
    gamma, beta = with_affine(layer, x)
    expected = numpy_group_norm(x, 1)
    np.testing.assert_allclose(layer(x, training=training), expected * gamma + beta, atol=1e-5)
    # Keras's LayerNormalization(axis=-1) normalizes per pixel: a different operation.
    per_pixel = layers.LayerNormalization(axis=-1, epsilon=1e-5)(x)
    assert np.abs(np.asarray(per_pixel) - expected).max() > 0.1


@pytest.mark.usefixtures("norm_path")
@pytest.mark.parametrize("training", [True, False])
def test_group_norm_with_two_groups(training):
    x = feature_maps()
    layer = create_norm_layer("gn", 6, groups=2)
    gamma, beta = with_affine(layer, x)
    np.testing.assert_allclose(layer(x, training=training), numpy_group_norm(x, 2) * gamma + beta, atol=1e-5)


@pytest.mark.usefixtures("norm_path")
@pytest.mark.parametrize("ours, keras_layer", [
    (lambda: BatchNorm(momentum=0.9, epsilon=1e-5), lambda: layers.BatchNormalization(momentum=0.9, epsilon=1e-5)),
    (lambda: GroupNorm(groups=2, epsilon=1e-5), lambda: layers.GroupNormalization(groups=2, epsilon=1e-5)),
    (lambda: LayerNorm(), lambda: layers.GroupNormalization(groups=1, epsilon=1e-5)),
], ids=["bn", "gn", "ln"])
def test_training_gradients_equal_keras_layers(ours, keras_layer):
    x = tf.constant(feature_maps(shape=(8, 6, 6, 10)))
    weights = tf.constant(np.random.default_rng(2).normal(size=x.shape).astype("float32"))
    grads = []
    for layer in (ours(), keras_layer()):
        with_affine(layer, x.numpy())
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * weights)
        grads.append(tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]))
    for mine, theirs in zip(*grads):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=2e-5)  # float32 sums in another order


def test_layer_norm_round_trips_through_its_config():
    layer = LayerNorm(name="ln_a", input_activation="relu")
    clone = LayerNorm.from_config(layer.get_config())
    assert clone.groups == 1 and clone.epsilon == 1e-5 and clone.name == "ln_a"
    assert clone.input_activation is keras.activations.relu


@pytest.mark.skipif(os.environ.get(native.SWITCH) != "1", reason="KERNORM_NATIVE=1 (CI sets it) asks for the C++ ops")
def test_kernorm_native_1_trains_with_the_cpp_ops():
    assert native.ops() is not None


@pytest.mark.parametrize("switch, gpu, loads", [("", False, True), ("", True, False), ("0", False, False),
                                                 ("1", True, True)])
def test_the_switch_chooses_when_the_cpp_ops_are_used(monkeypatch, switch, gpu, loads):
    monkeypatch.setenv(native.SWITCH, switch)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if gpu else [])
    monkeypatch.setattr(native, "load", lambda: "library")
    assert native.ops.__wrapped__() == ("library" if loads else None)


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(native.SWITCH, raising=False)
    monkeypatch.setattr(native, "load", native.load.__wrapped__)  # not the library this process already loaded
    with pytest.warns(UserWarning, match="did not build .*XLA path"):
        assert native.ops.__wrapped__() is None
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-written left in the cache
    monkeypatch.setenv(native.SWITCH, "1")
    with pytest.raises(KernormError, match="did not build .*unset KERNORM_NATIVE"):
        native.ops.__wrapped__()
    monkeypatch.setenv(native.SWITCH, "yes")
    with pytest.raises(KernormError, match="KERNORM_NATIVE=yes: set it to 1"):
        native.ops.__wrapped__()


@pytest.mark.parametrize("macros, flags", [("__AVX2__ __FMA__", ["-mavx2", "-mfma"]), ("__AVX2__", []), ("", [])],
                         ids=["avx2-fma", "avx2-only", "neither"])
def test_vector_flags_follow_the_cpu(tmp_path, macros, flags):
    compiler = tmp_path / "c++"  # a compiler whose -march=native defines just these macros
    compiler.write_text("#!/bin/sh\n" + "".join(f"echo '#define {m} 1'\n" for m in macros.split()))
    compiler.chmod(0o755)
    assert native._vector_flags(str(compiler)) == flags
    assert native._vector_flags(str(tmp_path / "none")) == []


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="no C++ compiler on this machine")
def test_the_ops_build_without_compiler_warnings(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        library = native._build()
    assert os.path.isfile(library)


@pytest.mark.parametrize("shape, groups", [((1, 32 * 26 * 26, 10), 10), ((8, 26 * 26, 10), 2), ((5, 9, 12), 1)],
                         ids=["bn-several-units", "gn", "ln-less-than-a-strip"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
@pytest.mark.parametrize("norm_path", ["native"], indirect=True)
def test_native_ops_equal_the_xla_path(shape, groups, relu, norm_path):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    gamma, beta = (tf.constant(rng.normal(size=shape[-1]).astype("float32")) for _ in range(2))
    weights = tf.constant(rng.normal(size=shape).astype("float32"))
    results = []
    paths = (lambda: normalize_groups(x, gamma, beta, groups, 1e-5, relu=relu),
             lambda: _normalize_xla(tf.nn.relu(x) if relu else x, gamma, beta, groups, 1e-5))
    for path in paths:
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, var = path()
            loss = tf.reduce_sum(y * weights)
        results.append([y, mean, var, *tape.gradient(loss, [x, gamma, beta])])
    for ours, xla in zip(*results):
        np.testing.assert_allclose(ours, xla, rtol=1e-4, atol=1e-4)


