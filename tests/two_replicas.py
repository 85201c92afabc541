"""Runs in its own process, because TensorFlow splits the CPU into logical devices once per process.

Usage: python tests/two_replicas.py OUT_DIR. Takes one SGD step of the study's network (LN, and BN
with and without synchronized statistics) on one fixed global batch of MNIST under MirroredStrategy
over two CPU replicas, and the same step under the default strategy (one replica), from the same
initial weights (and LN on 5 images, split unevenly); then trains short runs with
`--strategy mirrored --cpu-replicas 2` (float32 and mixed_float16) through `kernorm.train`.
Prints one JSON object for tests/test_replicas.py.
"""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from kernorm.config import TrainConfig
from kernorm.data import load_mnist, make_dataset
from kernorm.distribution import choose_strategy, make_strategy
from kernorm.models import build_model
from kernorm.steps import make_steps
from kernorm.train import train

BATCH = 64
out_dir = sys.argv[1]
mirrored = make_strategy(choose_strategy("mirrored", gpus=[], cpu_replicas=2))
single = make_strategy(choose_strategy("default", gpus=[]))
(x_train, y_train), _ = load_mnist()
batch = next(iter(make_dataset(x_train[:BATCH], y_train[:BATCH], BATCH)))
odd = next(iter(make_dataset(x_train[:5], y_train[:5], 5)))
keras.utils.set_random_seed(1)
initial = {norm: build_model(norm, l2=1e-3).get_weights() for norm in ("ln", "bn")}


def one_step(strategy, norm, sync_bn, batch=batch):
    """The model after one step on `batch` from `initial` weights, trained as kernorm.train trains."""
    with strategy.scope():
        model = build_model(norm, l2=1e-3, sync_bn=sync_bn)
        model.set_weights(initial[norm])
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
        train_steps, _ = make_steps(model, optimizer, strategy)
    data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))
    train_steps(iter(data), tf.constant(1))
    return model


def difference(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a.get_weights(), b.get_weights()))


def first_bn_input(images):
    """What the first BN layer normalizes (conv -> ReLU of block1), with the initial weights."""
    model = build_model("bn")
    model.set_weights(initial["bn"])
    block1 = model.get_layer("block1")
    features = tf.nn.relu(block1.layers[0](model.get_layer("normalize_pixels")(images)))  # the BN applies the ReLU
    return features.numpy().astype("float64")  # exact means for reference


synced = one_step(mirrored, "bn", sync_bn=True)
alone = one_step(single, "bn", sync_bn=False)
features = first_bn_input(batch[0])
runs = {}
# 259 images: the last batch of 3 splits 2 and 1; 257: its 1 image would leave a replica empty.
for precision, limit in (("float32", 259), ("mixed_float16", 257)):
    config = TrainConfig(norm="bn", epochs=1, limit=limit, strategy="mirrored", cpu_replicas=2,
                         precision=precision, out=os.path.join(out_dir, precision))
    runs[precision] = {"metrics": train(config, verbose=False), "files": sorted(os.listdir(config.out))}
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "ln_difference": difference(one_step(mirrored, "ln", False), one_step(single, "ln", False)),
    # 5 images: 3 on one replica, 2 on the other
    "ln_uneven_difference": difference(one_step(mirrored, "ln", False, odd), one_step(single, "ln", False, odd)),
    "bn_difference": difference(synced, alone),
    "bn_unsynchronized_difference": difference(one_step(mirrored, "bn", sync_bn=False), alone),
    "moving_mean": synced.get_layer("block1").layers[1].moving_mean.numpy().tolist(),
    "whole_batch_mean": features.mean(axis=(0, 1, 2)).tolist(),
    "half_batch_means": [features[:BATCH // 2].mean(axis=(0, 1, 2)).tolist(),
                         features[BATCH // 2:].mean(axis=(0, 1, 2)).tolist()],
    "runs": runs,
}))
