"""Variants of the tiny preset on a validation split: the levers its search tried beyond the recipe's options.

Each variant changes one thing of `--preset tiny --norm bn --zoom 0` (`base`: the tiny preset as its search
found it, before it took `--zoom 0.1`) for the process that trains it: the layout
(stem, block 1 and block 2 widths of `kernorm.models._separable_layers`), a full conv at high resolution,
norms without their scale γ, another activation, max- in place of average-pooling, Adam in place of SGD, the
weights averaged over the schedule's tail, BN's statistics recollected after training, augmentation of only
some of the images, a smaller rotation, or a scaling added (`VARIANTS`; the scaling is also kernorm's
`train --zoom`, in one resampling). The `zoom-…` and weight-shared variants change the tiny preset with its
zoom on the 982-parameter network it had until `zoom-dilated-gap-head` became it (`preset-zoom`, `--zoom 0.1`):
a full conv at high resolution, residual connections in block 2, a lower L2 or peak learning rate, the last
epochs trained on un-augmented images, the dense head replaced by a conv,
block 2's 1×1 convolutions grouped or its maps zero-padded, or its later convolutions made one, applied
several times; every kernel trained as a product of factors, the norm before the activation, batches of 64,
distillation from `compact-teacher` (the compact preset on the same split, seed 1; train it first), every
image, training and test, deskewed, a ReLU between each separable conv's depthwise and pointwise halves, the
stem's map pooled at once into a block 2 of four convs (no block 1), or depthwise kernels shared by two, four
or all of a conv's channels, with the parameters saved spent on width, a global maximum in the head, block 2's
kernels dilated in place of the pool before it, a higher peak learning rate, batches of 256, more L2, block 2's
last BN without the γ and β the dense layer could absorb (and with the parameters saved spent on width, the
dense layer without its bias), distillation at a higher temperature, an elastic distortion after the
rotation, shift and zoom, depthwise kernels of rank one or none at all (Wu et al.'s shift) with the parameters
saved spent on width, Nesterov's or a higher momentum, a shorter warm-up, or pairs of the levers that fitted the
training images better: block 2 dilated with the head of a channel a class, dilated with more L2, or a higher
peak learning rate with clean last epochs.
`zoom-over-budget…` widen the network past 1,000 parameters and `zoom-60-epochs` trains it past 30 epochs, to
see what capacity and time give. Only the zoom beat the network it changed on both splits (deskewing on
validation alone; block 2 dilated with the head of a channel a class on validation, and on the test set by
less than five seeds can tell, docs/accuracy.md); the others are not options of kernorm, and this script
keeps the search repeatable. Every run trains deterministically on the first 50,000 training images and is
judged on the last 10,000 (`--validation 10000`), in OUT/<variant>-seed<seed>; a finished run there is reused.
A variant chosen there is then tested with `--validation 0`: trained on all 60,000, judged on the test set
(give it another OUT).

    python benchmarks/tiny_variants.py VARIANT[,VARIANT...] [--seeds 1,2,3] [--out sweeps/tiny-variants]
        [--data-dir DIR] [--jobs 2] [--validation 10000]

Each run trains in a process of its own, since a variant replaces pieces of kernorm for its process.
Prints a markdown table: per variant its parameters, each seed's final-epoch validation (or test) accuracy
(and loss), their mean, and the mean accuracy of the final models on their own un-augmented training images.
"""

import argparse
import concurrent.futures
import dataclasses
import os
import statistics
import subprocess
import sys
import types

