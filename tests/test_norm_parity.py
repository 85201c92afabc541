"""kernorm's BatchNorm, GroupNorm and LayerNorm against Keras's own layers, case by case.

Each case builds kernorm's layer and Keras's with the same arguments and
weights, runs both on one input, and compares outputs, gradients (input and
weights), moving statistics, regularization losses and the weights after one
SGD step (which applies the constraints). It also records whether kernorm's
own computation ran (`normalize_groups` in training, `normalize_for_inference`
in GroupNorm's inference): the cases kernorm's networks hit must take it, so a
silent fall back to Keras's computation fails here.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import kernorm.norms
from kernorm.config import ARCHITECTURES
from kernorm.models import build_model, dtype_policy
from kernorm.norms import BatchNorm, GroupNorm, LayerNorm

MAP = (4, 5, 5, 6)  # (batch, height, width, channels), as the networks' feature maps
REGULARIZED = {"gamma_regularizer": "l2", "beta_regularizer": "l1", "gamma_constraint": "non_neg",
               "beta_constraint": "max_norm"}
TOLERANCE = {"float32": 2e-5, "mixed_float16": 2e-2, "mixed_bfloat16": 8e-2}
# kernorm's layer and Keras's, each taking the remaining arguments: BN, and GN with two groups.
PAIRS = {"bn": (BatchNorm, layers.BatchNormalization),
         "gn": (functools.partial(GroupNorm, groups=2), functools.partial(layers.GroupNormalization, groups=2))}


@pytest.fixture
def fast_calls(monkeypatch, norm_path):
    """Counts calls of kernorm's own computations by name, on each training path (`norm_path`)."""
    calls = {"normalize_groups": 0, "normalize_for_inference": 0}
    for name in calls:
        original = getattr(kernorm.norms, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernorm.norms, name, spy)
    return calls


def inputs(shape, dtype="float32", seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    return tf.constant((rng.normal(size=shape) * 2 + offset).astype(dtype))


def compare(ours, theirs, x, training, mask=None, frozen=False, tolerance=TOLERANCE["float32"]):
    """Runs both layers the same way and asserts every observable result matches."""
    rng = np.random.default_rng(1)
    for layer in (ours, theirs):
        layer.build(x.shape)
    theirs.set_weights([np.abs(rng.normal(size=w.shape)) + 0.5 if "variance" in w.path or "stddev" in w.path
                        else rng.normal(size=w.shape) for w in theirs.weights])
    ours.set_weights(theirs.get_weights())
    weights = tf.constant(rng.normal(size=x.shape).astype("float32"))
    results = []
    for layer in (ours, theirs):
        layer.trainable = not frozen
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, **({} if mask is None else {"mask": mask}))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
        grads = tape.gradient(loss, [x, *layer.trainable_weights])
        keras.optimizers.SGD(0.1).apply(grads[1:], layer.trainable_weights)
        results.append({"dtype": y.dtype, "output": y, "gradients": grads, "losses": layer.losses,
                        "weights after": [w.numpy() for w in layer.weights]})
    assert results[0]["dtype"] == results[1]["dtype"]
    for key in ("output", "gradients", "losses", "weights after"):
        mine, keras_ = results[0][key], results[1][key]
        if not isinstance(mine, list):
            mine, keras_ = [mine], [keras_]
        assert len(mine) == len(keras_), key
        for a, b in zip(mine, keras_):
            a, b = np.asarray(tf.cast(a, tf.float32)), np.asarray(tf.cast(b, tf.float32))
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, err_msg=key)


