"""Firmware figures: trained runs built with TensorFlow Lite Micro for a Cortex-M4 and run under QEMU.

For each run folder it converts the int8 model as `kernorm export` does (`kernorm.export.convert`, same
calibration images), measures its arena as `--micro` does, and runs `kernorm.firmware.check` for each device,
the check `--micro --device` runs (so the figures are the ones `export.json` records), without the export's
checks on the 10,000 test images. It prints one Markdown table: the firmware's flash (text + data) and
static RAM (data + bss, the linker script's 16 KiB stack and 4 KiB heap included), the tensor arena reserved
and used on the chip, the
instructions per inference under `qemu-system-arm -icount shift=0` and per multiply-accumulate, and the
time per inference they imply at `--clock-mhz`, an estimate: QEMU counts instructions, not cycles, and a
Cortex-M4 takes one cycle for most, more for loads, multiplies and branches.

    python benchmarks/device.py RUN [RUN ...] [--devices cortex-m4,cortex-m4-cmsis-nn] [--images 100]
        [--clock-mhz 168] [--data-dir DIR] [--tflm-dir DIR]
"""

import argparse
import os
import sys

from kernorm import firmware, micro
from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.export import calibration_images, convert
from kernorm.models import load_model
from kernorm.rundir import load_run

CALIBRATION = 500  # kernorm export's default


def measure(runs, devices, images, clock_mhz, data_dir, tflm_dir):
    """One table row per run and device."""
    runs = [load_run(run_dir) for run_dir in runs]  # every folder checked before the long work
    tflm_dir = [firmware.check_setup(device, tflm_dir, images, 10000) for device in devices][0]
    (x_train, _), (x_test, y_test) = load_mnist(data_dir)
    rows = []
    for run in runs:
        flatbuffer = convert(load_model(os.path.join(run.path, "model.keras")), "int8",
                             calibration_images(x_train, CALIBRATION))
        arena = micro.smallest_arena(flatbuffer) + micro.ARENA_ALIGNMENT
        for device in devices:
            label = f"| {run.config.architecture} | {run.config.norm} | {device} |"
            record, _ = firmware.check(device, tflm_dir, "model_int8", flatbuffer, arena, x_test, y_test, images,
                                       verbose=False)
            if not record["passed"]:
                rows.append(f"{label} failed: {record['failure']} |")
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
