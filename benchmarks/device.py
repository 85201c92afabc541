"""Firmware figures: trained runs built with TensorFlow Lite Micro for a Cortex-M4 and run under QEMU.

For each run folder and device it exports the int8 model with `--micro --device` (through
`kernorm.export.export`, into a temporary folder, so the figures are the ones `export.json` records) and
prints one Markdown table: the firmware's flash (text + data) and static RAM (data + bss, the linker
script's 16 KiB stack and 4 KiB heap included), the tensor arena reserved and used on the chip, the
instructions per inference under `qemu-system-arm -icount shift=0` and per multiply-accumulate, and the
time per inference they imply at `--clock-mhz`, an estimate: QEMU counts instructions, not cycles, and a
Cortex-M4 takes one cycle for most, more for loads, multiplies and branches.

    python benchmarks/device.py RUN [RUN ...] [--devices cortex-m4,cortex-m4-cmsis-nn] [--images 100]
        [--clock-mhz 168] [--data-dir DIR] [--tflm-dir DIR]
"""

import argparse
import json
import os
import sys
import tempfile

from kernorm.config import ExportConfig
from kernorm.errors import KernormError
from kernorm.export import export
from kernorm.rundir import load_run


def measure(runs, devices, images, clock_mhz, data_dir, tflm_dir):
    """One table row per run and device."""
    runs = [load_run(run_dir) for run_dir in runs]  # every folder checked before the long work
    rows = []
    for run in runs:
        for device in devices:
            label = f"| {run.config.architecture} | {run.config.norm} | {device} |"
            with tempfile.TemporaryDirectory() as tmp:
                export_dir = os.path.join(tmp, "export")
                try:
                    export(ExportConfig(model=run.path, micro=True, device=device, device_images=images,
                                        tflm_dir=tflm_dir, out=export_dir, data_dir=data_dir), verbose=False)
                except KernormError as e:
                    if not os.path.isfile(os.path.join(export_dir, "export.json")):
                        raise
                    print(f"{run.path}: {e}", file=sys.stderr)  # a failed check still leaves its figures
                with open(os.path.join(export_dir, "export.json")) as f:
                    record = json.load(f)["models"]["int8"]["micro"].get("device")
            if not record or not record["passed"]:
                rows.append(f"{label} failed: {record['failure'] if record else 'see the export error'} |")
                continue
            instructions = record["instructions_per_inference"]
            rows.append(f"{label} {record['flash_bytes']:,} | {record['ram_bytes']:,} | "
                        f"{record['arena_bytes']:,} | {record['arena_used_bytes']:,} | {instructions / 1e6:.1f} M | "
                        f"{record['instructions_per_mac']:.1f} | {instructions / clock_mhz / 1e3:.0f} | "
                        f"{100 * record['agreement']:.0f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of kernorm train")
    parser.add_argument("--devices", default="cortex-m4,cortex-m4-cmsis-nn",
                        help="comma-separated --device names (default: %(default)s)")
    parser.add_argument("--images", type=int, default=100, help="test images per firmware run (default: 100)")
    parser.add_argument("--clock-mhz", type=float, default=168,
                        help="the clock of the time estimate, e.g. an STM32F407's (default: 168)")
    parser.add_argument("--data-dir", default=os.environ.get("KERNORM_DATA_DIR"),
                        help="folder with the four MNIST IDX files (default: $KERNORM_DATA_DIR, else Keras's download)")
    parser.add_argument("--tflm-dir", default=None, help="TFLM's sources (default: $KERNORM_TFLM_DIR)")
    args = parser.parse_args()
    try:
        rows = measure(args.runs, args.devices.split(","), args.images, args.clock_mhz, args.data_dir, args.tflm_dir)
    except KernormError as e:
        sys.exit(f"Error: {e}")
    print(f"| network | norm | device | flash B | static RAM B | arena B | arena used B | instructions per inference "
          f"| per MAC | ms at {args.clock_mhz:g} MHz (estimate) | agrees with TFLM % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