# name -> what it changes: "recipe" (fields of the `TrainConfig`), "layout" (stem, block1, block2), "full" (full
# convs between stem and block1), "shared" (block 2 as one separable conv to C1 channels, then one separable conv
# C1 -> C1 applied `times` times, each application with its own norm: (C1, times)),
# "scale" (the norms' γ), "activation" (a Keras activation in place of the ReLU), "pool" ("max"),
# "average_from" (the first epoch whose end weights are averaged; BN's statistics are then recollected),
# "precise_bn" (BN's statistics recollected over the training images after the last epoch),
# "augment_probability", "rotation" (degrees), "zoom" (a scaling by 1 ± up to `zoom` before the rotation and
# shift), "optimizer" ("adam" in place of SGD with momentum), "residual" (block 2's convs add their input where
# the channels match), "clean_from" (the first epoch trained on un-augmented images), "head" ("conv": a linear
# separable conv to the 10 classes, averaged, in place of the dense layer; "gap": no dense layer, block 2's last
# conv has a channel for each class, whose normed average is its logit), "grouped" (block 2 as three
# depthwise convs, each followed by a 1×1 conv to `width` channels in `groups` groups and a channel shuffle:
# (width, groups)), "same_block2" (block 2's convs zero-padded to keep the 11×11 map), "expand" (every kernel
# trained as a product of factors, `expand` times wider inside: `ExpandedConv`), "norm_first" (conv -> norm ->
# activation), "distill" (the loss of `distilling_steps`: (temperature, weight)), "deskew" (every image
# `deskewed` before training and evaluation), "dw_activation" (a ReLU between each separable conv's depthwise
# and pointwise halves), "share_depthwise" (each depthwise kernel serves that many channels, None: all of them:
# `SharedDepthwise`), "head_pool" (`GlobalPool`'s "max" or "avg-max" in place of the global average) and
# "dilated" (no pool between the blocks: block 2's 3×3 kernels dilated by 2 keep its receptive field),
# "lean_head" (block 2's last BN without γ and β), "logit_bias" (False: the dense layer without bias) and
# "elastic" (each augmented image then distorted by `elastic` (alpha, sigma)), "dw_rank1" (each depthwise 3×3
# kernel as a 3×1 kernel then a 1×3 one: rank 1, 6 parameters in place of 9, as EffNet's), "nesterov" (SGD's
# Nesterov momentum), "warmup" (the fraction of the one-cycle schedule's steps that warm up) and "shift" (each
# depthwise conv replaced by `Shift`: no parameters); a layout
# without block 1 pools the stem's map at once.
VARIANTS = {
    "base": {},
    "no-scale": dict(scale=False),
    "no-scale-wider": dict(scale=False, layout=(4, [8, 8], [10, 11, 11])),
    "shallower-late": dict(layout=(4, [8, 10], [12, 12])),
    "deeper-early": dict(layout=(4, [8, 8, 8], [10, 10])),
    "wider-late": dict(layout=(4, [6, 8], [10, 11, 11])),
    "deeper-late": dict(layout=(4, [6], [10, 10, 10, 10])),
    "full-early": dict(layout=(4, [8], [10, 10, 10]), full=[4]),
    "max-pool": dict(pool="max"),
    "average-21": dict(average_from=21),
    "precise-bn": dict(precise_bn=True),
    "leaky-relu": dict(activation="leaky_relu"),
    "silu": dict(activation="silu"),
    "adam": dict(optimizer="adam", recipe=dict(lr=0.01)),
    "augment-half": dict(augment_probability=0.5),
    "rotate-4": dict(rotation=4.0),
    "zoom-10": dict(zoom=0.1),
    "preset-zoom": dict(recipe=dict(zoom=0.1)),  # `--preset tiny`'s recipe on its earlier, 982-parameter network
    "shared-late": dict(recipe=dict(zoom=0.1), shared=(13, 2)),
    "shared-deeper": dict(recipe=dict(zoom=0.1), shared=(12, 3)),
    "zoom-full-early": dict(recipe=dict(zoom=0.1), layout=(4, [8], [10, 10, 10]), full=[4]),
    "zoom-residual": dict(recipe=dict(zoom=0.1), residual=True),
    "zoom-l2-5e-5": dict(recipe=dict(zoom=0.1, l2=5e-5)),
    "zoom-lr-0.05": dict(recipe=dict(zoom=0.1, lr=0.05)),
    "zoom-clean-26": dict(recipe=dict(zoom=0.1), clean_from=26),
    "zoom-clean-29": dict(recipe=dict(zoom=0.1), clean_from=29),
    "zoom-conv-head": dict(recipe=dict(zoom=0.1), layout=(4, [8, 8], [12, 12]), head="conv"),
    "zoom-grouped": dict(recipe=dict(zoom=0.1), grouped=(12, 2)),
    "zoom-same-block2": dict(recipe=dict(zoom=0.1), same_block2=True),
    # over the budget, probes of what capacity gives: 1,036, 1,096 and 1,216 parameters
    "zoom-over-budget-1036": dict(recipe=dict(zoom=0.1), layout=(4, [8, 8], [10, 11, 11])),
    "zoom-over-budget-1096": dict(recipe=dict(zoom=0.1), layout=(4, [8, 9], [11, 11, 11])),
    "zoom-over-budget": dict(recipe=dict(zoom=0.1), layout=(4, [8, 10], [12, 12, 12])),
    "zoom-expanded": dict(recipe=dict(zoom=0.1), expand=4),
    "zoom-expanded-lr-0.05": dict(recipe=dict(zoom=0.1, lr=0.05), expand=4),
    "zoom-norm-first": dict(recipe=dict(zoom=0.1), norm_first=True),
    "zoom-batch-64": dict(recipe=dict(zoom=0.1, batch_size=64, lr=0.05)),
    "zoom-60-epochs": dict(recipe=dict(zoom=0.1, epochs=60)),  # past the 30-epoch budget: a probe
    # `--preset compact` on the same split, the teacher `zoom-distilled` learns from (train it first)
    "compact-teacher": dict(recipe=dict(architecture="compact", epochs=15, l2=2.5e-4)),
    "zoom-distilled": dict(recipe=dict(zoom=0.1), distill=(2.0, 0.5)),
    "zoom-distilled-t4": dict(recipe=dict(zoom=0.1), distill=(4.0, 0.9)),
    "zoom-deskewed": dict(recipe=dict(zoom=0.1), deskew=True),
    "zoom-dw-relu": dict(recipe=dict(zoom=0.1), dw_activation=True),
    "zoom-stem-pool": dict(recipe=dict(zoom=0.1), layout=(8, [], [10, 10, 10, 10])),
    "zoom-stem-pool-l2-2.5e-4": dict(recipe=dict(zoom=0.1, l2=2.5e-4), layout=(8, [], [10, 10, 10, 10])),
    "stem-pool-zoom-0.2": dict(recipe=dict(zoom=0.2), layout=(8, [], [10, 10, 10, 10])),
    "zoom-dw-pairs": dict(recipe=dict(zoom=0.1), share_depthwise=2, layout=(4, [8, 9], [12, 12, 12])),
    "zoom-dw-fours": dict(recipe=dict(zoom=0.1), share_depthwise=4, layout=(4, [10, 12], [12, 12, 12])),
    "zoom-dw-one": dict(recipe=dict(zoom=0.1), share_depthwise=None, layout=(4, [11, 11], [13, 13, 13])),
    "zoom-max-head": dict(recipe=dict(zoom=0.1), head_pool="max"),
    "zoom-avg-max-head": dict(recipe=dict(zoom=0.1), head_pool="avg-max"),
    "zoom-lr-0.2": dict(recipe=dict(zoom=0.1, lr=0.2)),
    "zoom-l2-2e-4": dict(recipe=dict(zoom=0.1, l2=2e-4)),
    "zoom-batch-256": dict(recipe=dict(zoom=0.1, batch_size=256, lr=0.2)),
    "zoom-dilated": dict(recipe=dict(zoom=0.1), dilated=True),
    "zoom-elastic-20": dict(recipe=dict(zoom=0.1), elastic=(20.0, 4.0)),
    "zoom-elastic-34": dict(recipe=dict(zoom=0.1), elastic=(34.0, 4.0)),
    "zoom-gap-head": dict(recipe=dict(zoom=0.1), head="gap", layout=(4, [8, 8], [12, 12, 10])),
    "zoom-gap-head-wide-early": dict(recipe=dict(zoom=0.1), head="gap", layout=(4, [8, 10], [11, 11, 10])),
    "zoom-lean-head": dict(recipe=dict(zoom=0.1), lean_head=True),
    "zoom-lean-head-12": dict(recipe=dict(zoom=0.1), lean_head=True, logit_bias=False,
                              layout=(4, [8, 8], [10, 10, 12])),
    "zoom-dw-rank1": dict(recipe=dict(zoom=0.1), dw_rank1=True),
    "zoom-dw-rank1-wide": dict(recipe=dict(zoom=0.1), dw_rank1=True, layout=(4, [8, 9], [11, 11, 11])),
    "zoom-dw-rank1-wider": dict(recipe=dict(zoom=0.1), dw_rank1=True, layout=(4, [8, 8], [12, 12, 11])),
    "zoom-nesterov": dict(recipe=dict(zoom=0.1), nesterov=True),
    "zoom-momentum-0.95": dict(recipe=dict(zoom=0.1, momentum=0.95)),
    "zoom-warmup-0.05": dict(recipe=dict(zoom=0.1), warmup=0.05),
    "zoom-shift": dict(recipe=dict(zoom=0.1), shift=True, layout=(4, [10, 10], [14, 14, 14])),
    # pairs of the levers that fit the training images better than the preset and validate level with it
    "zoom-dilated-gap-head": dict(recipe=dict(zoom=0.1), dilated=True, head="gap", layout=(4, [8, 8], [12, 12, 10])),
    "zoom-dilated-l2-2e-4": dict(recipe=dict(zoom=0.1, l2=2e-4), dilated=True),
    "zoom-lr-0.2-clean-29": dict(recipe=dict(zoom=0.1, lr=0.2), clean_from=29),
}
def config_of(variant, seed, out, data_dir, validation):
    from kernorm.config import PRESETS
    recipe = {"zoom": 0.0, **VARIANTS[variant].get("recipe", {})}
    return dataclasses.replace(PRESETS["tiny"], norm="bn", seed=seed, validation=validation, deterministic=True,
                               out=os.path.join(out, f"{variant}-seed{seed}"), data_dir=data_dir, **recipe)


