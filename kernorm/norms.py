"""The normalization layers kernorm uses, and the registry that picks one by name.

`BatchNorm`, `GroupNorm` and `LayerNorm` are Keras's own layers (same weights,
same config) with a cheaper training computation: one pass for the sums, one
for the output, and a hand-written gradient, in kernorm's C++ ops on a CPU
(`kernorm.native`), elsewhere compiled with XLA. Keras's versions
differentiate every broadcast and moment op separately, and those
element-wise passes cost more than the convolutions in the study's network.
Each applies the activation before it itself (`input_activation`), so that a
ReLU runs inside the C++ ops. `GroupNorm` and `LayerNorm` also compute
inference their own way, one that converts to a full-integer TFLite model
(see `normalize_for_inference`).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from kernorm import native
from kernorm.config import DEFAULT_GROUPS
from kernorm.errors import KernormError, check_choice

# PyTorch's defaults, which the study trained with: eps 1e-5, and BatchNorm2d's
# momentum 0.1 is Keras's 0.9 (Keras weighs the old moving value, PyTorch the new).
EPSILON = 1e-5
BN_MOMENTUM = 0.9


def normalize_groups(x, gamma, beta, groups, epsilon, relu=False):
    """Normalizes `x` with statistics per row and channel group, then scales and shifts per channel.

    Computes `(x − mean) / sqrt(var + epsilon) · gamma + beta`, where mean and
    (population) variance are taken over axis 1 and the channels of a group,
    separately for every index of axis 0; with `relu`, of `max(x, 0)` instead.

    Args:
        x: `(rows, positions, channels)`. Batch norm passes `(1, N·H·W, C)` with
            `groups=C`; group norm passes `(N, H·W, C)`.
        gamma, beta: `(channels,)` scale and offset.
        groups: number of channel groups; must divide the channel count.
        epsilon: added to the variance.
        relu: apply a ReLU to `x` first; the C++ ops do it within their own
            passes over the map, which saves the ReLU's.

    Returns:
        `(y, mean, variance)`: `y` shaped and typed like `x`; mean and variance
        `(rows, groups)` in float32, without gradient (they feed moving statistics).
    """
    f32 = tf.float32
    x32, gamma, beta = tf.cast(x, f32), tf.cast(gamma, f32), tf.cast(beta, f32)
    if native.ops() is None:
        y, mean, var = _normalize_xla(tf.nn.relu(x32) if relu else x32, gamma, beta, groups, epsilon)
    else:
        y, mean, var, _ = native.ops().kernorm_normalize_groups(x32, gamma, beta, groups=groups, epsilon=epsilon,
                                                                relu=relu)
    return tf.cast(y, x.dtype), tf.stop_gradient(mean), tf.stop_gradient(var)


def _normalize_xla(x, gamma, beta, groups, epsilon):
    """`normalize_groups` in float32 without kernorm's C++ ops: `_forward` and `_backward`."""
    @tf.custom_gradient
    def normalize(x, gamma, beta):
        y, mean, var, inv = _forward(x, gamma, beta, groups, epsilon)
        return (y, mean, var), lambda dy, *_: _backward(dy, x, gamma, mean, inv, groups)

    return normalize(x, gamma, beta)


# XLA fuses each direction's element-wise passes and reductions into a few loops,
# where Keras's layers run each broadcast and moment op as a pass of its own.
# Only these ops: XLA's own convolutions are slower than oneDNN's. The gradient
# stays outside the compiled functions: a tf.function with a custom gradient
# inside lost gradients when two replicas traced it with different batch sizes.
@tf.function(jit_compile=True)
def _forward(x, gamma, beta, groups, epsilon):
    """`normalize_groups`'s output, mean and variance, and 1 / sqrt(variance + epsilon)."""
    count = _count(x, groups)
    mean = _group_sum(tf.reduce_sum(x, 1), groups) / count
    var = tf.maximum(_group_sum(tf.reduce_sum(tf.square(x), 1), groups) / count - tf.square(mean), 0.0)
    inv = tf.math.rsqrt(var + epsilon)
    scale = gamma * _spread(inv, x.shape[-1])
    shift = beta - _spread(mean, x.shape[-1]) * scale
    return x * scale[:, None] + shift[:, None], mean, var, inv