BATCH_CASES = {  # id: (arguments, input shape)
    "rank2": ({}, (16, 6)),
    "rank3": ({}, (4, 7, 6)),
    "rank4": ({}, MAP),
    "rank5": ({}, (2, 3, 4, 5, 6)),
    "channels-first": ({"axis": 1}, (4, 6, 5, 5)),
    "channels-last-positive-axis": ({"axis": 3}, MAP),
    "no-scale": ({"scale": False}, MAP),
    "no-center": ({"center": False}, MAP),
    "neither": ({"scale": False, "center": False}, MAP),
    "renorm": ({"renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}}, MAP),
    "synchronized": ({"synchronized": True}, MAP),
    "initializers": ({"moving_mean_initializer": "ones", "moving_variance_initializer": "zeros"}, MAP),
    "regularized": (REGULARIZED, MAP),
    "pytorch-defaults": ({"momentum": 0.9, "epsilon": 1e-5}, MAP),
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("case", BATCH_CASES)
def test_batch_norm_equals_keras(case, training, fast_calls):
    arguments, shape = BATCH_CASES[case]
    if case == "renorm" and not hasattr(layers.BatchNormalization(), "renorm"):
        pytest.skip("Keras's BatchNormalization has renorm from Keras 3.14 on")
    compare(BatchNorm(**arguments), layers.BatchNormalization(**arguments), inputs(shape), training)
    fast = training and case not in ("channels-first", "renorm", "synchronized")
    assert fast_calls["normalize_groups"] == fast


def test_frozen_batch_norm_runs_in_inference_mode_as_keras(fast_calls):
    compare(BatchNorm(), layers.BatchNormalization(), inputs(MAP), training=True, frozen=True)
    assert fast_calls["normalize_groups"] == 0


def test_frozen_group_norm_equals_keras(fast_calls):
    compare(GroupNorm(groups=2), layers.GroupNormalization(groups=2), inputs(MAP), training=True, frozen=True)
    assert fast_calls["normalize_groups"] == 1  # a frozen GN computes what it does in training: no batch statistics


def test_masked_batch_norm_leaves_masked_steps_out_as_keras(fast_calls):
    mask = tf.constant(np.random.default_rng(3).random((4, 7)) > 0.4)
    compare(BatchNorm(), layers.BatchNormalization(), inputs((4, 7, 6)), training=True, mask=mask)
    assert fast_calls["normalize_groups"] == 0


GROUP_CASES = {  # id: (arguments, input shape, whether inference takes normalize_for_inference)
    "rank2": ({"groups": 2}, (16, 6), False),
    "rank3": ({"groups": 2}, (4, 7, 6), False),
    "rank3-one-group": ({"groups": 1}, (4, 7, 6), True),
    "rank4": ({"groups": 2}, MAP, True),
    "rank5": ({"groups": 3}, (2, 3, 4, 5, 6), False),
    "instance": ({"groups": -1}, MAP, True),
    "channels-first": ({"groups": 2, "axis": 1}, (4, 6, 5, 5), False),
    "no-scale": ({"groups": 2, "scale": False}, MAP, True),
    "no-center": ({"groups": 2, "center": False}, MAP, True),
    "neither": ({"groups": 3, "scale": False, "center": False}, MAP, True),
    "regularized": ({"groups": 2, **REGULARIZED}, MAP, True),
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("case", GROUP_CASES)
def test_group_norm_equals_keras(case, training, fast_calls):
    arguments, shape, fast_inference = GROUP_CASES[case]
    compare(GroupNorm(**arguments), layers.GroupNormalization(**arguments), inputs(shape), training)
    channels_last = case != "channels-first"
    assert fast_calls["normalize_groups"] == (training and channels_last)
    assert fast_calls["normalize_for_inference"] == (not training and fast_inference)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("shape", [(4, 7, 6), MAP, (2, 3, 4, 5, 6)], ids=["rank3", "rank4", "rank5"])
def test_layer_norm_equals_keras_group_norm_with_one_group(shape, training, fast_calls):
    compare(LayerNorm(), layers.GroupNormalization(groups=1, epsilon=1e-5), inputs(shape), training)
    assert fast_calls["normalize_groups" if training else "normalize_for_inference"] == 1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("pair", PAIRS)
def test_mixed_precision_equals_keras(pair, training, policy, fast_calls):
    ours, theirs = PAIRS[pair]
    compute = keras.DTypePolicy(policy).compute_dtype
    compare(ours(dtype=policy), theirs(dtype=policy), inputs(MAP, compute), training, tolerance=TOLERANCE[policy])
    assert fast_calls["normalize_groups"] == training
    assert fast_calls["normalize_for_inference"] == (not training and pair == "gn")


def outputs_and_gradients(layer, x, weights):
    """The output of `layer` training on `x`, and the gradients of Σ output·weights for x and γ, in float64."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(layer(x, training=True), tf.float64)
        loss = tf.reduce_sum(y * weights)
    return [np.asarray(t, np.float64) for t in (y, *tape.gradient(loss, [x, layer.gamma]))]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.usefixtures("norm_path")
def test_a_large_mean_against_a_small_spread_keeps_its_variance(pair):
    # E[x²] − E[x]² in float32 loses this variance (4) entirely: x² is 4.9e9, in steps of 512. Two-pass or shifted
    # moments keep it, to float32's steps of 0.008 near 70,000: the mean itself is rounded by up to 0.004, an
    # offset that reaches γ's gradient as 0.004·inv·Σdy, about 0.05 here. The reference is Keras's layer in
    # float64; Keras's own float32 layer is off by up to 0.011 in the output and 0.43 in γ's gradient.
    ours, theirs = PAIRS[pair]
    x = inputs(MAP, offset=70_000.0)
    weights = np.random.default_rng(2).normal(size=MAP)
    exact = outputs_and_gradients(theirs(dtype="float64"), tf.cast(x, tf.float64), weights)
    for mine, reference in zip(outputs_and_gradients(ours(), x, weights), exact):
        np.testing.assert_allclose(mine, reference, rtol=1e-2, atol=0.1)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.usefixtures("norm_path")
def test_a_constant_map_normalizes_to_zero(pair):
    y = PAIRS[pair][0](center=False)(tf.fill(MAP, 70_000.0), training=True)
    np.testing.assert_array_equal(y, np.zeros(MAP))


@pytest.mark.parametrize("pair", PAIRS)
def test_float64_keeps_keras_arithmetic(pair, fast_calls):
    ours, theirs = PAIRS[pair]
    compare(ours(dtype="float64"), theirs(dtype="float64"), inputs(MAP, "float64"), training=True)
    assert fast_calls["normalize_groups"] == 0


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_kernorms_networks_never_fall_back_to_keras(monkeypatch, architecture, norm, precision):
    def keras_computation(*args, **kwargs):
        raise AssertionError("a norm of kernorm's networks fell back to Keras's computation")

    batch_norm_inference = layers.BatchNormalization.call
    for keras_layer in (layers.BatchNormalization, layers.GroupNormalization):
        monkeypatch.setattr(keras_layer, "call", keras_computation)
    with dtype_policy(precision):
        model = build_model(norm=norm, architecture=architecture)
    images = tf.constant(np.random.default_rng(4).integers(0, 256, (8, 28, 28, 1)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(model(images, training=True), tf.float32))
    assert all(g is not None for g in tape.gradient(loss, model.trainable_weights))
    monkeypatch.setattr(layers.BatchNormalization, "call", batch_norm_inference)  # BN infers as Keras does
    model(images, training=False)


def random_cases(count, seed=7):
    """`count` (norm, arguments, input shape) cases: BN, GN and LN in turn on random shapes of rank 2 to 4, where
    each spatial size may be 0; in the first round each norm has an empty batch, in the second a spatial size of 0,
    in the third BN has no channels (Keras's GroupNormalization takes none)."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        norm, round_ = ("bn", "gn", "ln")[index % 3], index // 3
        rank = int(rng.integers(2, 5))
        shape = [int(n) for n in (rng.integers(1, 5), *rng.integers(0, 6, rank - 2), rng.integers(1, 9))]
        if round_ == 0:
            shape[0] = 0
        elif round_ == 1:
            shape[1:-1] = [0, *shape[2:-1]]  # the first spatial size 0 (a new one at rank 2)
        elif round_ == 2 and norm == "bn":
            shape[-1] = 0
        divisors = [g for g in range(1, shape[-1] + 1) if shape[-1] % g == 0]
        arguments = {"groups": int(rng.choice(divisors))} if norm == "gn" else {}
        cases.append((norm, arguments, tuple(shape)))
    return cases


# kernorm's layer and Keras's, each taking the case's arguments.
RANDOM_PAIRS = {"bn": (BatchNorm, layers.BatchNormalization), "gn": (GroupNorm, layers.GroupNormalization),
                "ln": (LayerNorm, functools.partial(layers.GroupNormalization, groups=1, epsilon=1e-5))}
RANDOM_CASES = random_cases(36)


@pytest.mark.parametrize("norm, arguments, shape", RANDOM_CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{a}" for n, a, s in RANDOM_CASES])
@pytest.mark.parametrize("norm_path", ["native"], indirect=True)
def test_random_shapes_equal_keras_on_the_cpp_ops(norm, arguments, shape, fast_calls):
    ours, theirs = RANDOM_PAIRS[norm]
    compare(ours(**arguments), theirs(**arguments), inputs(shape), training=True)
    assert fast_calls["normalize_groups"] == (shape[-1] > 0)  # a map without channels is Keras's own computation