def _apply(changes, out):
    """Replaces, for this process, the pieces of kernorm that `changes` (a `VARIANTS` value) names; a teacher
    is read from the run folder `compact-teacher-seed1` in `out`."""
    import keras
    import tensorflow as tf

    from kernorm import data, models, norms, steps, train
    from kernorm import layers as kernorm_layers
    from kernorm.layers import conv_block, conv_layer

    layout = changes.get("layout", (4, [8, 8], [10, 10, 10]))

    def tiny_layers(block):
        block = dict(block, activation=changes.get("activation", "relu"))
        if not layout[1]:  # no block 1: the stem's map pooled at once
            return [conv_block([layout[0]], name="stem", **block), keras.layers.AveragePooling2D(2, name="transition1"),
                    conv_block(layout[2], separable=True, name="block2", **block),
                    keras.layers.GlobalAveragePooling2D(name="pool"), models.dense_logits(block["l1"], block["l2"])]
        stack = models._separable_layers(*layout)(block)
        layer = {k: v for k, v in block.items() if k != "dropout_layers"}  # conv_layer's arguments
        regularizer = models.kernel_regularizer(block["l1"], block["l2"])
        if "shared" in changes:  # [stem, block1, transition, block2, pool]
            channels, times = changes["shared"]
            stack[3] = keras.Sequential(conv_layer(channels, separable=True, **layer)
                                        + [SharedConv(channels, times, layer)], name="block2")
        if changes.get("residual"):
            stack[3] = Residual(layout[1][-1], layout[2], layer, name="block2")
        if changes.get("same_block2"):
            stack[3] = conv_block(layout[2], separable=True, padding="same", name="block2", **block)
        if "grouped" in changes:
            width, groups = changes["grouped"]
            stack[3] = keras.Sequential([piece for _ in range(3) for piece in (
                keras.layers.DepthwiseConv2D(3, use_bias=False, depthwise_regularizer=regularizer),
                keras.layers.Conv2D(width, 1, groups=groups, use_bias=False, kernel_regularizer=regularizer),
                ChannelShuffle(groups),
                norms.create_norm_layer(block["norm"], width, block["groups"], block["sync_bn"], "relu"))],
                name="block2")
        if changes.get("dilated"):  # no pool: block 2 on the 22×22 map, its 3×3 kernels dilated by 2
            stack[2] = keras.layers.Identity(name="transition1")
            stack[3] = keras.Sequential([piece for width in layout[2] for piece in (
                keras.layers.SeparableConv2D(width, 3, dilation_rate=2, use_bias=False,
                                             depthwise_regularizer=regularizer, pointwise_regularizer=regularizer),
                norms.create_norm_layer(block["norm"], width, block["groups"], block["sync_bn"], "relu"))],
                name="block2")
        if changes.get("lean_head"):  # block 2's last BN without γ and β, which the dense layer absorbs
            *first, last = layout[2]
            stack[3] = keras.Sequential(
                [piece for width in first for piece in conv_layer(width, separable=True, **layer)]
                + conv_layer(last, separable=True, **layer)[:1]
                + [norms.BatchNorm(momentum=norms.BN_MOMENTUM, epsilon=norms.EPSILON, input_activation="relu",
                                   center=False, scale=False)], name="block2")
        if changes.get("pool") == "max":  # the transition: [conv_block stem, block1, transition, ...]
            stack[2] = keras.layers.MaxPooling2D(2, name="transition1")
        if "head_pool" in changes:  # the last but one: [..., block2, pool, logits]
            stack[-2] = GlobalPool(changes["head_pool"], name="pool")
        if "full" in changes:
            stack.insert(1, conv_block(changes["full"], name="full", **block))
        if changes.get("head") == "conv":  # the logits: a linear separable conv to 10 channels, averaged
            stack.insert(-2, keras.layers.SeparableConv2D(10, 3, depthwise_regularizer=regularizer,
                                                          pointwise_regularizer=regularizer, name="head"))
        if "expand" in changes:
            stack = expanded_layers(layout, changes["expand"], block)
        return stack

    SharedConv, Residual, ChannelShuffle = shared_conv_class(), residual_class(), channel_shuffle_class()
    GlobalPool = global_pool_class()
    ExpandedConv, ExpandedDense = expanded_classes()

    def expanded_layers(layout, rate, block):
        """The tiny network with every kernel trained as a product of factors (`ExpandedConv`)."""
        def conv(filters, separable):
            return [ExpandedConv(filters, rate, separable, block["l2"]),
                    norms.create_norm_layer(block["norm"], filters, block["groups"], block["sync_bn"], "relu")]

        stem, block1, block2 = layout
        return [keras.Sequential(conv(stem, False), name="stem"),
                keras.Sequential([piece for width in block1 for piece in conv(width, True)], name="block1"),
                keras.layers.AveragePooling2D(2, name="transition1"),
                keras.Sequential([piece for width in block2 for piece in conv(width, True)], name="block2"),
                keras.layers.GlobalAveragePooling2D(name="pool"), models.dense_logits(block["l1"], block["l2"])]
    if changes.get("logit_bias") is False:  # the dense layer without its bias
        models.layers = keras_layers_with(Dense=lambda units, **kwargs: keras.layers.Dense(units, use_bias=False,
                                                                                          **kwargs))
    if changes.get("head") in ("conv", "gap") or "expand" in changes:
        def dense(units, **kwargs):
            if "expand" in changes:  # the logits' kernel as a product of factors too
                return ExpandedDense(units, changes["expand"], kwargs["kernel_regularizer"],
                                     dtype=kwargs["dtype"], name=kwargs["name"])
            # no dense layer: the head's averaged output is the logits
            return keras.layers.Activation("linear", dtype=kwargs["dtype"], name=kwargs["name"])

        models.layers = keras_layers_with(Dense=dense)
    models.ARCHITECTURES["tiny"] = tiny_layers
    if changes.get("dw_activation") or "share_depthwise" in changes or changes.get("dw_rank1") or changes.get("shift"):
        SharedDepthwise, Shift = shared_depthwise_class(), shift_class()

        def separable(filters, kernel_size, padding, use_bias, depthwise_regularizer, pointwise_regularizer):
            if "share_depthwise" in changes:  # each 3×3 kernel serves `share_depthwise` channels (None: all)
                depthwise = [SharedDepthwise(kernel_size, changes["share_depthwise"], padding, depthwise_regularizer)]
            elif changes.get("shift"):
                depthwise = [Shift()]
            elif changes.get("dw_rank1"):  # the 3×3 kernel as a 3×1 kernel then a 1×3 one
                depthwise = [keras.layers.DepthwiseConv2D(shape, padding=padding, use_bias=use_bias,
                                                          depthwise_regularizer=depthwise_regularizer)
                             for shape in ((kernel_size, 1), (1, kernel_size))]
            else:  # a ReLU between each separable conv's depthwise and pointwise halves
                depthwise = [keras.layers.DepthwiseConv2D(kernel_size, padding=padding, use_bias=use_bias,
                                                          depthwise_regularizer=depthwise_regularizer),
                             keras.layers.Activation("relu")]
            return keras.Sequential(depthwise + [
                keras.layers.Conv2D(filters, 1, use_bias=use_bias, kernel_regularizer=pointwise_regularizer)])

        kernorm_layers.layers = keras_layers_with(SeparableConv2D=separable)
    if changes.get("norm_first"):  # conv -> norm -> activation: the norm's β sets each channel's threshold
        create_norm_layer = kernorm_layers.create_norm_layer

        def norm_then_activation(norm, channels, groups, sync_bn, input_activation=None):
            return keras.Sequential([create_norm_layer(norm, channels, groups, sync_bn),
                                     keras.layers.Activation(input_activation)])

        kernorm_layers.create_norm_layer = norm_then_activation
    if changes.get("scale") is False:
        norms.NORMS["bn"] = lambda channels, groups, sync_bn, input_activation: norms.BatchNorm(
            momentum=norms.BN_MOMENTUM, epsilon=norms.EPSILON, synchronized=sync_bn,
            input_activation=input_activation, scale=False)
    if changes.get("optimizer") == "adam":
        train.keras.optimizers.SGD = lambda learning_rate, momentum: keras.optimizers.Adam(learning_rate)
    if changes.get("nesterov"):
        sgd = keras.optimizers.SGD  # the module train builds from is Keras's own: keep the class before replacing it
        train.keras.optimizers.SGD = lambda learning_rate, momentum: sgd(learning_rate, momentum, nesterov=True)
    if "warmup" in changes:
        steps.WARMUP_FRACTION = changes["warmup"]
    if "rotation" in changes:
        data.MAX_ROTATION_DEGREES = changes["rotation"]
    if "augment_probability" in changes:
        augment_all = data.augment

        def augment_some(images, seed):
            kept = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed + 7)
            return tf.where(kept < changes["augment_probability"], augment_all(images, seed), images)

        data.augment = augment_some
    if "zoom" in changes:
        rotate_and_shift = data.augment

        def zoom_then_augment(images, seed):
            # Each image scaled about its centre by 1 ± up to `zoom`: output pixel x reads input pixel
            # x / s + c (1 − 1 / s); then the usual rotation and shift.
            n = tf.shape(images)[0]
            inverse = 1 / tf.random.stateless_uniform([n], seed + 11, 1 - changes["zoom"], 1 + changes["zoom"])
            centre = (tf.cast(tf.shape(images)[1], tf.float32) - 1) / 2
            offset, zeros = centre * (1 - inverse), tf.zeros_like(inverse)
            transform = tf.stack([inverse, zeros, offset, zeros, inverse, offset, zeros, zeros], axis=1)
            zoomed = keras.ops.image.affine_transform(images, transform, interpolation="nearest",
                                                      fill_mode="constant")
            return rotate_and_shift(zoomed, seed)

        data.augment = zoom_then_augment
    if "elastic" in changes:
        rotate_shift_and_zoom = data.augment

        def augment_then_distort(images, seed, zoom=0.0):
            return elastic(rotate_shift_and_zoom(images, seed, zoom), tf.random.experimental.stateless_fold_in(seed, 2),
                           *changes["elastic"])

        data.augment = augment_then_distort
    if changes.get("deskew"):  # every image, training and test, deskewed before the network sees it
        load_mnist = train.load_mnist

        def load_deskewed(*args, **kwargs):
            return [(deskewed(images), labels) for images, labels in load_mnist(*args, **kwargs)]

        train.load_mnist = load_deskewed
    if "distill" in changes:
        train.make_steps = distilling_steps(*changes["distill"], os.path.join(out, "compact-teacher-seed1"))
    if "clean_from" in changes:
        make_dataset = train.make_dataset

        def clean_late(*args, epoch=1, augment_images=False, **kwargs):
            return make_dataset(*args, epoch=epoch, augment_images=augment_images and epoch < changes["clean_from"],
                                **kwargs)

        train.make_dataset = clean_late
    if "average_from" in changes or changes.get("precise_bn"):
        first, average = changes.get("average_from"), []
        train_epoch = train._train_epoch

        def train_and_average(config, setup, backup, epoch, *args):
            result = train_epoch(config, setup, backup, epoch, *args)
            if first and epoch >= first:
                weights, seen = [v.numpy() for v in setup.model.trainable_variables], epoch - first
                average[:] = weights if not seen else [(a * seen + w) / (seen + 1) for a, w in zip(average, weights)]
            if epoch == config.epochs:  # the final epoch is evaluated and saved with these weights and statistics
                for variable, value in zip(setup.model.trainable_variables, average):
                    variable.assign(value)
                _recollect_bn_statistics(setup.model, setup.train_data, config.batch_size)
            return result

        train._train_epoch = train_and_average