@tf.function(jit_compile=True)
def _backward(dy, x, gamma, mean, inv, groups):
    """Gradients of `normalize_groups`'s output `dy` with respect to x, gamma and beta."""
    # With x̂ = (x − m)·inv and g = dy·γ: dx = inv·(g − mean(g) − x̂·mean(g·x̂)),
    # which is dy·scale + x·a + b with a, b constant per row and group.
    count, channels = _count(x, groups), x.shape[-1]
    inv_per_channel = _spread(inv, channels)
    dy_sum = tf.reduce_sum(dy, 1)
    dy_centred = tf.reduce_sum(dy * x, 1) - _spread(mean, channels) * dy_sum  # Σ dy·(x − m)
    mean_g = _group_sum(gamma * dy_sum, groups) / count
    mean_gx = inv * _group_sum(gamma * dy_centred, groups) / count
    a = _spread(-tf.square(inv) * mean_gx, channels)
    b = _spread(-inv * mean_g + tf.square(inv) * mean * mean_gx, channels)
    dx = dy * (gamma * inv_per_channel)[:, None] + (x * a[:, None] + b[:, None])
    return dx, tf.reduce_sum(inv_per_channel * dy_centred, 0), tf.reduce_sum(dy_sum, 0)


def _count(x, groups):  # values behind each statistic: positions × channels per group
    return tf.cast(tf.shape(x)[1] * (x.shape[-1] // groups), tf.float32)


def _group_sum(t, groups):  # (rows, channels) -> (rows, groups)
    return tf.reduce_sum(tf.reshape(t, (-1, groups, t.shape[-1] // groups)), -1)


def _spread(t, channels):  # (rows, groups) -> (rows, channels): each group's value on its channels
    return tf.reshape(tf.repeat(t[:, :, None], channels // t.shape[-1], axis=2), (-1, channels))


def normalize_for_inference(x, gamma, beta, groups, epsilon):
    """Group normalization of `x` in the few op kinds a full-integer TFLite model runs whole.

    The same arithmetic as Keras's `GroupNormalization`, arranged so that its
    TFLite conversion holds only MEAN, MUL, ADD, SUB, RSQRT and a 1×1 CONV_2D,
    all with int8 kernels: Keras's own arrangement converts to SQUARE and NEG,
    which have none, so an int8 model would fall back to float around every
    norm. The variance is E[x²] − E[x]². With several groups, each group's
    means come from the per-channel spatial means through a 1×1 convolution
    with fixed weights 1/(channels per group) within a group and 0 across
    groups; one group takes its means over all axes at once. The output takes
    five passes over the feature map: two means, x·x, one multiply, one add.

    Args:
        x: `(batch, height, width, channels)`.
        gamma, beta: `(channels,)` scale and offset.
        groups: number of channel groups; must divide the channel count.
        epsilon: added to the variance.

    Returns:
        `(x − mean) / sqrt(var + epsilon) · gamma + beta`, shaped like `x`.
    """
    def group_mean(t):  # (batch, 1, 1, channels): each channel gets its group's mean of t
        if groups == 1:  # one MEAN over everything: a single op, no group-mixing conv
            return keras.ops.mean(t, axis=(1, 2, 3), keepdims=True)
        per_group = t.shape[-1] // groups
        same_group = np.kron(np.eye(groups), np.ones((per_group, per_group))) / per_group
        return keras.ops.conv(keras.ops.mean(t, axis=(1, 2), keepdims=True),
                              keras.ops.cast(same_group[None, None], t.dtype))

    mean = group_mean(x)
    var = group_mean(x * x) - mean * mean
    scale = keras.ops.rsqrt(var + epsilon) * gamma
    return x * scale + (beta - mean * scale)


class _InputActivation:
    """Lets a norm layer apply the activation before it, the study's conv → activation → norm.

    `input_activation` (a Keras activation name or function; None for none) is
    applied to the layer's input. A ReLU runs inside kernorm's C++ training op
    (`normalize_groups(relu=True)`), which saves the separate pass over the
    feature map that an `Activation` layer would take.
    """

    def __init__(self, *args, input_activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_activation = keras.activations.get(input_activation)

    def get_config(self):
        return {**super().get_config(), "input_activation": keras.activations.serialize(self.input_activation)}

    def _train_normalize(self, x, groups):
        """`normalize_groups` of `x` after the input activation, with this layer's weights."""
        relu = self.input_activation is keras.activations.relu
        return normalize_groups(x if relu else self.input_activation(x), self.gamma.value, self.beta.value,
                                groups, self.epsilon, relu=relu)


@keras.saving.register_keras_serializable(package="kernorm")
class BatchNorm(_InputActivation, layers.BatchNormalization):
    """Keras's `BatchNormalization`, trained with `normalize_groups`.

    Per channel, normalizes over batch, height and width with the batch's
    statistics in training, with the moving ones in inference; the moving
    statistics follow `momentum` as in Keras. `synchronized=True` (statistics
    over all replicas) trains with Keras's own computation.

    Args:
        input_activation: applied to the input first (see `_InputActivation`).
        Other arguments: as Keras's `BatchNormalization`.

    Input shape: `(batch, height, width, channels)`. Output shape: the same.
    """

    def call(self, inputs, training=None, mask=None):
        if not training or self.synchronized:
            return super().call(self.input_activation(inputs), training=training, mask=mask)
        channels = inputs.shape[-1]
        y, mean, var = self._train_normalize(tf.reshape(inputs, (1, -1, channels)), channels)
        for moving, batch in ((self.moving_mean, mean[0]), (self.moving_variance, var[0])):
            moving.assign(moving * self.momentum + batch * (1 - self.momentum))
        return tf.reshape(y, tf.shape(inputs))


@keras.saving.register_keras_serializable(package="kernorm")
class GroupNorm(_InputActivation, layers.GroupNormalization):
    """Keras's `GroupNormalization`, trained with `normalize_groups`, inferring with `normalize_for_inference`.

    Each sample is normalized with one mean and variance per group of
    `channels / groups` channels over height and width, then scaled and shifted
    per channel, as PyTorch's `GroupNorm(groups, C)`.

    Args:
        input_activation: applied to the input first (see `_InputActivation`).
        Other arguments: as Keras's `GroupNormalization`.

    Input shape: `(batch, height, width, channels)`. Output shape: the same.
    """

    def call(self, inputs, training=None):
        if not training:
            return normalize_for_inference(self.input_activation(inputs), self.gamma, self.beta, self.groups,
                                           self.epsilon)
        y, _, _ = self._train_normalize(tf.reshape(inputs, (tf.shape(inputs)[0], -1, inputs.shape[-1])),
                                        self.groups)
        return tf.reshape(y, tf.shape(inputs))


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNorm(GroupNorm):
    """Layer normalization of a feature map, as PyTorch's `GroupNorm(1, C)`.

    Each sample is normalized with one mean and variance taken over all of
    H×W×C, then scaled and shifted per channel (2·C weights). Keras's own
    `LayerNormalization(axis=-1)` normalizes each pixel over its channels
    only, which is a different operation.

    Args:
        epsilon: added to the variance before the square root.
        **kwargs: `input_activation` (see `_InputActivation`) and other
            `keras.layers.Layer` arguments (`name`, `dtype`).

    Input shape: `(batch, height, width, channels)`. Output shape: the same.
    """

    def __init__(self, epsilon=EPSILON, **kwargs):
        kwargs.pop("groups", None)  # fixed at 1; present in saved configs
        super().__init__(groups=1, epsilon=epsilon, **kwargs)


def _batch_norm(channels, groups, sync_bn, input_activation):
    return BatchNorm(momentum=BN_MOMENTUM, epsilon=EPSILON, synchronized=sync_bn, input_activation=input_activation)


def _layer_norm(channels, groups, sync_bn, input_activation):
    return LayerNorm(input_activation=input_activation)


def _group_norm(channels, groups, sync_bn, input_activation):
    if groups < 1 or channels % groups:
        raise KernormError(
            f"group norm: groups={groups} does not divide {channels} channels; "
            f"pick a divisor of {channels} with --groups"
        )
    return GroupNorm(groups=groups, epsilon=EPSILON, input_activation=input_activation)


# name -> factory(channels, groups, sync_bn, input_activation) -> layer, one for each of
# `kernorm.config.NORMS`. "none" adds no
# layer. LN and GN normalize each sample on its own, so only BN has batch statistics to
# synchronize.
NORMS = {"bn": _batch_norm, "ln": _layer_norm, "gn": _group_norm, "none": None}


def create_norm_layer(norm, channels, groups=DEFAULT_GROUPS, sync_bn=False, input_activation=None):
    """Creates the normalization layer registered under `norm`.

    Args:
        norm: a key of `NORMS` ("bn", "ln", "gn", "none") or None.
        channels: channel count of the feature map it will normalize.
        groups: number of channel groups, used by "gn" only.
        sync_bn: "bn" takes its batch statistics over the batches of all
            replicas of a `tf.distribute` strategy (Keras's
            `BatchNormalization(synchronized=True)`), not over each replica's
            share alone. Other norms ignore it.
        input_activation: an activation the layer applies to its input
            before normalizing (a Keras activation name), or None.

    Returns:
        A Keras layer, or None for no normalization.
    """
    key = "none" if norm is None else str(norm).lower()
    check_choice("norm", key, NORMS)
    factory = NORMS[key]
    return factory(channels, groups, sync_bn, input_activation) if factory else None
