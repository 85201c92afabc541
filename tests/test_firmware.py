"""On a device: `kernorm export --micro --device` builds firmware with TFLM's sources, runs it and measures it.

The builds need TFLM's sources (`KERNORM_TFLM_DIR`, else ../shared/tflm/tflite-micro beside the
repository), `make`, `g++`, and for a Cortex-M Debian's `gcc-arm-none-eabi libnewlib-arm-none-eabi
libstdc++-arm-none-eabi-newlib qemu-system-arm`. Where they are missing the device tests skip, unless
`KERNORM_DEVICE=1` (set by CI) makes that a failure.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_json

from kernorm import firmware
from kernorm.cli import main
from kernorm.errors import KernormError

REPO = pathlib.Path(__file__).resolve().parents[1]
TFLM_DIR = os.environ.get(firmware.TFLM_ENV) or str(REPO.parent / "shared" / "tflm" / "tflite-micro")
# Images each device test runs: the issue asks CI for at least 200 under QEMU.
IMAGES = 200


def setup_or_skip(device):
    """`firmware.check_setup` for `device`; skips the test when a tool or TFLM is missing, unless KERNORM_DEVICE=1."""
    try:
        return firmware.check_setup(device, TFLM_DIR, IMAGES, 10000)
    except KernormError as e:
        if os.environ.get("KERNORM_DEVICE") == "1":
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=["host", "cortex-m4", "cortex-m4-cmsis-nn"])
def device_export(request, exported, tmp_path_factory, data_dir):
    """`exported`'s model exported in int8 with `--micro --device <param>` on IMAGES images: a dict of device,
    export_dir, output (the CLI's)."""
    device = request.param
    setup_or_skip(device)
    out = str(tmp_path_factory.mktemp(device) / "export")
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--micro", "--device", device, "--device-images",
                                       str(IMAGES), "--tflm-dir", TFLM_DIR, "--out", out, "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    return {"device": device, "export_dir": out, "output": result.output}


@pytest.fixture(scope="module")
def tflm_classes(device_export, mnist):
    """TFLM's Python interpreter's classes of the first IMAGES test images, for the exported int8 model."""
    from kernorm import micro

    (_, _), (x_test, _) = mnist
    model = micro.load_tflite(os.path.join(device_export["export_dir"], "model_int8.tflite"))
    return model.logits(x_test[:IMAGES]).argmax(-1)


@pytest.mark.slow
def test_firmware_classifies_as_tflm_and_is_measured(device_export, mnist):
    device, export_dir = device_export["device"], device_export["export_dir"]
    machine = firmware.TARGETS[device].machine
    name = f"firmware_int8_{device}" + (".elf" if machine else "")
    assert {name, firmware.IMAGES_FILE, "model_int8.tflite"} <= set(os.listdir(export_dir))
    record = read_json(export_dir, "export.json")["models"]["int8"]["micro"]["device"]
    assert record["passed"] and record["failure"] is None and record["agreement"] == 1.0
    assert (record["target"], record["qemu_machine"], record["images"], record["firmware"]) == (
        device, machine, IMAGES, name)
    (_, _), (_, y_test) = mnist
    assert 0.8 < record["accuracy"] <= 1
    sections = record["sections"]
    assert record["flash_bytes"] == sections["text"] + sections["data"]
    assert record["ram_bytes"] == sections["data"] + sections["bss"]
    assert 0 < record["arena_used_bytes"] <= record["arena_bytes"]
    if machine:
        # The model's bytes, the arena and TFLM's code all fit; the stack stayed in its reserve, and nothing
        # took memory from the heap (the firmware has no stdio).
        assert record["flash_bytes"] > os.path.getsize(os.path.join(export_dir, "model_int8.tflite")) + 20000
        assert record["ram_bytes"] > record["arena_bytes"]
        assert 0 < record["stack_used_bytes"] < 16384 and record["heap_used_bytes"] == 0
        if firmware.TARGETS[device].kernels:
            # CMSIS-NN's convolutions and kernorm's MEAN: the study's LN network within 10 instructions per MAC.
            assert 1 < record["instructions_per_mac"] < 10
        else:
            # Reference kernels: every MAC takes tens of instructions.
            assert 10 < record["instructions_per_mac"] < 1000
        assert record["instructions_per_inference"] == pytest.approx(record["instructions_per_mac"] * record["macs"],
                                                                     rel=1e-3)
    else:
        assert record["time_us_per_inference"] > 0 and record["instructions_per_inference"] is None
    assert re.search(rf"{device}: {IMAGES} images, agree 100\.00 % with TFLM, acc .* ok", device_export["output"])


@pytest.mark.slow
def test_the_recorded_command_runs_the_firmware_again(device_export, tflm_classes):
    export_dir = device_export["export_dir"]
    record = read_json(export_dir, "export.json")["models"]["int8"]["micro"]["device"]
    result = subprocess.run(shlex.split(record["command"]), cwd=export_dir, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [str(i) for i in range(IMAGES)]
    np.testing.assert_array_equal([int(line.split()[1]) for line in lines[:-1]], tflm_classes)
    assert re.fullmatch(rf"summary images={IMAGES} arena_used_bytes={record['arena_used_bytes']} ticks=\d+ .*",
                        lines[-1])


@pytest.mark.slow
def test_a_second_build_reuses_the_cached_library(device_export, monkeypatch):
    """The export built TFLM's library for the model's ops; asked again, it is found without running make."""
    from kernorm.runtime import graph_ops

    device, export_dir = device_export["device"], device_export["export_dir"]
    with open(os.path.join(export_dir, "model_int8.tflite"), "rb") as f:
        ops = [op["name"] for op in graph_ops(f.read())]

    def refuse(*args, **kwargs):
        raise AssertionError(f"the cached library was built again: {args[0]}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    library, includes = firmware.tflm_library(device, TFLM_DIR, ops)
    assert library.startswith(firmware.cache_dir()) and os.path.isfile(library)
    assert any(flag.endswith("flatbuffers/include") for flag in includes)


@pytest.mark.slow
def test_a_hanging_firmware_is_stopped_with_one_line(device_export, monkeypatch):
    device, export_dir = device_export["device"], device_export["export_dir"]
    record = read_json(export_dir, "export.json")["models"]["int8"]["micro"]["device"]
    monkeypatch.setattr(firmware, "BASE_SECONDS", 0.2)
    monkeypatch.setattr(firmware, "PER_IMAGE_SECONDS", 0)
    with pytest.raises(KernormError, match=rf"the firmware on {device} did not finish {IMAGES} images in 0\.2 s"):
        firmware.run(device, export_dir, record["firmware"], IMAGES, verbose=False)


@pytest.mark.slow
def test_firmware_too_large_for_the_machine_fails_the_model(exported, mnist, monkeypatch):
    setup_or_skip("cortex-m4")
    small = dataclasses.replace(firmware.TARGETS["cortex-m4"], flash_bytes=64 << 10)
    monkeypatch.setitem(firmware.TARGETS, "cortex-m4", small)
    with open(os.path.join(exported["export_dir"], "model_int8.tflite"), "rb") as f:
        flatbuffer = f.read()
    (_, _), (x_test, y_test) = mnist
    record, files = firmware.check("cortex-m4", TFLM_DIR, "model_int8", flatbuffer, 40000, x_test, y_test, 1,
                                   verbose=False)
    assert files == {} and record["passed"] is False and record["firmware"] is None
    assert re.fullmatch(r"the firmware needs [\d,]+ bytes of flash and [\d,]+ of RAM; the mps2-an386 has 65,536 "
                        r"and 4,194,304", record["failure"])


def test_device_requests_that_cannot_be_served_give_one_line(tmp_path, monkeypatch):
    with pytest.raises(KernormError, match=r"unknown --device 'cortex-m99'; choose one of host, cortex-m4, "):
        firmware.check_setup("cortex-m99", TFLM_DIR, 1, 10000)
    with pytest.raises(KernormError, match=r"--device-images 10001: choose between 1 and the 10000 test images"):
        firmware.check_setup("host", TFLM_DIR, 10001, 10000)
    with pytest.raises(KernormError, match=rf"--tflm-dir {tmp_path} is not a TensorFlow Lite Micro folder \(no "
                                           rf"tensorflow/lite/micro/tools/make/Makefile\)"):
        firmware.check_setup("host", str(tmp_path), 1, 10000)
    monkeypatch.delenv(firmware.TFLM_ENV, raising=False)
    with pytest.raises(KernormError, match=r"--device host needs TensorFlow Lite Micro's sources: pass --tflm-dir"):
        firmware.check_setup("host", None, 1, 10000)
    fake_tflm = tmp_path / "tflm"
    for needed in (firmware.MAKEFILE, os.path.join(firmware.DOWNLOADS, "flatbuffers", "include", "x.h")):
        (fake_tflm / needed).parent.mkdir(parents=True, exist_ok=True)
        (fake_tflm / needed).write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no toolchain, no QEMU
    with pytest.raises(KernormError) as error:
        firmware.check_setup("cortex-m4", str(fake_tflm), 1, 10000)
    assert str(error.value) == (f"--device cortex-m4 needs arm-none-eabi-g++, arm-none-eabi-size, make, "
                                f"qemu-system-arm: on Debian or Ubuntu, apt-get install {firmware.PACKAGES}")


def test_device_without_micro_writes_nothing(tmp_path):
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--device", "host", "--out", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.output == "Error: --device host builds the models --micro checks; pass --micro too\n"


@pytest.mark.slow
def test_an_unknown_device_or_a_folder_without_tflm_ends_in_one_line_before_any_file(exported, tmp_path, data_dir):
    out = tmp_path / "e"
    for options, error in ((["--device", "cortex-m99", "--tflm-dir", TFLM_DIR], "Error: unknown --device 'cortex-m99'"),
                           (["--device", "host", "--tflm-dir", str(tmp_path)],
                            f"Error: --tflm-dir {tmp_path} is not a TensorFlow Lite Micro folder")):
        result = CliRunner().invoke(main, ["export", exported["run_dir"], "--micro", "--out", str(out),
                                           "--data-dir", data_dir, *options])
        assert result.exit_code == 1 and not out.exists()
        [line] = result.output.strip().splitlines()
        assert line.startswith(error)


def test_kernels_are_those_of_the_ops_and_an_op_tflm_lacks_is_named():
    setup_or_skip("host")
    kernels = firmware.kernel_sources(TFLM_DIR, ["CONV_2D", "RSQRT", "CONV_2D"])
    assert kernels == [f"{firmware.KERNELS}/{name}" for name in ("conv.cc", "conv_common.cc", "elementwise.cc",
                                                                   "kernel_util.cc")]
    # CMSIS-NN has its own CONV_2D, not RSQRT: the reference kernel stays where it has none.
    assert firmware.kernel_sources(TFLM_DIR, ["CONV_2D", "RSQRT"], "cmsis_nn") == [
        f"{firmware.KERNELS}/{name}" for name in ("cmsis_nn/conv.cc", "conv_common.cc", "elementwise.cc",
                                                   "kernel_util.cc")]
    with pytest.raises(KernormError, match=r"has no kernel for the model's op TOPK_V2; export a model without it"):
        firmware.kernel_sources(TFLM_DIR, ["CONV_2D", "TOPK_V2"])


def test_optimized_targets_register_kernorms_mean_and_the_int8_kernels():
    setup_or_skip("host")
    int8 = {"types": ["int8", "int8"]}
    ops = [dict(int8, name="CONV_2D"), dict(int8, name="MEAN"), dict(int8, name="RSQRT"),
           {"name": "ADD", "types": ["int8", "int8"]}, {"name": "ADD", "types": ["int16", "int16"]}]
    assert firmware.registrations(TFLM_DIR, "cortex-m4", ops) == {}
    # ADD runs on int16 once: it keeps the kernel of every type. RSQRT has no CMSIS-NN kernel.
    registered = firmware.registrations(TFLM_DIR, "cortex-m4-cmsis-nn", ops)
    assert registered == {"MEAN": "kernorm::RegisterMean()", "CONV_2D": "tflite::Register_CONV_2D_INT8()"}
    settings = firmware.model_settings("model_int8", [op["name"] for op in ops], registered)
    assert '#include "mean.h"' in settings
    for line in ("resolver.AddConv2D(tflite::Register_CONV_2D_INT8())", "resolver.AddMean(kernorm::RegisterMean())",
                 "resolver.AddRsqrt()", "resolver.AddAdd()"):
        assert f"  TF_LITE_ENSURE_STATUS({line});\n" in settings
    assert "return AddModelInt8Ops(resolver);" in firmware.model_settings("model_int8", ["CONV_2D"])


def test_images_file_is_mnist_idx():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data = firmware.idx_images(images)
    assert data[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28])
    assert data[16:] == images.tobytes()


def test_the_firmware_sources_are_installed_with_the_package():
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = config["options.package_data"]["kernorm"].split()
    for name in os.listdir(firmware.SOURCES):
        assert any(pathlib.PurePath("firmware", name).match(pattern) for pattern in patterns), name

