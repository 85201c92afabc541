"""Layer factories: the study's conv layer, conv block and transition block in Keras.

The study (PyTorch) built every layer as conv -> activation -> norm -> dropout.
These factories keep that order and its semantics; a norm is picked by a short
name from `NORMS`, so adding one is one entry there.
"""

import keras
from keras import layers

from kernorm.errors import KernormError

# PyTorch's defaults, which the study trained with: eps 1e-5, and BatchNorm2d's
# momentum 0.1 is Keras's 0.9 (Keras weighs the old moving value, PyTorch the new).
EPSILON = 1e-5
BN_MOMENTUM = 0.9

# PyTorch's default initialisation of conv and linear weights: U(±1/sqrt(fan_in)).
TORCH_INIT = {"scale": 1 / 3, "mode": "fan_in", "distribution": "uniform"}


@keras.saving.register_keras_serializable(package="kernorm")
class LayerNorm(layers.GroupNormalization):
    """Layer normalization of a feature map, as PyTorch's `GroupNorm(1, C)`.

    Each sample is normalized with one mean and variance taken over all of
    H×W×C, then scaled and shifted per channel (2·C weights). Keras's own
    `LayerNormalization(axis=-1)` normalizes each pixel over its channels
    only, which is a different operation.

    Args:
        epsilon: added to the variance before the square root.
        **kwargs: other `keras.layers.Layer` arguments (`name`, `dtype`).

    Input shape: `(batch, height, width, channels)`. Output shape: the same.
    """

    def __init__(self, epsilon=EPSILON, **kwargs):
        kwargs.pop("groups", None)  # fixed at 1; present in saved configs
        super().__init__(groups=1, epsilon=epsilon, **kwargs)


def _batch_norm(channels, groups, sync_bn):
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=EPSILON, synchronized=sync_bn)


def _layer_norm(channels, groups, sync_bn):
    return LayerNorm()


def _group_norm(channels, groups, sync_bn):
    if groups < 1 or channels % groups:
        raise KernormError(
            f"group norm: groups={groups} does not divide {channels} channels; "
            f"pick a divisor of {channels} with --groups"
        )
    return layers.GroupNormalization(groups=groups, epsilon=EPSILON)


# name -> factory(channels, groups, sync_bn) -> layer. "none" adds no layer. LN and GN
# normalize each sample on its own, so only BN has batch statistics to synchronize.
NORMS = {"bn": _batch_norm, "ln": _layer_norm, "gn": _group_norm, "none": None}


def create_norm_layer(norm, channels, groups=2, sync_bn=False):
    """Creates the normalization layer registered under `norm`.

    Args:
        norm: a key of `NORMS` ("bn", "ln", "gn", "none") or None.
        channels: channel count of the feature map it will normalize.
        groups: number of channel groups, used by "gn" only.
        sync_bn: "bn" takes its batch statistics over the batches of all
            replicas of a `tf.distribute` strategy (Keras's
            `BatchNormalization(synchronized=True)`), not over each replica's
            share alone. Other norms ignore it.

    Returns:
        A Keras layer, or None for no normalization.
    """
    key = "none" if norm is None else str(norm).lower()
    if key not in NORMS:
        raise KernormError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    factory = NORMS[key]
    return factory(channels, groups, sync_bn) if factory else None


def kernel_regularizer(l1, l2):
    return keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None


def conv_layer(filters, kernel_size=3, padding="valid", use_bias=False, activation="relu",
               norm=None, groups=2, dropout=None, l1=0.0, l2=0.0, sync_bn=False):
    """The study's `buildConvLayer`: conv -> activation -> norm -> dropout.

    Args:
        filters: output channels of the convolution.
        kernel_size: size of the square kernel.
        padding: "valid" (the study's, no padding) or "same".
        use_bias: whether the convolution has a bias.
        activation: a Keras activation name or callable, applied before the norm.
        norm: normalization name from `NORMS`, or None.
        groups: channel groups for "gn".
        dropout: dropout rate after the norm, or None for no dropout.
        sync_bn: synchronized batch statistics across replicas for "bn"
            (see `create_norm_layer`).
        l1, l2: coefficients of the kernel regularizer; the loss gains
            `l1·Σ|w| + l2·Σw²` over this layer's kernel.

    Returns:
        A list of layers in the order above. Input `(batch, H, W, C_in)`,
        output `(batch, H', W', filters)`.
    """
    stack = [layers.Conv2D(
        filters, kernel_size, padding=padding, use_bias=use_bias,
        kernel_initializer=keras.initializers.VarianceScaling(**TORCH_INIT),
        kernel_regularizer=kernel_regularizer(l1, l2),
    ), layers.Activation(activation)]
    norm_layer = create_norm_layer(norm, filters, groups, sync_bn)
    if norm_layer is not None:
        stack.append(norm_layer)
    if dropout:
        stack.append(layers.Dropout(dropout))
    return stack


def conv_block(filters_list, kernel_size=3, padding="valid", use_bias=False, activation="relu",
               norm=None, groups=2, dropout=None, dropout_layers="last", l1=0.0, l2=0.0,
               sync_bn=False, name=None):
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
    if dropout_layers not in ("last", "all"):
        raise KernormError(f"dropout_layers must be 'last' or 'all', not {dropout_layers!r}")
    stack = []
    for filters in filters_list:
        stack += conv_layer(filters, kernel_size=kernel_size, padding=padding, use_bias=use_bias,
                            activation=activation, norm=norm, groups=groups, l1=l1, l2=l2,
                            sync_bn=sync_bn, dropout=dropout if dropout_layers == "all" else None)
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
