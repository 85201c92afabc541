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
(see `normalize_for_inference`). Where a case is not one these computations
cover (each layer's docstring says which), the layer computes as Keras's does.
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
    count, channels = _count(x, groups), x.shape[-1]
    mean = _group_sum(tf.reduce_sum(x, 1), groups) / count
    # Two passes, as Keras's moments: E[x²] − E[x]² loses the variance of a map whose mean is large against its spread.
    centred = x - _spread(mean, channels)[:, None]
    var = _group_sum(tf.reduce_sum(tf.square(centred), 1), groups) / count
    inv = tf.math.rsqrt(var + epsilon)
    return centred * (gamma * _spread(inv, channels))[:, None] + beta, mean, var, inv


@tf.function(jit_compile=True)
def _backward(dy, x, gamma, mean, inv, groups):
    """Gradients of `normalize_groups`'s output `dy` with respect to x, gamma and beta."""
    # With x̂ = (x − m)·inv and g = dy·γ: dx = inv·(g − mean(g) − x̂·mean(g·x̂)),
    # which is dy·scale + (x − m)·a + b with a, b constant per row and group.
    count, channels = _count(x, groups), x.shape[-1]
    inv_per_channel = _spread(inv, channels)
    centred = x - _spread(mean, channels)[:, None]
    dy_sum = tf.reduce_sum(dy, 1)
    dy_centred = tf.reduce_sum(dy * centred, 1)  # Σ dy·(x − m)
    mean_g = _group_sum(gamma * dy_sum, groups) / count
    mean_gx = inv * _group_sum(gamma * dy_centred, groups) / count
    a = _spread(-tf.square(inv) * mean_gx, channels)
    b = _spread(-inv * mean_g, channels)
    dx = dy * (gamma * inv_per_channel)[:, None] + (centred * a[:, None] + b[:, None])
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
    TFLite conversion holds only MEAN, SUB, MUL, ADD, RSQRT and a 1×1 CONV_2D,
    all with int8 kernels: Keras's own arrangement converts to SQUARE and NEG,
    which have none, so an int8 model would fall back to float around every
    norm. The variance is the mean of (x − mean)², in two passes as Keras's
    moments. With several groups, each group's means come from the
    per-channel spatial means through a 1×1 convolution with fixed weights
    1/(channels per group) within a group and 0 across groups; one group takes
    its means over all axes at once.

    Args:
        x: `(batch, height, width, channels)`; with `groups=1`, any rank ≥ 2
            with the channels last.
        gamma, beta: `(channels,)` scale and offset, or None for none.
        groups: number of channel groups; must divide the channel count.
        epsilon: added to the variance.

    Returns:
        `(x − mean) / sqrt(var + epsilon) · gamma + beta`, shaped like `x`.
    """
    def group_mean(t):  # (batch, 1, ..., 1, channels): each channel gets its group's mean of t
        if groups == 1:  # one MEAN over everything: a single op, no group-mixing conv
            return keras.ops.mean(t, axis=tuple(range(1, t.ndim)), keepdims=True)
        per_group = t.shape[-1] // groups
        same_group = np.kron(np.eye(groups), np.ones((per_group, per_group))) / per_group
        return keras.ops.conv(keras.ops.mean(t, axis=(1, 2), keepdims=True),
                              keras.ops.cast(same_group[None, None], t.dtype))

    centred = x - group_mean(x)
    scale = keras.ops.rsqrt(group_mean(centred * centred) + epsilon)
    if gamma is not None:
        scale = scale * gamma
    return centred * scale if beta is None else centred * scale + beta


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

    def _suits_fast_path(self, inputs):
        """Whether `inputs` suit kernorm's own computations: channels last, at least one channel (Keras's
        BatchNormalization takes none, and gives an empty output), and a float32, float16 or bfloat16 input
        (a float64 one keeps Keras's float64 arithmetic)."""
        return (self.axis in (-1, inputs.ndim - 1) and inputs.shape[-1] != 0
                and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16))

    def _weights(self, channels):
        """γ and β, or ones and zeros where `scale` or `center` is off."""
        gamma = self.gamma.value if self.scale else tf.ones(channels)
        beta = self.beta.value if self.center else tf.zeros(channels)
        return gamma, beta

    def _train_normalize(self, inputs, shape, groups):
        """`normalize_groups` of `inputs` after the input activation, reshaped to `shape`: `(rows, positions,
        channels)`, one of which may be -1.

        Returns the output, shaped like `inputs` in the compute dtype, and the mean and variance
        `(rows, groups)` in float32.
        """
        relu = self.input_activation is keras.activations.relu
        x = tf.reshape(inputs if relu else self.input_activation(inputs), shape)
        y, mean, var = normalize_groups(x, *self._weights(inputs.shape[-1]), groups, self.epsilon, relu=relu)
        return tf.cast(tf.reshape(y, tf.shape(inputs)), self.compute_dtype), mean, var


