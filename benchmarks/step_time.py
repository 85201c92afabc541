"""Where a training step's time goes: the study's network with and without each norm, and one convolution.

    PYTHONPATH=. python benchmarks/step_time.py [ROUNDS] [STEPS]

Builds the study's network for no norm, bn, ln and gn with kernorm's compiled
training step (`kernorm.train.make_steps`: default strategy, SGD momentum 0.9,
--l2 5e-6, batch 128, float32), then times ROUNDS chunks (default 5) of STEPS
steps (default 50) of each, one network after the other. Prints the median
milliseconds per step and images per second of each, then the time of one 3×3,
10 → 10 channel convolution at 26×26 (the study's second layer), forward and
both gradients, in NHWC and in NCHW.
"""

import statistics
import sys
import time

import keras
import tensorflow as tf

from kernorm.data import load_mnist, make_dataset
from kernorm.models import build_model
from kernorm.train import make_steps

BATCH = 128
CONV_CALLS = 50
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
(x_train, y_train), _ = load_mnist()


def step_seconds(norm):
    """Median seconds per training step of the study's network with `norm`, over `rounds` chunks."""
    model = build_model(norm, l2=5e-6)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    train_steps, _ = make_steps(model, optimizer, tf.distribute.get_strategy())
    iterator = iter(make_dataset(x_train, y_train, BATCH, shuffle_seed=1).repeat())
    train_steps(iterator, tf.constant(steps))  # trace, compile and warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        train_steps(iterator, tf.constant(steps))
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


print(f"{'norm':<6}{'ms/step':>9}{'img/s':>8}")
for norm in ("none", "bn", "ln", "gn"):
    step = step_seconds(norm)
    print(f"{norm:<6}{step * 1000:>9.1f}{BATCH / step:>8,.0f}", flush=True)


def conv_ms(data_format):
    shape = (BATCH, 26, 26, 10) if data_format == "NHWC" else (BATCH, 10, 26, 26)
    x, kernel = tf.random.normal(shape), tf.random.normal((3, 3, 10, 10))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, 1, "VALID", data_format=data_format)
        return tape.gradient(y, [x, kernel], output_gradients=tf.ones_like(y))

    forward_backward()
    start = time.perf_counter()
    for _ in range(CONV_CALLS):
        forward_backward()
    return (time.perf_counter() - start) / CONV_CALLS * 1000


for data_format in ("NHWC", "NCHW"):
    print(f"conv 3x3 10->10 at 26x26, batch {BATCH}, forward + gradients, {data_format}: "
          f"{conv_ms(data_format):.2f} ms")
