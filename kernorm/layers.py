"""Layer factories: the study's conv layer, conv block and transition block in Keras.

The study (PyTorch) built every layer as conv -> activation -> norm -> dropout.
These factories keep that order and its semantics; a norm is picked by a short
name from `kernorm.norms.NORMS`, so adding one is one entry there.
"""

import math

import keras
from keras import layers, ops

from kernorm.config import DEFAULT_GROUPS, DROPOUT_LAYERS
from kernorm.errors import check_choice
from kernorm.norms import create_norm_layer

# PyTorch's default initialisation of conv and linear weights: U(±1/sqrt(fan_in)).
TORCH_INIT = {"scale": 1 / 3, "mode": "fan_in", "distribution": "uniform"}


@keras.saving.register_keras_serializable(package="kernorm")
class Flatten(layers.Flatten):
    """Keras's `Flatten` whose reshape leaves the batch to -1: `(N, ...)` -> `(N, product of the rest)`.

    Keras's own reshapes to the input's runtime batch size, which an exported graph
    computes with SHAPE, STRIDED_SLICE and PACK ops; here the new shape is a constant,
    so the graph holds one RESHAPE and works at any batch size all the same. The
    dimensions after the batch must be known when the layer is built.
    """

    def call(self, inputs):
        return ops.reshape(inputs, (-1, math.prod(inputs.shape[1:])))


def kernel_regularizer(l1, l2):
    return keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None


def conv_layer(filters, kernel_size=3, padding="valid", use_bias=False, activation="relu",
               norm=None, groups=DEFAULT_GROUPS, dropout=None, l1=0.0, l2=0.0, sync_bn=False, separable=False,
               dilation_rate=1):
    """The study's `buildConvLayer`: conv -> activation -> norm -> dropout.

    Args:
        filters: output channels of the convolution.
        kernel_size: size of the square kernel.
        padding: "valid" (the study's, no padding) or "same".
        use_bias: whether the convolution has a bias.
        activation: a Keras activation name or function, applied before the norm.
        norm: normalization name from `kernorm.norms.NORMS`, or None.
        groups: channel groups for "gn".
        dropout: dropout rate after the norm, or None for no dropout.
        sync_bn: synchronized batch statistics across replicas for "bn"
            (see `create_norm_layer`).
        l1, l2: coefficients of the kernel regularizer; the loss gains
            `l1·Σ|w| + l2·Σw²` over this layer's kernel (both kernels when
            separable).
        separable: a depthwise-separable convolution (Keras's
            `SeparableConv2D`: a `kernel_size` filter per input channel, then
            a 1×1 convolution to `filters`) in place of the full one:
            `k²·C_in + C_in·filters` weights instead of `k²·C_in·filters`.
            Its kernels keep Keras's default initializer, as the study (which
            had none) gives no PyTorch counterpart to copy.
        dilation_rate: spacing of the kernel's taps: 2 spreads a 3×3
            kernel over 5×5 pixels, widening the receptive field at the same
            weights, as a pool would without halving the map.

    Returns:
        A list of layers computing the order above: the convolution, the norm
        layer, which applies the activation to its input itself (in training a
        ReLU then joins the norm's C++ op, see `kernorm.norms`), or without a
        norm an `Activation` layer, then the dropout. Input
        `(batch, H, W, C_in)`, output `(batch, H', W', filters)`.
    """
    regularizer = kernel_regularizer(l1, l2)
    if separable:
        conv = layers.SeparableConv2D(filters, kernel_size, padding=padding, use_bias=use_bias,
                                      dilation_rate=dilation_rate, depthwise_regularizer=regularizer,
                                      pointwise_regularizer=regularizer)
    else:
        conv = layers.Conv2D(filters, kernel_size, padding=padding, use_bias=use_bias, dilation_rate=dilation_rate,
                             kernel_initializer=keras.initializers.VarianceScaling(**TORCH_INIT),
                             kernel_regularizer=regularizer)
    stack = [conv]
    norm_layer = create_norm_layer(norm, filters, groups, sync_bn, input_activation=activation)
    stack.append(layers.Activation(activation) if norm_layer is None else norm_layer)
    if dropout:
        stack.append(layers.Dropout(dropout))
    return stack


def conv_block(filters_list, kernel_size=3, padding="valid", use_bias=False, activation="relu",
               norm=None, groups=DEFAULT_GROUPS, dropout=None, dropout_layers="last", l1=0.0, l2=0.0,
               sync_bn=False, separable=False, dilation_rate=1, name=None):
    """The study's `buildConvBlock`: one `conv_layer` per entry of `filters_list`.

    Args:
        filters_list: output channels of each successive conv layer.
        dropout: dropout rate, or None.
        dropout_layers: "last" puts one Dropout after the whole block,
            "all" puts one after every conv layer.
        name: the block's name in a model summary.
        Other arguments: as `conv_layer`, applied to every layer.

    Returns:
        A `keras.Sequential`. Input `(batch, H, W, C)`, output
        `(batch, H', W', filters_list[-1])`.
    """
    check_choice("dropout placement", dropout_layers, DROPOUT_LAYERS)
    stack = []
    for filters in filters_list:
        stack += conv_layer(filters, kernel_size=kernel_size, padding=padding, use_bias=use_bias,
                            activation=activation, norm=norm, groups=groups, l1=l1, l2=l2,
                            sync_bn=sync_bn, separable=separable, dilation_rate=dilation_rate,
                            dropout=dropout if dropout_layers == "all" else None)
    if dropout and dropout_layers == "last":
        stack.append(layers.Dropout(dropout))
    return keras.Sequential(stack, name=name)


def trans_block(in_channels, out_channels, name=None, **layer_kwargs):
    """The study's `buildTransBlock`: a 1×1 conv layer if the channel count changes, then avg-pool 2×2.

    Args:
        in_channels: channels coming in.
        out_channels: channels going out; a 1×1 `conv_layer` maps to them
            only when they differ from `in_channels`.
        name: the block's name in a model summary.
        **layer_kwargs: passed to that `conv_layer` (e.g. `l1`, `l2`, `norm`).

    Returns:
        A `keras.Sequential`. Input `(batch, H, W, in_channels)`, output
        `(batch, H // 2, W // 2, out_channels)`.
    """
    stack = conv_layer(out_channels, kernel_size=1, **layer_kwargs) if in_channels != out_channels else []
    return keras.Sequential(stack + [layers.AveragePooling2D(2)], name=name)
