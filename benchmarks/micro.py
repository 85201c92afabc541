"""Microcontroller figures: trained runs under TensorFlow Lite Micro, and the microcontrollers they fit.

For each run folder it exports the float32 and int8 models with `--micro`
(through `kernorm.export.export`, into a temporary folder, so the figures are
the ones `kernorm export --micro` records) and prints a Markdown table per
model kind: test accuracy under Keras, LiteRT (XNNPACK) and TFLM, TFLM's
agreement with LiteRT's reference kernels, the tensor arena (and its head: the
tensors' part, the same on any CPU; the rest is TFLM's bookkeeping, smaller on
a 32-bit microcontroller than on this 64-bit host), the flash the model takes,
its multiply-accumulates, and the smallest of `CLASSES` whose RAM holds the
arena and whose flash holds the model. `--data-dir` defaults to
`KERNORM_DATA_DIR`, else Keras's download.

    python benchmarks/micro.py RUN [RUN ...] [--data-dir DIR]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from kernorm.config import ExportConfig
from kernorm.errors import KernormError
from kernorm.export import export
from kernorm.rundir import load_run

# Microcontroller classes by on-chip RAM and flash, in KiB, each with a part that has them.
CLASSES = [(8, 64, "STM32G031K8"), (32, 256, "SAMD21G18 (Arduino Zero)"), (64, 512, "nRF52832"),
           (128, 512, "STM32F411RE"), (256, 1024, "nRF52840 (Arduino Nano 33 BLE Sense)")]
# TFLM's RecordingMicroAllocator prints the arena's head, the tensors planned into it, as this line.
HEAD = re.compile(r"Arena allocation head (\d+) bytes")
_ALLOCATIONS = """
import sys
import numpy as np
from tflite_micro import runtime
interpreter = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
details = interpreter.get_input_details(0)
interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
interpreter.invoke()
interpreter.print_allocations()
"""


def head_bytes(path, arena_bytes):
    """The arena's head of the model at `path`, as TFLM's recording allocator reports it."""
    result = subprocess.run([sys.executable, "-c", _ALLOCATIONS, path, str(arena_bytes)], capture_output=True,
                            text=True, check=True)
    return int(HEAD.search(result.stderr).group(1))


def fits(arena_bytes, flash_bytes):
    """The smallest of `CLASSES` whose RAM holds the arena and whose flash the model, or "none"."""
    for ram, flash, part in CLASSES:
        if arena_bytes <= ram * 1024 and flash_bytes <= flash * 1024:
            return f"{ram} / {flash} KiB ({part})"
    return "none"


def measure(runs, data_dir):
    """The table rows of every run's float32 and int8 model, `{quantize: [row, ...]}`."""
    runs = [load_run(run_dir) for run_dir in runs]  # every folder checked before the long work
    rows = {"int8": [], "float32": []}
    for run in runs:
        label = f"| {run.config.architecture} | {run.config.norm} |"
        with tempfile.TemporaryDirectory() as tmp:
            export_dir = os.path.join(tmp, "export")
            try:
                export(ExportConfig(model=run.path, quantize="all", micro=True, out=export_dir, data_dir=data_dir),
                       verbose=False)
            except KernormError as e:
                if not os.path.isfile(os.path.join(export_dir, "export.json")):
                    raise
                print(f"{run.path}: {e}", file=sys.stderr)  # a failed check still leaves its figures
            with open(os.path.join(export_dir, "export.json")) as f:
                report = json.load(f)
            for quantize, row in rows.items():
                figures = report["models"][quantize]
                tflm = figures["micro"]
                if not figures["file"]:
                    row.append(f"{label} failed: {tflm['failure'] or 'see the export error'} |")
                    continue
                head = head_bytes(os.path.join(export_dir, figures["file"]), tflm["arena_bytes"])
                row.append(f"{label} {100 * report['keras_acc']:.2f} | {100 * figures['tflite_acc']:.2f} | "
                           f"{100 * tflm['acc']:.2f} | {100 * tflm['agreement']:.2f} | "
                           f"{tflm['arena_bytes'] / 1024:.1f} | {head / 1024:.1f} | {tflm['flash_bytes'] / 1024:.1f} | "
                           f"{tflm['macs']:,} | {fits(tflm['arena_bytes'], tflm['flash_bytes'])} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of kernorm train")
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    args = parser.parse_args()
    try:
        rows = measure(args.runs, args.data_dir)
    except KernormError as e:
        sys.exit(f"Error: {e}")
    for quantize, lines in rows.items():
        print(f"\n{quantize}\n")
        print("| network | norm | Keras acc % | LiteRT acc % | TFLM acc % | TFLM agrees with LiteRT reference % "
              "| arena KiB | arena head KiB | flash KiB | MACs | smallest class it fits (RAM / flash) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
