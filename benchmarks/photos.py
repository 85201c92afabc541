"""Accuracy of `kernorm predict` on the photo test set: per effect, single digits overall, numbers read whole.

Each single-digit photo is read as `kernorm predict MODEL PHOTO` reads it
(`kernorm.images.load_digit`), each number photo as `kernorm predict MODEL
PHOTO --digits` does (`load_digits`, no limit on the count). A photo whose
reading ends in an error counts as wrong. Beside each figure stands the
model's accuracy on the same MNIST test digits unphotographed: what the photo
pipeline could reach at best. The time is the pipeline's per photo (the model
excluded), the mean over the set.

    python benchmarks/photos.py MODEL.tflite [--photos tests/data/photos] [--data-dir DIR]

PHOTOS is a folder written by `benchmarks/make_photos.py`; `--data-dir`
defaults to `KERNORM_DATA_DIR`, else Keras's download. Prints a Markdown table.
"""

import argparse
import collections
import csv
import os
import sys
import time

import numpy as np

from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.images import load_digit, load_digits
from kernorm.runtime import load_tflite


def read(model, path, number):
    """The digits `kernorm predict` reads in `path` as a string ("" after an error), and the seconds taken."""
    start = time.perf_counter()
    try:
        crops = load_digits(path, model.predict) if number else load_digit(path)[None]
    except KernormError:
        return "", time.perf_counter() - start
    seconds = time.perf_counter() - start
    return "".join(str(p) for p in model.predict(crops).argmax(-1)), seconds


def measure(model, folder, x_test):
    """Per photo kind (an effect, or "numbers"): [photos read right, same digits read right unphotographed, total].

    Also returns the mean seconds per photo.
    """
    with open(os.path.join(folder, "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    counts, seconds = collections.defaultdict(lambda: [0, 0, 0]), []
    for row in rows:
        number = row["file"].startswith("number")
        reading, took = read(model, os.path.join(folder, row["file"]), number)
        digits = x_test[[int(i) for i in row["mnist_test_indices"].split()]]
        plain = "".join(str(p) for p in model.predict(digits).argmax(-1))
        count = counts["numbers" if number else row["effect"]]
        count[0] += reading == row["label"]
        count[1] += plain == row["label"]
        count[2] += 1
        seconds.append(took)
    return counts, float(np.mean(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", metavar="MODEL.tflite")
    parser.add_argument("--photos", default=os.path.join("tests", "data", "photos"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    try:
        model = load_tflite(args.model)
        (_, _), (x_test, _) = load_mnist(args.data_dir)
        counts, seconds = measure(model, args.photos, x_test)
    except (KernormError, OSError) as e:
        sys.exit(f"error: {e}")

    def cells(right, plain, total):
        return f"{right}/{total} ({100 * right / total:.1f} %) | {plain}/{total} ({100 * plain / total:.1f} %)"

    singles = np.sum([c for kind, c in counts.items() if kind != "numbers"], axis=0)
    print("| photos | read right | the same MNIST digits, unphotographed |\n| --- | --- | --- |")
    for kind, count in counts.items():
        if kind != "numbers":
            print(f"| {kind} | {cells(*count)} |")
    print(f"| **single digits, all effects** | {cells(*singles)} |")
    if "numbers" in counts:
        print(f"| **numbers, read whole** | {cells(*counts['numbers'])} |")
    print(f"\n{1000 * seconds:.1f} ms per photo to find and fit its digits (mean, model excluded)")


if __name__ == "__main__":
    main()
