"""Where a training step's time goes: the study's network with and without each norm, and one convolution.

Builds the study's network for no norm, bn, ln and gn with kernorm's compiled
training step (`kernorm.steps.make_steps`: default strategy, SGD momentum 0.9,
--l2 5e-6, batch 128, float32), then times `--rounds` chunks (default 5) of
`--steps` steps (default 50) of each, one network after the other. Prints the
median milliseconds per step and images per second of each, then the time of
one 3×3, 10 → 10 channel convolution at 26×26 (the study's second layer),
forward and both gradients, in NHWC and in NCHW, and of kernorm's BN on that
feature map (its C++ ops where they build, else its XLA functions), with the
memory bandwidth it reaches against a NumPy copy's. `--data-dir` defaults to
`KERNORM_DATA_DIR`, else Keras's download.

With `--profile`, it also records `--steps` steps of each network with
TensorFlow's profiler and prints the share of the ops' time by kind
(`OP_KINDS`): convolution forward and both gradients, the norm's ops,
pooling, dense and loss, the optimizer's and the variables' ops, layout
conversions, waiting for the input pipeline, and the rest.

    python benchmarks/step_time.py [--rounds 5] [--steps 50] [--profile] [--data-dir DIR]
"""

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import kernorm  # noqa: F401  first: it asks TensorFlow for oneDNN before TensorFlow loads

# isort: split
import keras
import numpy as np
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from kernorm import native
from kernorm.data import load_mnist, make_dataset
from kernorm.errors import KernormError
from kernorm.models import build_model
from kernorm.norms import normalize_groups
from kernorm.steps import make_steps

BATCH = 128
CALLS = 50
FEATURE_MAP = (BATCH, 26, 26, 10)  # the study's second layer
# The fewest map-sized reads and writes a separate norm can make: its sums and its output
# forward (x read twice, y written), the gradient's sums and dx backward (x and dy read twice,
# dx written).
NORM_PASSES = 8
COPY_BYTES = 64 << 20


# Op kinds of a training step, each by the TensorFlow op types it counts (oneDNN's versions, named
# `_MklNative<type>`, `_Mkl<type>` or `_MklNativeFused<type>`, count as their type).
OP_KINDS = {
    "conv forward": ("Conv2D", "DepthwiseConv2dNative"),
    "conv gradient, input": ("Conv2DBackpropInput", "DepthwiseConv2dNativeBackpropInput"),
    "conv gradient, weights": ("Conv2DBackpropFilter", "DepthwiseConv2dNativeBackpropFilter"),
    "norm forward": ("KernormNormalizeGroups",),
    "norm gradient": ("KernormNormalizeGroupsGrad",),
    "pooling": ("AvgPool", "AvgPoolGrad"),
    "dense and loss": ("MatMul", "SparseSoftmaxCrossEntropyWithLogits", "BiasAdd", "BiasAddGrad"),
    "optimizer and variables": ("ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
                                "AssignSubVariableOp", "ResourceApplyKerasMomentum", "Mul", "AddV2", "Sub",
                                "AddN"),
    "layout conversions": ("Transpose", "Reshape", "_MklToTf", "StridedSlice", "Pack"),
    "waiting for input": ("IteratorGetNext",),
}


def step_runner(norm, x_train, y_train):
    """A function that runs `n` compiled training steps of the study's network with `norm`, warmed up."""
    model = build_model(norm, l2=5e-6)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    train_steps, _ = make_steps(model, optimizer, tf.distribute.get_strategy())
    iterator = iter(make_dataset(x_train, y_train, BATCH, seed=1).repeat())
    train_steps(iterator, tf.constant(5))  # trace, compile and warm up
    return lambda n: train_steps(iterator, tf.constant(n))


