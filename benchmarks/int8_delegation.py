"""Which ways of computing a norm's 1/σ an int8 TFLite model can run inside XNNPACK.

LN and GN divide each image's feature map by its own standard deviation, so
their int8 models hold one op that maps a variance to 1/σ. This script
converts, for each way of writing that op, a small model (conv → x·f(E[x²])
→ conv → global average → dense) to full-integer TFLite with
`kernorm.export.convert`, and prints the op the formulation converted to and
the pieces LiteRT's default XNNPACK delegate runs the graph in: 1 means the
delegate took the whole graph; every op it cannot take splits the graph and
runs in LiteRT's own kernels between pieces. `--data-dir` (training images
to calibrate the int8 ranges) defaults to `KERNORM_DATA_DIR`, else Keras's
download.

    python benchmarks/int8_delegation.py [--data-dir DIR]
"""

import argparse
import os
import sys
import tempfile

import keras
from keras import layers, ops

from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.export import calibration_images, convert
from kernorm.runtime import graph_stats

EPSILON = 1e-5
# f(v) for the per-image mean square v: the ways to 1/sqrt(v + ε), σ itself, and two
# other one-input functions for comparison.
FORMULATIONS = {
    "rsqrt(v + ε) (kernorm's)": lambda v: ops.rsqrt(v + EPSILON),
    "(v + ε) ** -0.5": lambda v: ops.power(v + EPSILON, -0.5),
    "1 / sqrt(v + ε)": lambda v: 1 / ops.sqrt(v + EPSILON),
    "exp(-0.5 · log(v + ε))": lambda v: ops.exp(-0.5 * ops.log(v + EPSILON)),
    "sqrt(v + ε) (σ, not 1/σ)": lambda v: ops.sqrt(v + EPSILON),
    "tanh(v) (not 1/σ)": ops.tanh,
    "sigmoid(v) (not 1/σ)": ops.sigmoid,
}
# Ops every formulation shares; the others are what the formulation converted to.
COMMON_OPS = {"QUANTIZE", "CONV_2D", "MUL", "MEAN", "ADD", "FULLY_CONNECTED", "RESHAPE"}
CALIBRATION_IMAGES = 100


def small_model(f):
    """Raw pixels → conv 8 → x·f(mean of x² over H, W) → conv 8 → global average → dense 10."""
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(8, 3, activation="relu")(layers.Rescaling(1 / 255)(inputs))
    x = x * f(ops.mean(x * x, axis=(1, 2), keepdims=True))
    x = layers.Conv2D(8, 3, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    args = parser.parse_args()
    try:
        (x_train, _), _ = load_mnist(args.data_dir)
    except KernormError as e:
        sys.exit(f"Error: {e}")
    calibration = calibration_images(x_train, CALIBRATION_IMAGES)
    print("| f(v) | op it converts to | DEQUANTIZE ops | XNNPACK pieces |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, f in FORMULATIONS.items():
            path = os.path.join(tmp, "model.tflite")
            with open(path, "wb") as file:
                file.write(convert(small_model(f), "int8", calibration))
            count, pieces = graph_stats(path)
            own = ", ".join(sorted(set(count) - COMMON_OPS - {"DEQUANTIZE"})) or "-"
            print(f"| {name} | {own} | {count.get('DEQUANTIZE', 0)} | {pieces} |", flush=True)


if __name__ == "__main__":
    main()
