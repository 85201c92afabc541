"""Training speed of the study's BN network in float32 and mixed_bfloat16, measured interleaved.

Builds both models and their compiled training steps as `kernorm.train` does
(`kernorm.steps.make_steps`: default strategy, SGD, batch 128), then times
chunks of `--steps` steps (default 50) of each in turn for `--rounds` rounds
(default 12), alternating which goes first, so that other jobs on a shared
machine slow both alike. `--data-dir` defaults to `KERNORM_DATA_DIR`, else
Keras's download.

    python benchmarks/precision.py [--rounds 12] [--steps 50] [--data-dir DIR]

Prints the median images per second of each precision and their ratio.
"""

import argparse
import os
import statistics
import sys
import time

import kernorm  # noqa: F401  first: it asks TensorFlow for oneDNN before TensorFlow loads

# isort: split
import keras
import tensorflow as tf

from kernorm.data import load_mnist, make_dataset
from kernorm.errors import KernormError
from kernorm.models import build_model, dtype_policy
from kernorm.steps import make_steps

BATCH = 128
PRECISIONS = ("float32", "mixed_bfloat16")


def runners(x_train, y_train, steps):
    """Per precision, the compiled training step and its endless batch iterator, traced and warmed up."""
    strategy = tf.distribute.get_strategy()
    built = {}
    for precision in PRECISIONS:
        with dtype_policy(precision):
            model = build_model("bn")
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        train_steps, _ = make_steps(model, optimizer, strategy)
        iterator = iter(make_dataset(x_train, y_train, BATCH, seed=1).repeat())
        train_steps(iterator, tf.constant(steps))  # trace and warm up
        built[precision] = (train_steps, iterator)
    return built


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed chunks of each precision")
    parser.add_argument("--steps", type=int, default=50, help="training steps per chunk")
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    try:
        (x_train, y_train), _ = load_mnist(args.data_dir)
    except KernormError as e:
        sys.exit(f"Error: {e}")
    built = runners(x_train, y_train, args.steps)

    seconds = {precision: [] for precision in built}
    for i in range(args.rounds):
        order = list(built) if i % 2 == 0 else list(reversed(built))
        for precision in order:
            train_steps, iterator = built[precision]
            start = time.perf_counter()
            float(train_steps(iterator, tf.constant(args.steps))[0])  # wait for the result
            seconds[precision].append(time.perf_counter() - start)
    speed = {p: args.steps * BATCH / statistics.median(s) for p, s in seconds.items()}
    for precision, images_per_second in speed.items():
        print(f"{precision}: {images_per_second:,.0f} images/s "
              f"(median of {args.rounds} chunks of {args.steps} steps)")
    print(f"mixed_bfloat16 / float32: {speed['mixed_bfloat16'] / speed['float32']:.2f}x")


if __name__ == "__main__":
    main()
