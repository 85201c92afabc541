"""The study's 4.7k-parameter MNIST network and three smaller siblings, built from kernorm's factories."""

import contextlib
import hashlib
import os

import keras
from keras import layers

from kernorm.config import DEFAULT_GROUPS
from kernorm.errors import KernormError, check_choice
from kernorm.layers import TORCH_INIT, Flatten, conv_block, kernel_regularizer, trans_block

# MNIST's pixel mean and standard deviation on [0, 1], as the study normalised.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def normalize_pixels():
    """A weightless layer mapping raw pixels 0–255 to (x/255 − mean) / std.

    Being part of the model, it travels with every export, so a device feeds
    raw pixels and needs no preprocessing of its own.
    """
    return layers.Rescaling(scale=1 / (255 * MNIST_STD), offset=-MNIST_MEAN / MNIST_STD,
                            name="normalize_pixels")


def dense_logits(l1, l2):
    """The logits: a dense layer from the features to one output per class, in float32.

    It computes in float32 whatever Keras's global dtype policy, so that the
    softmax and the loss do. Input `(batch, features)`, output `(batch, 10)`.
    """
    return layers.Dense(NUM_CLASSES, kernel_initializer=keras.initializers.VarianceScaling(**TORCH_INIT),
                        kernel_regularizer=kernel_regularizer(l1, l2), dtype="float32", name="logits")


def _study_layers(block):
    """Block [10, 10, 10] -> transition -> block [10, 10] -> transition -> flatten -> dense 10.

    Every conv is 3×3 "valid" without bias, followed by ReLU and the norm.
    4,600 trainable parameters without a norm, 4,700 with "bn", "ln" or "gn".
    """
    return [
        conv_block([10, 10, 10], name="block1", **block),
        trans_block(10, 10, name="transition1"),
        conv_block([10, 10], name="block2", **block),
        trans_block(10, 10, name="transition2"),
        Flatten(name="flatten"),
        dense_logits(block["l1"], block["l2"]),
    ]


def _separable_layers(stem, block1, block2):
    """Stem conv [stem] -> separable block `block1` -> transition -> separable block `block2` -> global avg -> dense.

    The study's plan with its parameters moved. A depthwise-separable 3×3
    conv (a 3×3 filter per input channel, then a 1×1 conv across channels)
    costs about a ninth of a full one at these widths, so the same budget
    buys three times the channels; only the stem, which sees one input
    channel, is a full conv. A global average replaces the study's second
    pool and flatten, so the dense layer costs 11 parameters per channel of
    the last conv. Every conv is 3×3 "valid", followed by ReLU and the norm;
    with two convs in `block1` and three in `block2` the receptive field
    (20×20) covers the digit.

    Returns:
        A function of a conv_block's keyword arguments to the layers, as `ARCHITECTURES` holds them.
    """
    def layers_of(block):
        return [
            conv_block([stem], name="stem", **block),
            conv_block(block1, separable=True, name="block1", **block),
            trans_block(block1[-1], block1[-1], name="transition1"),
            conv_block(block2, separable=True, name="block2", **block),
            layers.GlobalAveragePooling2D(name="pool"),
            dense_logits(block["l1"], block["l2"]),
        ]

    return layers_of


def _tiny_layers(block):
    """Stem conv [4] -> separable block [8, 8] -> separable block [12, 12, 10] dilated by 2 -> global avg.

    The separable plan below 1,000 parameters, where a dense layer's 11
    parameters a channel are a tenth of the budget. Block 2 keeps block 1's
    22×22 map, with no pool between them, and spreads its 3×3 kernels over
    5×5 pixels (dilation 2), so its receptive field (19×19) stays within a
    pixel of the pooled plan's while it sees four times the positions. Its last conv gives a
    channel a class, and the global average of that channel, after its norm,
    is the class's logit: no dense layer. 996 trainable parameters with
    "bn", "ln" or "gn"; output maps 26, 24, 22, then 18, 14, 10 pixels wide.
    """
    return [
        conv_block([4], name="stem", **block),
        conv_block([8, 8], separable=True, name="block1", **block),
        conv_block([12, 12, NUM_CLASSES], separable=True, dilation_rate=2, name="block2", **block),
        layers.GlobalAveragePooling2D(name="pool"),
        layers.Activation("linear", dtype="float32", name="logits"),  # float32, as `dense_logits`
    ]


