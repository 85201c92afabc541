"""Training speed of the study's BN network in float32 and mixed_bfloat16, measured interleaved.

    PYTHONPATH=. python benchmarks/precision.py [ROUNDS] [STEPS]

Builds both models and their compiled training steps as `kernorm.train` does (default strategy,
SGD, batch 128), then times chunks of STEPS steps (default 50) of each in turn for ROUNDS rounds
(default 12), alternating which goes first, so that other jobs on a shared machine slow both alike.
Prints the median images per second of each precision and their ratio.
"""

import statistics
import sys
import time

import keras
import tensorflow as tf

from kernorm.data import load_mnist, make_dataset
from kernorm.models import build_model, dtype_policy
from kernorm.train import make_steps

BATCH = 128
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 12
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
(x_train, y_train), _ = load_mnist()
strategy = tf.distribute.get_strategy()
runners = {}
for precision in ("float32", "mixed_bfloat16"):
    with dtype_policy(precision):
        model = build_model("bn")
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    train_steps, _ = make_steps(model, optimizer, strategy)
    iterator = iter(make_dataset(x_train, y_train, BATCH, shuffle_seed=1).repeat())
    train_steps(iterator, tf.constant(steps))  # trace and warm up
    runners[precision] = (train_steps, iterator)

seconds = {precision: [] for precision in runners}
for i in range(rounds):
    order = list(runners) if i % 2 == 0 else list(reversed(runners))
    for precision in order:
        train_steps, iterator = runners[precision]
        start = time.perf_counter()
        float(train_steps(iterator, tf.constant(steps))[0])  # wait for the result
        seconds[precision].append(time.perf_counter() - start)
speed = {p: steps * BATCH / statistics.median(s) for p, s in seconds.items()}
for precision, images_per_second in speed.items():
    print(f"{precision}: {images_per_second:,.0f} images/s (median of {rounds} chunks of {steps} steps)")
print(f"mixed_bfloat16 / float32: {speed['mixed_bfloat16'] / speed['float32']:.2f}x")