def elastic(images, seed, alpha, sigma):
    """Each image of `images` (N, H, W, 1) distorted elastically (Simard et al. 2003): every pixel reads the
    nearest input pixel displaced by a field of uniform noise in ±1, smoothed by a Gaussian of `sigma` pixels
    and scaled by `alpha`; 0 from outside the image."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    radius = int(2 * sigma)
    taps = tf.exp(-tf.range(-radius, radius + 1, dtype=tf.float32) ** 2 / (2 * sigma ** 2))
    kernel = tf.tensordot(taps, taps, axes=0) / tf.reduce_sum(taps) ** 2
    noise = tf.random.stateless_uniform([n, height, width, 2], seed, -1.0, 1.0)
    field = alpha * tf.nn.depthwise_conv2d(noise, tf.tile(kernel[:, :, None, None], [1, 1, 2, 1]), [1, 1, 1, 1],
                                           "SAME")
    rows, cols = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    y = tf.cast(rows, tf.float32)[None] + field[..., 0]
    x = tf.cast(cols, tf.float32)[None] + field[..., 1]
    y, x = tf.cast(tf.round(y), tf.int32), tf.cast(tf.round(x), tf.int32)
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    batch = tf.broadcast_to(tf.range(n)[:, None, None], tf.shape(y))
    index = tf.stack([batch, tf.clip_by_value(y, 0, height - 1), tf.clip_by_value(x, 0, width - 1)], axis=-1)
    return tf.where(inside[..., None], tf.gather_nd(images, index), 0.0)


def keras_layers_with(**replaced):
    """`keras.layers` with the layers named in `replaced` replaced by its functions, for a module of kernorm to
    build from in place of its `layers` (e.g. `Dense=...`)."""
    import keras

    return types.SimpleNamespace(**{**{name: getattr(keras.layers, name) for name in dir(keras.layers)}, **replaced})


def shared_conv_class():
    """`SharedConv`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    from kernorm.layers import conv_layer

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class SharedConv(keras.layers.Layer):
        """One separable 3×3 conv `channels` -> `channels` applied `times` times, each application followed by
        its own norm (which applies the activation), as `conv_layer` builds them. Input and output
        `(batch, H, W, channels)`, H and W two smaller per application."""

        def __init__(self, channels, times, layer, **kwargs):
            super().__init__(**kwargs)
            self.channels, self.times, self.layer = channels, times, layer
            layers = [conv_layer(channels, separable=True, **layer) for _ in range(times)]
            self.conv, self.norms = layers[0][0], [norm for _, norm in layers]

        def call(self, x, training=None):
            for norm in self.norms:
                x = norm(self.conv(x), training=training)
            return x

        def get_config(self):
            return {**super().get_config(), "channels": self.channels, "times": self.times, "layer": self.layer}

    return SharedConv