# Architectures by name, one for each of `kernorm.config.ARCHITECTURES`: each maps a
# conv_block's keyword arguments to the layers between the pixel normalization and the output, logits included.
# Trainable parameters with "bn", "ln" or "gn": study 4,700, compact 4,490, small 1,936, tiny 996.
ARCHITECTURES = {
    "study": _study_layers,
    "compact": _separable_layers(8, [16, 24], [24, 32, 32]),
    # The compact plan at about two thirds of its widths for the 2,000-parameter budget: every layer kept, so
    # the depth and the receptive field stay the compact network's.
    "small": _separable_layers(6, [12, 14], [16, 16, 16]),
    "tiny": _tiny_layers,
}


def build_model(norm=None, l1=0.0, l2=0.0, dropout=None, dropout_layers="last", groups=DEFAULT_GROUPS,
                sync_bn=False,
                architecture="study"):
    """Builds the study's network, or another of `ARCHITECTURES` from the same factories.

    Args:
        norm: "bn", "ln", "gn", "none" or None.
        l1, l2: kernel regularizer coefficients for every conv and dense kernel.
        dropout: dropout rate, or None.
        dropout_layers: one of `kernorm.config.DROPOUT_LAYERS`: "last" (one
            Dropout per block) or "all" (after every conv layer).
        groups: channel groups for "gn".
        sync_bn: "bn" synchronizes its batch statistics across the replicas of
            a `tf.distribute` strategy (see `kernorm.norms.create_norm_layer`).
        architecture: "study" (the study's 4.7k-parameter network, see
            `_study_layers`), "compact" or "small" (depthwise-separable, see
            `_separable_layers`), or "tiny" (see `_tiny_layers`).

    The layers take Keras's global dtype policy (e.g. "mixed_bfloat16"),
    except the logits layer, which always computes in float32 so that the
    softmax and the loss do.

    Returns:
        A `keras.Sequential`. Input `(batch, 28, 28, 1)` raw pixels in 0–255,
        output `(batch, 10)` logits.
    """
    check_choice("architecture", architecture, ARCHITECTURES)
    block = dict(norm=norm, groups=groups, dropout=dropout, dropout_layers=dropout_layers,
                 l1=l1, l2=l2, sync_bn=sync_bn)
    return keras.Sequential([
        keras.Input(INPUT_SHAPE),
        normalize_pixels(),
        *ARCHITECTURES[architecture](block),
    ], name=f"{architecture}_{norm or 'none'}")


@contextlib.contextmanager
def dtype_policy(name):
    """Within the block, new layers take Keras's dtype policy `name`
    ("float32", "mixed_float16", "mixed_bfloat16"); the previous global policy
    comes back afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def weights_digest(model):
    """A short fingerprint of all of `model`'s weights (trainable or not), in order.

    Equal weights give equal digests, so two processes, or a process and a
    saved `.keras` file, can show they hold the same model.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(weight.numpy().astype("float32").tobytes())
    return digest.hexdigest()[:16]


def count_trainable(model):
    """Number of trainable parameters of `model`."""
    return int(sum(w.numpy().size for w in model.trainable_weights))


def with_constant_flatten(model):
    """`model` with each of Keras's `Flatten` layers replaced by kernorm's (`kernorm.layers.Flatten`).

    A model saved before the study network had kernorm's flatten then exports
    without the SHAPE, STRIDED_SLICE and PACK ops that Keras's needs; the
    weights and the outputs stay the same. A model without one is returned as it is.
    """
    if not any(type(layer) is layers.Flatten for layer in model.layers):
        return model
    clone = keras.models.clone_model(model, clone_function=lambda layer: (
        Flatten if type(layer) is layers.Flatten else type(layer)).from_config(layer.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def leaf_layers(model):
    """`model`'s layers, those of the models nested in it in their place, in order."""
    return [leaf for layer in model.layers
            for leaf in (leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])]


def with_batch_of_one(model):
    """`model` behind an input of exactly one image: the same layers and weights, every shape static."""
    inputs = keras.Input(model.input_shape[1:], batch_size=1)
    return keras.Model(inputs, model(inputs), name=model.name)


def load_model(path):
    """Loads a `.keras` model with Keras's safe mode on: nothing is unpickled or run from the file."""
    if not os.path.isfile(path):
        raise KernormError(f"model {path} not found; pass a run folder or a .keras file")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # Keras raises many types for a bad archive; all mean the same to a user
        raise KernormError(f"{path}: not a loadable .keras model ({type(e).__name__}: {e})") from None
