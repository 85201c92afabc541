"""Inference benchmark: TFLite exports of trained runs, and Keras against LiteRT.

For each run folder it exports all four quantizations (into a temporary
folder, through `kernorm.export.export`, so the figures are the ones
`kernorm export` reports), then prints Markdown tables:

1. the export targets: int8 accuracy within `TARGET_DROP` points of Keras,
   int8 file smaller than float32, int8 batch-1 latency no worse than
   float32's;
2. every quantization: accuracy, agreement with Keras, size, latency, the op
   count of the converted graph, its DEQUANTIZE ops (in int8: float islands)
   and the pieces XNNPACK runs it in;
3. speed: Keras `predict` and `predict_on_batch`, and LiteRT float32 and int8 at
   batch 1 and batch `BIG_BATCH`, in images/s and µs per image.

Timings are the best of `--rounds` interleaved rounds, to damp the noise of a
shared machine. RUN is a run folder of `kernorm train`; `--data-dir` defaults
to `KERNORM_DATA_DIR`, else Keras's download.

    python benchmarks/inference.py RUN [RUN ...] [--data-dir DIR] [--rounds 3]
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from kernorm.config import ExportConfig
from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.export import LATENCY_IMAGES, THROUGHPUT_BATCH, export, latencies_us, throughput
from kernorm.models import load_model
from kernorm.rundir import load_run
from kernorm.runtime import graph_stats, load_tflite

TARGET_DROP = 0.1  # points
BATCH_1_IMAGES = {"keras": 100, "litert": 2000}  # fewer for Keras, whose predict is slow per call
BIG_BATCH = 256


def speed(model_file, export_dir, x_test, rounds):
    """µs per image at batch 1 (median) and at BIG_BATCH, best over interleaved rounds, per engine."""
    keras_model = load_model(model_file)
    images = x_test[..., None]
    floats = images.astype(np.float32)
    engines = {
        "Keras predict": lambda x: keras_model.predict(x.astype(np.float32), verbose=0),
        # predict() builds a tf.data pipeline per call; predict_on_batch runs the compiled graph directly.
        "Keras predict_on_batch": lambda x: keras_model.predict_on_batch(x.astype(np.float32)),
        "LiteRT float32": load_tflite(os.path.join(export_dir, "model_float32.tflite")).predict,
        "LiteRT int8": load_tflite(os.path.join(export_dir, "model_int8.tflite")).predict,
    }
    best = {name: [np.inf, np.inf] for name in engines}
    for _ in range(rounds):
        for name, predict in engines.items():
            count = BATCH_1_IMAGES["keras" if name.startswith("Keras") else "litert"]
            source = floats if name.startswith("Keras") else images
            one = float(np.median(latencies_us(predict, source[:count])))
            many = 1e6 / throughput(predict, source, BIG_BATCH)[1]
            best[name] = [min(best[name][0], one), min(best[name][1], many)]
    return best


def measure(runs, data_dir, rounds):
    """The rows of the three tables (targets, every quantization, speed) for the run folders `runs`."""
    runs = [load_run(run_dir) for run_dir in runs]  # every folder checked before the long work
    (_, _), (x_test, _) = load_mnist(data_dir)
    targets, models, speeds = [], [], []
    for run in runs:
        norm = run.config.norm
        with tempfile.TemporaryDirectory() as tmp:
            export_dir = os.path.join(tmp, "export")
            report_file = os.path.join(export_dir, "export.json")
            try:
                export(ExportConfig(model=run.path, quantize="all", out=export_dir, data_dir=data_dir),
                       verbose=False)
            except KernormError as e:
                if not os.path.isfile(report_file):
                    raise
                print(f"{norm}: {e}", file=sys.stderr)  # a failed check still leaves its figures
            with open(report_file) as f:
                report = json.load(f)
            m = report["models"]
            for q, f in m.items():
                count, pieces = graph_stats(os.path.join(export_dir, f["file"])) if f["file"] else ({}, 0)
                models.append(f"| {norm} | {q} | {100 * f['tflite_acc']:.2f} | {f['drop_points']:+.2f} | "
                              f"{100 * f['agreement']:.2f} | {f['size_bytes'] / 1024:.1f} | "
                              f"{f['latency_us_p50']:.0f} | {f['latency_us_p99']:.0f} | "
                              f"{f['throughput_ips']:,.0f} | {sum(count.values())} | "
                              f"{count.get('DEQUANTIZE', 0)} | {pieces} |")
            # The target's latency is the speed table's batch-1 median, best of the interleaved rounds.
            times = speed(run.model_file, export_dir, x_test, rounds)
        f32, i8 = m["float32"], m["int8"]
        lat32, lat8 = times["LiteRT float32"][0], times["LiteRT int8"][0]
        met = [i8["drop_points"] <= TARGET_DROP, i8["size_bytes"] < f32["size_bytes"], lat8 <= lat32]
        targets.append(f"| {norm} | {100 * report['keras_acc']:.2f} | {100 * i8['tflite_acc']:.2f} | "
                       f"{i8['drop_points']:+.2f} | {f32['size_bytes']:,} | {i8['size_bytes']:,} | "
                       f"{lat32:.0f} | {lat8:.0f} | {' / '.join('yes' if ok else 'NO' for ok in met)} |")
        for name, (one, many) in times.items():
            speeds.append(f"| {norm} | {name} | {1e6 / one:,.0f} | {one:.0f} | {1e6 / many:,.0f} | {many:.1f} |")
    return targets, models, speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of kernorm train")
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best counts")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        targets, models, speeds = measure(args.runs, args.data_dir, args.rounds)
    except KernormError as e:
        sys.exit(f"Error: {e}")

    print(f"\nTargets (int8 drop <= {TARGET_DROP:g} pt / int8 smaller than float32 / "
          f"int8 batch-1 latency <= float32's)\n")
    print("| norm | Keras acc % | int8 acc % | int8 drop pt | float32 bytes | int8 bytes "
          "| float32 batch-1 µs | int8 batch-1 µs | targets met |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(targets))
    print(f"\nEvery quantization, as kernorm export reports it (latency over {LATENCY_IMAGES:,} test images, "
          f"throughput at batch {THROUGHPUT_BATCH} over all of them)\n")
    print("| norm | model | acc % | drop pt | agree % | KiB | batch-1 p50 µs | p99 µs | img/s | ops "
          "| DEQUANTIZE ops | XNNPACK pieces |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(models))
    print(f"\nSpeed: batch 1 (median) and batch {BIG_BATCH}, best of {args.rounds} rounds\n")
    print(f"| norm | engine | batch-1 img/s | batch-1 µs/img | batch-{BIG_BATCH} img/s | batch-{BIG_BATCH} µs/img |")
    print("|---|---|---|---|---|---|")
    print("\n".join(speeds))


if __name__ == "__main__":
    main()