def residual_class():
    """`Residual`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    from kernorm.layers import conv_layer

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class Residual(keras.layers.Layer):
        """Separable 3×3 convs `in_channels` -> widths[0] -> widths[1] ..., each followed by its norm, as
        `conv_layer` builds them; a conv whose input has its output's channels adds that input, cropped by
        one pixel a side to the conv's "valid" output. Input `(batch, H, W, in_channels)`, output
        `(batch, H - 2n, W - 2n, widths[-1])` for n convs."""

        def __init__(self, in_channels, widths, layer, **kwargs):
            super().__init__(**kwargs)
            self.in_channels, self.widths, self.layer = in_channels, widths, layer
            self.convs = [conv_layer(width, separable=True, **layer) for width in widths]

        def call(self, x, training=None):
            for conv, norm in self.convs:
                y = norm(conv(x), training=training)
                x = y + x[:, 1:-1, 1:-1, :] if x.shape[-1] == y.shape[-1] else y
            return x

        def get_config(self):
            return {**super().get_config(), "in_channels": self.in_channels, "widths": self.widths,
                    "layer": self.layer}

    return Residual


def shared_depthwise_class():
    """`SharedDepthwise`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class SharedDepthwise(keras.layers.Layer):
        """A depthwise conv whose channels share their kernels: channel c is filtered by kernel c // `share`
        (every channel by one kernel when `share` is None), so it trains ⌈C / share⌉ kernels in place of C.
        Initialized as Keras's `DepthwiseConv2D`. Input `(batch, H, W, C)`, output `(batch, H', W', C)`."""

        def __init__(self, kernel_size, share, padding, regularizer, **kwargs):
            super().__init__(**kwargs)
            self.kernel_size, self.share, self.padding = kernel_size, share, padding
            self.regularizer = keras.regularizers.get(regularizer)

        def build(self, input_shape):
            channels = input_shape[-1]
            share = self.share or channels
            self.index = [c // share for c in range(channels)]
            full = (self.kernel_size, self.kernel_size, channels, 1)
            self.kernel = self.add_weight(
                shape=(self.kernel_size, self.kernel_size, -(-channels // share), 1),
                initializer=lambda shape, dtype: keras.initializers.GlorotUniform()(full, dtype)[:, :, :shape[2]],
                regularizer=self.regularizer, name="kernel")

        def call(self, x):
            kernel = keras.ops.take(self.kernel, self.index, axis=2)
            return keras.ops.depthwise_conv(x, kernel, strides=1, padding=self.padding)

        def get_config(self):
            return {**super().get_config(), "kernel_size": self.kernel_size, "share": self.share,
                    "padding": self.padding, "regularizer": keras.regularizers.serialize(self.regularizer)}

    return SharedDepthwise


def shift_class():
    """`Shift`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    # A 3×3 window's offsets, the centre first, then its four neighbours, then the corners: a conv of
    # fewer than nine channels keeps the nearest.
    offsets = [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2), (0, 0), (0, 2), (2, 0), (2, 2)]

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class Shift(keras.layers.Layer):
        """The shift of Wu et al. (2018), a depthwise 3×3 conv with no parameters: channel c is moved by one
        pixel towards the offset c mod 9 of a 3×3 window, and the map cropped to the window's "valid" output.
        The channels come out grouped by offset, an order the pointwise conv after it does not mind.
        Input `(batch, H, W, C)`, output `(batch, H - 2, W - 2, C)`."""

        def call(self, x):
            height, width = x.shape[1] - 2, x.shape[2] - 2
            return keras.ops.concatenate([x[:, dy:dy + height, dx:dx + width, first::9]
                                          for first, (dy, dx) in enumerate(offsets[:x.shape[-1]])], axis=-1)

    return Shift


def global_pool_class():
    """`GlobalPool`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class GlobalPool(keras.layers.Layer):
        """Each channel's maximum over the map (`kind` "max"), or the mean of its maximum and its average
        ("avg-max"). Input `(batch, H, W, C)`, output `(batch, C)`."""

        def __init__(self, kind, **kwargs):
            super().__init__(**kwargs)
            self.kind = kind

        def call(self, x):
            top = keras.ops.max(x, axis=(1, 2))
            return top if self.kind == "max" else (top + keras.ops.mean(x, axis=(1, 2))) / 2

        def get_config(self):
            return {**super().get_config(), "kind": self.kind}

    return GlobalPool


def channel_shuffle_class():
    """`ChannelShuffle`, defined once Keras is imported (in a process that trains or loads a variant)."""
    import keras

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class ChannelShuffle(keras.layers.Layer):
        """ShuffleNet's shuffle: channel g·k + i moves to i·groups + g, so that a grouped conv after a grouped
        conv sees every group. Input and output `(batch, H, W, C)`, C a multiple of `groups`."""

        def __init__(self, groups, **kwargs):
            super().__init__(**kwargs)
            self.groups = groups

        def call(self, x):
            _, h, w, c = x.shape
            x = keras.ops.reshape(x, (-1, h, w, self.groups, c // self.groups))
            return keras.ops.reshape(keras.ops.swapaxes(x, 3, 4), (-1, h, w, c))

        def get_config(self):
            return {**super().get_config(), "groups": self.groups}

    return ChannelShuffle


def deskewed(images):
    """`images` (N, 28, 28) uint8 with each digit's slant removed: a horizontal shear by −μ11/μ02 of its
    second-order central moments about its centre of mass (the deskewing of LeCun et al.'s MNIST tables)."""
    import cv2
    import numpy as np

    out = np.empty_like(images)
    for i, image in enumerate(images):
        moments = cv2.moments(image)
        skew = moments["mu11"] / moments["mu02"] if moments["mu02"] > 1e-2 else 0.0
        centre = moments["m01"] / moments["m00"] if moments["m00"] else 14
        shear = np.float32([[1, skew, -skew * centre], [0, 1, 0]])  # reads x + skew · (y − centre)
        out[i] = cv2.warpAffine(image, shear, (28, 28), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR)
    return out


def distilling_steps(temperature, weight, teacher_dir):
    """`kernorm.steps.make_steps` whose training loss is knowledge distillation (Hinton et al. 2015): (1 −
    `weight`) × the cross-entropy with the labels + `weight` × T² × the cross-entropy with the teacher's
    probabilities at temperature T, both on the model's logits / T, the teacher seeing the same augmented
    images. Evaluation stays plain. The teacher is the final model of the finished run in `teacher_dir`."""
    import keras
    import tensorflow as tf

    from kernorm import steps
    from kernorm.errors import KernormError
    from kernorm.models import load_model
    from kernorm.rundir import load_run

    try:
        teacher = load_model(load_run(teacher_dir).model_file)
    except (KernormError, OSError, ValueError):
        sys.exit(f"{teacher_dir}: no finished teacher run; train the variant compact-teacher (seed 1) first")

    def make(model, optimizer, strategy, label_smoothing=0.0):
        def train_step(images, labels):
            global_batch = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])
            taught = tf.nn.softmax(teacher(images, training=False) / temperature)
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                plain = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                soft = keras.losses.categorical_crossentropy(taught, logits / temperature, from_logits=True)
                per_example = (1 - weight) * plain + weight * temperature ** 2 * soft
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return steps._sums(plain, logits, labels)

        return steps._compile_runner(strategy, train_step), steps.make_steps(model, optimizer, strategy)[1]

    return make


def expanded_classes():
    """`ExpandedConv` and `ExpandedDense`, defined once Keras is imported (in a process that trains or loads a
    variant)."""
    import keras
    from keras import ops

    class ProductRegularizer:
        """The L2 penalty of a kernel that is a product of factors, charged on the product (the kernel the
        trained network uses), not on the factors."""

        def __init__(self, l2, kernel):
            self.l2, self.kernel = l2, kernel

        def __call__(self, _):
            return self.l2 * ops.sum(ops.square(self.kernel()))

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class ExpandedConv(keras.layers.Layer):
        """A 3×3 "valid" conv, full or depthwise-separable, without bias, whose kernels train as products of
        factors (ExpandNets, Guo et al. 2020): a full kernel is a 3×3 conv to `rate`·filters channels times a
        `rate`·filters × filters matrix; a depthwise kernel is `rate` 3×3 filters per channel mixed by a
        per-channel vector; a pointwise kernel is C_in × `rate`·filters times `rate`·filters × filters. The
        products are linear, so the trained layer is a plain `Conv2D` or `SeparableConv2D` with the products as
        kernels: the same parameters as those. Input `(batch, H, W, C_in)`, output
        `(batch, H - 2, W - 2, filters)`."""

        def __init__(self, filters, rate, separable, l2, **kwargs):
            super().__init__(**kwargs)
            self.filters, self.rate, self.separable, self.l2 = filters, rate, separable, l2

        def build(self, input_shape):
            c, wide = input_shape[-1], self.rate * self.filters
            mix = keras.initializers.RandomNormal(stddev=self.rate ** -0.5)
            if self.separable:
                self.depthwise = self.add_weight((3, 3, c, self.rate), "glorot_uniform", name="depthwise",
                                                 regularizer=ProductRegularizer(self.l2, self.depthwise_kernel))
                self.depthwise_mix = self.add_weight((c, self.rate), mix, name="depthwise_mix")
                self.factor = self.add_weight((c, wide), "glorot_uniform", name="pointwise",
                                              regularizer=ProductRegularizer(self.l2, self.kernel))
            else:
                self.factor = self.add_weight((3, 3, c, wide), "glorot_uniform", name="kernel",
                                              regularizer=ProductRegularizer(self.l2, self.kernel))
            self.mix = self.add_weight((wide, self.filters), "glorot_uniform", name="kernel_mix")

        def depthwise_kernel(self):
            return ops.expand_dims(ops.sum(self.depthwise * self.depthwise_mix, axis=-1), -1)

        def kernel(self):
            kernel = ops.tensordot(self.factor, self.mix, 1)
            return ops.reshape(kernel, (1, 1, *kernel.shape)) if self.separable else kernel

        def call(self, x):
            if self.separable:
                return ops.separable_conv(x, self.depthwise_kernel(), self.kernel(), padding="valid")
            return ops.conv(x, self.kernel(), padding="valid")

        def get_config(self):
            return {**super().get_config(), "filters": self.filters, "rate": self.rate,
                    "separable": self.separable, "l2": self.l2}

    @keras.saving.register_keras_serializable(package="tiny_variants")
    class ExpandedDense(keras.layers.Layer):
        """A dense layer whose kernel trains as a C_in × `rate`·units times `rate`·units × units product, with a
        bias: a plain `Dense` once trained. Input `(batch, C_in)`, output `(batch, units)`."""

        def __init__(self, units, rate, regularizer, **kwargs):
            super().__init__(**kwargs)
            self.units, self.rate = units, rate
            self.l2 = regularizer.l2 if regularizer is not None else 0.0

        def build(self, input_shape):
            wide = self.rate * self.units
            self.factor = self.add_weight((input_shape[-1], wide), "glorot_uniform", name="kernel",
                                          regularizer=ProductRegularizer(self.l2, self.kernel))
            self.mix = self.add_weight((wide, self.units), "glorot_uniform", name="kernel_mix")
            self.bias = self.add_weight((self.units,), "zeros", name="bias")

        def kernel(self):
            return ops.matmul(self.factor, self.mix)

        def call(self, x):
            return ops.matmul(x, self.kernel()) + self.bias

        def get_config(self):
            return {**super().get_config(), "units": self.units, "rate": self.rate, "regularizer": None}

    return ExpandedConv, ExpandedDense


def _recollect_bn_statistics(model, train_data, batch_size):
    """Sets each BN layer's moving statistics to the average of its batch statistics over the (un-augmented)
    training images, in place of the moving average of the last batches that training leaves."""
    from kernorm.data import make_dataset
    from kernorm.norms import BN_MOMENTUM, BatchNorm

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, BatchNorm)]
    for seen, (images, _) in enumerate(make_dataset(*train_data, batch_size)):
        for layer in layers:
            layer.momentum = seen / (seen + 1)  # moving ← (seen · moving + batch) / (seen + 1)
        model(images, training=True)
    for layer in layers:
        layer.momentum = BN_MOMENTUM


def train_one(variant, seed, out, data_dir, validation):
    from kernorm.train import train

    _apply(VARIANTS[variant], out)
    train(config_of(variant, seed, out, data_dir, validation), verbose=False)  # resumes an unfinished run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default=os.path.join("sweeps", "tiny-variants"))
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--validation", type=int, default=10000,
                        help="training images held out to judge on; 0 trains on all and judges on the test set")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one run
    args = parser.parse_args()
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose of {', '.join(VARIANTS)}")
    if args.one:
        return train_one(variants[0], seeds[0], args.out, args.data_dir, args.validation)

    from kernorm.rundir import load_run, why_not_reusable

    pending = [(v, s) for v in variants for s in seeds
               if why_not_reusable(config_of(v, s, args.out, args.data_dir, args.validation)) is not None]
    child = [sys.executable, os.path.abspath(__file__), "--one", "--out", args.out,
             "--validation", str(args.validation)] + (
        ["--data-dir", args.data_dir] if args.data_dir else [])
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda run: subprocess.run(child + [run[0], "--seeds", str(run[1])]).returncode,
                              pending))
    failed = [f"{variant}-seed{seed}" for (variant, seed), code in zip(pending, codes) if code]
    if failed:
        sys.exit(f"run(s) {', '.join(failed)} failed (their errors are above); run the command again to resume them")

    judged = "val" if args.validation else "test"
    print("| variant | params | " + " | ".join(f"seed {s} {judged} acc % (loss)" for s in seeds)
          + f" | mean {judged} acc % | mean train acc % |")
    print("|---|---|" + "---|" * (len(seeds) + 2))
    from kernorm.data import load_mnist, split_validation

    train_data, _ = split_validation(*load_mnist(args.data_dir)[0], args.validation)
    # a variant's layers, for loading its model
    shared_conv_class(), residual_class(), channel_shuffle_class(), expanded_classes(), shared_depthwise_class(),
    global_pool_class(), shift_class()
    for variant in variants:
        runs = [load_run(config_of(variant, s, args.out, args.data_dir, args.validation).run_dir) for s in seeds]
        finals = [run.history[-1] for run in runs]
        cells = [f"{100 * row[judged + '_acc']:.2f} ({row[judged + '_loss']:.4f})" for row in finals]
        mean = statistics.mean(100 * row[judged + "_acc"] for row in finals)
        images = deskewed(train_data[0]) if VARIANTS[variant].get("deskew") else train_data[0]
        fit = statistics.mean(training_accuracy(run, images, train_data[1]) for run in runs)
        print(f"| {variant} | {runs[0].metrics['params']:,} | " + " | ".join(cells) + f" | {mean:.2f} | {fit:.2f} |")


def training_accuracy(run, images, labels):
    """The percentage of its own (un-augmented) training images, `images` and `labels`, that a run's final
    model classifies right: how far the network fits what it was trained on."""
    from kernorm.models import load_model
    from kernorm.reports import predict_probs

    return 100 * (predict_probs(load_model(run.model_file), images).argmax(1) == labels).mean()


if __name__ == "__main__":
    main()