@keras.saving.register_keras_serializable(package="kernorm")
class BatchNorm(_InputActivation, layers.BatchNormalization):
    """Keras's `BatchNormalization`, trained with `normalize_groups`.

    Per channel, normalizes over all other axes with the batch's statistics in
    training, with the moving ones in inference or when frozen
    (`trainable=False`); the moving statistics follow `momentum` as in Keras.
    Outputs, gradients and moving statistics are Keras's, also for an empty
    batch: an empty output, and a batch mean and variance of 0/0 = NaN that
    make the moving statistics NaN. Training takes kernorm's path
    (`normalize_groups`: the C++ ops or XLA) when the channels are the last
    axis (at least one), the input is float32, float16 or bfloat16, and there
    is no mask, no `renorm` and no `synchronized`; every other case, and all
    of inference, is Keras's own computation.

    Args:
        input_activation: applied to the input first (see `_InputActivation`).
        Other arguments: as Keras's `BatchNormalization`.

    Input shape: any rank ≥ 2. Output shape: the same.
    """

    def call(self, inputs, training=None, mask=None):
        # Keras's BatchNormalization has `renorm` from Keras 3.14 on; before, it has none.
        renorm = getattr(self, "renorm", False)
        fast = training and self.trainable and mask is None and not (renorm or self.synchronized)
        if not (fast and self._suits_fast_path(inputs)):
            return super().call(self.input_activation(inputs), training=training, mask=mask)
        y, mean, var = self._train_normalize(inputs, (1, -1, inputs.shape[-1]), inputs.shape[-1])
        for moving, batch in ((self.moving_mean, mean[0]), (self.moving_variance, var[0])):
            moving.assign(moving * self.momentum + batch * (1 - self.momentum))
        return y


@keras.saving.register_keras_serializable(package="kernorm")
class GroupNorm(_InputActivation, layers.GroupNormalization):
    """Keras's `GroupNormalization`, trained with `normalize_groups`, inferring with `normalize_for_inference`.

    Each sample is normalized with one mean and variance per group of
    `channels / groups` channels over all other axes, then scaled and shifted
    per channel, as PyTorch's `GroupNorm(groups, C)`; `groups=-1` makes one
    group per channel (instance normalization). Outputs and gradients are
    Keras's. With the channels last and a float32, float16 or bfloat16 input,
    training takes kernorm's path (`normalize_groups`: the C++ ops or XLA) and
    inference `normalize_for_inference` (rank 4, or any rank with one group);
    every other case is Keras's own computation.

    Args:
        input_activation: applied to the input first (see `_InputActivation`).
        Other arguments: as Keras's `GroupNormalization`.

    Input shape: any rank ≥ 2. Output shape: the same.
    """

    def call(self, inputs, training=None):
        if not self._suits_fast_path(inputs):
            return super().call(self.input_activation(inputs))
        if training:
            # The rows inferred, as Keras's GroupNormalization reshapes: there, a batch of 0 maps of 0 positions
            # becomes one row of none, whose statistics are NaN (0/0).
            shape = (-1, tf.reduce_prod(tf.shape(inputs)[1:-1]), inputs.shape[-1])
            return self._train_normalize(inputs, shape, self.groups)[0]
        if self.groups == 1 or inputs.ndim == 4:
            # In float32 as Keras's GroupNormalization, whatever the precision policy. Keras before 3.14
            # hands a mixed-precision layer its weights in the compute dtype: cast them back, as Keras's does.
            gamma, beta = (None if w is None else tf.cast(w, tf.float32) for w in (self.gamma, self.beta))
            y = normalize_for_inference(tf.cast(self.input_activation(inputs), tf.float32), gamma, beta,
                                        self.groups, self.epsilon)
            return tf.cast(y, self.compute_dtype)
        return super().call(self.input_activation(inputs))


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNorm(GroupNorm):
    """Layer normalization of a feature map, as PyTorch's `GroupNorm(1, C)`: `GroupNorm` with one group.

    Each sample is normalized with one mean and variance taken over all its
    values (H×W×C for a feature map), then scaled and shifted per channel (2·C
    weights). Keras's own `LayerNormalization(axis=-1)` normalizes each pixel
    over its channels only, which is a different operation; this layer equals
    Keras's `GroupNormalization(groups=1)`.

    Args:
        epsilon: added to the variance before the square root.
        **kwargs: `input_activation` (see `_InputActivation`) and the other
            arguments of Keras's `GroupNormalization` but `groups`.

    Input shape: any rank ≥ 2. Output shape: the same.
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