def step_seconds(run_steps, rounds, steps):
    """Median seconds per training step over `rounds` chunks of `steps` steps."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_steps(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def op_kind(op_type):
    """The `OP_KINDS` key of a TensorFlow op type, or "other"."""
    for prefix in ("_MklNativeFused", "_MklNative", "_MklFused", "_Mkl"):
        op_type = op_type.removeprefix(prefix)
    return next((kind for kind, types in OP_KINDS.items() if op_type in types), "other")


def op_kind_ms(run_steps, steps):
    """Milliseconds per step of each op kind, summed over TensorFlow's compute threads, for `steps` profiled steps.

    The profiler's events on the `tf_Compute` threads are named "<op name>:<op type>"; the executor's
    own events ("ExecutorState::Process") enclose them and are not counted.
    """
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        run_steps(steps)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and not name.startswith("ExecutorState::"):
                    totals[op_kind(name.rsplit(":", 1)[1])] += event.duration_ps / 1e9 / steps
    return totals


def ms_per_call(function):
    """Milliseconds per call of `function`, after one call to trace and warm it up."""
    function()
    start = time.perf_counter()
    for _ in range(CALLS):
        function()
    return (time.perf_counter() - start) / CALLS * 1000


def conv_ms(data_format):
    shape = FEATURE_MAP if data_format == "NHWC" else (BATCH, 10, 26, 26)
    x, kernel = tf.random.normal(shape), tf.random.normal((3, 3, 10, 10))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, 1, "VALID", data_format=data_format)
        return tape.gradient(y, [x, kernel], output_gradients=tf.ones_like(y))

    return ms_per_call(forward_backward)


def norm_ms():
    x, dy, gamma, beta = tf.random.normal(FEATURE_MAP), tf.random.normal(FEATURE_MAP), tf.ones(10), tf.zeros(10)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, _, _ = normalize_groups(tf.reshape(x, (1, -1, 10)), gamma, beta, 10, 1e-5)
        return tape.gradient(y, [x, gamma, beta], output_gradients=tf.reshape(dy, (1, -1, 10)))

    return ms_per_call(forward_backward)


def copy_gb_per_s():
    source = np.random.rand(COPY_BYTES // 8)
    target = np.empty_like(source)
    return 2 * COPY_BYTES / 1e9 / (ms_per_call(lambda: np.copyto(target, source)) / 1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed chunks of each network")
    parser.add_argument("--steps", type=int, default=50, help="training steps per chunk")
    parser.add_argument("--profile", action="store_true", help="also print the share of each op kind")
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    try:
        (x_train, y_train), _ = load_mnist(args.data_dir)
    except KernormError as e:
        sys.exit(f"Error: {e}")

    print(f"{'norm':<6}{'ms/step':>9}{'img/s':>8}")
    profiles = {}
    for norm in ("none", "bn", "ln", "gn"):
        run_steps = step_runner(norm, x_train, y_train)
        step = step_seconds(run_steps, args.rounds, args.steps)
        print(f"{norm:<6}{step * 1000:>9.1f}{BATCH / step:>8,.0f}", flush=True)
        if args.profile:
            profiles[norm] = op_kind_ms(run_steps, args.steps)
    if profiles:
        print("\nop time by kind, ms per step summed over the compute threads (share of all ops' time)")
        print("| kind | " + " | ".join(profiles) + " |")
        print("|---" * (len(profiles) + 1) + "|")
        for kind in [*OP_KINDS, "other"]:
            print(f"| {kind} | " + " | ".join(f"{ms[kind]:.2f} ({100 * ms[kind] / sum(ms.values()):.0f} %)"
                                            for ms in profiles.values()) + " |")
        print("| all ops | " + " | ".join(f"{sum(ms.values()):.2f}" for ms in profiles.values()) + " |")

    for data_format in ("NHWC", "NCHW"):
        try:
            figure = f"{conv_ms(data_format):.2f} ms"
        except tf.errors.InvalidArgumentError:  # TensorFlow's own CPU kernels (no oneDNN) have no NCHW gradient
            figure = "no CPU kernel without oneDNN"
        print(f"conv 3x3 10->10 at 26x26, batch {BATCH}, forward + gradients, {data_format}: {figure}")
    map_bytes = np.prod(FEATURE_MAP) * 4
    bn_ms = norm_ms()
    print(f"kernorm BN ({'C++ ops' if native.ops() else 'XLA'}) forward + gradients on the same map "
          f"({map_bytes / 1e6:.1f} MB): {bn_ms:.2f} ms, "
          f"{NORM_PASSES} map reads and writes = {NORM_PASSES * map_bytes / 1e6 / bn_ms:.1f} GB/s; "
          f"NumPy copy of {COPY_BYTES >> 20} MiB: {copy_gb_per_s():.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
