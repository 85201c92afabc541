"""Accuracy of the compact preset: final-epoch test accuracy for 3 norms × 3 seeds, and its int8 export.

Each run is `kernorm train --preset compact --norm NORM --seed SEED` (through
`kernorm.train.train`), in OUT/<norm>-seed<seed>; a finished run of the same
configuration already there is reused. Each final model is then exported to
int8 (`kernorm.export.export`, calibrated on training images) and checked on
the test images with the LiteRT runtime, accepting a drop of at most
`INT8_MAX_DROP` points.

    python benchmarks/accuracy.py [--data-dir DIR] [--out runs/accuracy] [--norms bn,ln,gn] [--seeds 1,2,3]

`--epochs` and `--limit` shrink the runs for a quick check (their figures are
not the preset's); `--data-dir` defaults to `KERNORM_DATA_DIR`, else Keras's
download.

Prints per norm the final-epoch test accuracy of every seed and their median,
the int8 accuracy of every seed and its largest drop, and a last line
`min_median_final_acc=<smallest median over the norms>` (a fraction, as in
`metrics.json`).
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys

from kernorm.config import NORMS, PRESETS, ExportConfig
from kernorm.errors import KernormError, check_choice
from kernorm.export import export
from kernorm.rundir import load_run, why_not_reusable
from kernorm.train import train

INT8_MAX_DROP = 0.1  # points


def final_accuracy(config):
    """Trains `config` unless its finished run is already there; returns its final test accuracy."""
    reason = why_not_reusable(config)
    print(f"{config.run_dir}: " + ("reusing the finished run" if reason is None else f"training ({reason})"),
          flush=True)
    if reason and train(config, overwrite=True, verbose=False)["interrupted"]:
        raise KeyboardInterrupt
    return load_run(config.run_dir).metrics["final_test_acc"]


def int8_accuracy(run_dir, data_dir):
    """The int8 model's LiteRT test accuracy and its drop below Keras, in points; passed or not."""
    config = ExportConfig(model=run_dir, quantize="int8", max_drop=INT8_MAX_DROP, data_dir=data_dir)
    try:
        export(config, overwrite=True, verbose=False)
    except KernormError:  # a drop beyond INT8_MAX_DROP: export.json holds the figures all the same
        pass
    with open(os.path.join(config.out_dir, "export.json")) as f:
        figures = json.load(f)["models"]["int8"]
    return figures["tflite_acc"], figures["drop_points"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    parser.add_argument("--out", default=os.path.join("runs", "accuracy"), help="folder of the run folders")
    parser.add_argument("--norms", default="bn,ln,gn", help="comma-separated norms")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=PRESETS["compact"].epochs, help="epochs per run")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 1,2,3")
    if args.epochs < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--epochs and --limit must be at least 1")
    norms = args.norms.split(",")
    try:
        for norm in norms:
            check_choice("norm", norm, NORMS)
        rows = []
        for norm in norms:
            finals, int8 = [], []
            for seed in seeds:
                config = dataclasses.replace(PRESETS["compact"], norm=norm, seed=seed, epochs=args.epochs,
                                             limit=args.limit, data_dir=args.data_dir,
                                             out=os.path.join(args.out, f"{norm}-seed{seed}"))
                finals.append(final_accuracy(config))
                int8.append(int8_accuracy(config.run_dir, args.data_dir))
            rows.append((norm, finals, int8))
    except KernormError as e:
        sys.exit(f"Error: {e}")

    limit = f", first {args.limit} training images" if args.limit else ""
    print(f"\ncompact preset, {args.epochs} epochs{limit}, final-epoch test accuracy (%), seeds {args.seeds}")
    print(f"| norm | {' | '.join(f'seed {s}' for s in seeds)} | median "
          "| int8 (LiteRT) by seed | largest int8 drop (pt) |")
    print("|---" * (len(seeds) + 4) + "|")
    for norm, finals, int8 in rows:
        print(f"| {norm} | " + " | ".join(f"{100 * a:.2f}" for a in finals)
              + f" | **{100 * statistics.median(finals):.2f}** | "
              + " / ".join(f"{100 * a:.2f}" for a, _ in int8)
              + f" | {max(drop for _, drop in int8):+.2f} |")
    print(f"min_median_final_acc={min(statistics.median(finals) for _, finals, _ in rows):.4f}")


if __name__ == "__main__":
    main()
