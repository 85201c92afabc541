"""Firmware: an exported model built with TensorFlow Lite Micro (TFLM) for a device, run there and measured.

`check` compiles TFLM's library for a target (`TARGETS`) from a TFLM source
folder, once, into a cache beside kernorm's C++ norm ops (`kernorm.native`):
`$XDG_CACHE_HOME/kernorm` (default `~/.cache/kernorm`), with only the kernels
of the model's ops. It then links the firmware of the C++ sources in
`kernorm/firmware/` (one small file per job, as TFLM's person_detection
example) with the model's source and header (`kernorm.micro.c_sources`),
runs it on test images (a Cortex-M under `qemu-system-arm -icount shift=0`,
which executes one instruction per nanosecond of emulated time, so the
board's clock counts instructions) and compares each class with TFLM's
Python interpreter's.
"""

import dataclasses
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np

from kernorm.errors import KernormError
from kernorm.files import atomic_path, write_bytes, write_text

TFLM_ENV = "KERNORM_TFLM_DIR"
SOURCES = os.path.join(os.path.dirname(__file__), "firmware")
# Debian's packages of the Cortex-M toolchain and of QEMU.
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi libstdc++-arm-none-eabi-newlib qemu-system-arm"
MAKEFILE = "tensorflow/lite/micro/tools/make/Makefile"
KERNELS = "tensorflow/lite/micro/kernels"
DOWNLOADS = "tensorflow/lite/micro/tools/make/downloads"
# The firmware's sources, besides platform_<target>.cc and the model's.
APP_SOURCES = ["main.cc", "main_functions.cc", "image_provider.cc", "output_responder.cc", "print.cc", "mean.cc"]
# kernorm's own kernels in kernorm/firmware/, by op: the header and the registration, for a target's `own_kernels`.
OWN_KERNELS = {"MEAN": ("mean.h", "kernorm::RegisterMean()")}
# The images file the firmware reads, MNIST's IDX format, written into the export folder beside it.
IMAGES_FILE = "device_images.idx"
# Seconds QEMU or the host program may take: this much, plus PER_IMAGE_SECONDS for each image.
BASE_SECONDS = 60
PER_IMAGE_SECONDS = 2.0
_JOBS = 2
# Optimization and warnings of the firmware's own C++ (TFLM's library keeps its Makefile's).
_APP_FLAGS = ["-Os", "-Wall", "-Wextra", "-ffunction-sections", "-fdata-sections", "-DTF_LITE_STATIC_MEMORY"]
_CXX_FLAGS = ["-std=c++17", "-fno-rtti", "-fno-exceptions", "-fno-threadsafe-statics"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A device kernorm builds firmware for.

    Attributes:
        toolchain: the GNU tools' prefix, e.g. "arm-none-eabi-" ("" for this machine's).
        arch: TFLM's `TARGET_ARCH`, e.g. "cortex-m4" ("" for this machine's).
        flags: the compiler flags of both TFLM's library and the firmware.
        platform: `kernorm/firmware/platform_<platform>.cc` (and `startup_<platform>.c` when it exists).
        kernels: TFLM's `OPTIMIZED_KERNEL_DIR` ("" for its reference kernels).
        build_type: TFLM's `BUILD_TYPE`; "release" strips its error strings.
        own_kernels: ops that run kernorm's kernel (`OWN_KERNELS`) rather than TFLM's.
        int8_kernels: register an op whose tensors are all int8 with TFLM's `Register_<OP>_INT8()` where
            the optimized kernels have one: it links the int8 code alone, not every type's.
        machine: the QEMU machine it runs on (None: runs on this machine).
        linker_script: in `kernorm/firmware/`, for a QEMU machine.
        flash_bytes, ram_bytes: the machine's memory, which the firmware must fit.
    """

    toolchain: str = ""
    arch: str = ""
    flags: tuple = ()
    platform: str = "host"
    kernels: str = ""
    build_type: str = "default"
    own_kernels: tuple = ()
    int8_kernels: bool = False
    machine: str | None = None
    linker_script: str | None = None
    flash_bytes: int | None = None
    ram_bytes: int | None = None


_CORTEX_M4 = dict(toolchain="arm-none-eabi-", arch="cortex-m4", platform="cortex_m", machine="mps2-an386",
                  linker_script="mps2_an386.ld", flash_bytes=4 << 20, ram_bytes=4 << 20,
                  flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-funsigned-char",
                         "-mlittle-endian", "-fomit-frame-pointer", "-DTF_LITE_MCU_DEBUG_LOG"))
TARGETS = {
    "host": Target(),
    # TFLM's reference kernels: the C++ its Python interpreter runs.
    "cortex-m4": Target(**_CORTEX_M4),
    # Arm's CMSIS-NN kernels where TFLM has them and kernorm's MEAN, in TFLM's release build.
    # CMSIS_NN: TFLM's headers then declare CMSIS-NN's int8-only registrations.
    "cortex-m4-cmsis-nn": Target(**dict(_CORTEX_M4, flags=_CORTEX_M4["flags"] + ("-DCMSIS_NN",)), kernels="cmsis_nn",
                                 build_type="release", own_kernels=("MEAN",), int8_kernels=True),
}


def cache_dir():
    """kernorm's build cache, shared with `kernorm.native`: `$XDG_CACHE_HOME/kernorm`, default `~/.cache/kernorm`."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kernorm")


def check_setup(device, tflm_dir, images, available):
    """Checks, before any work, that firmware can be built and run for `device`.

    Args:
        device: a name in `TARGETS`.
        tflm_dir: TFLM's source folder (a tflite-micro checkout with its Makefile's downloads), or None
            for `$KERNORM_TFLM_DIR`.
        images: how many test images the firmware is to classify.
        available: how many test images there are.

    Returns:
        The TFLM folder, absolute. An unknown device, a bad image count, a missing folder or tool raises
        `KernormError`.
    """
    if device not in TARGETS:
        raise KernormError(f"unknown --device {device!r}; choose one of {', '.join(TARGETS)}")
    if not 1 <= images <= available:
        raise KernormError(f"--device-images {images}: choose between 1 and the {available} test images")
    target = TARGETS[device]
    tflm_dir = tflm_dir or os.environ.get(TFLM_ENV)
    if not tflm_dir:
        raise KernormError(f"--device {device} needs TensorFlow Lite Micro's sources: pass --tflm-dir or set "
                           f"{TFLM_ENV} (a tflite-micro checkout, see the README)")
    for needed in (MAKEFILE, os.path.join(DOWNLOADS, "flatbuffers", "include")):
        if not os.path.exists(os.path.join(tflm_dir, needed)):
            raise KernormError(f"--tflm-dir {tflm_dir} is not a TensorFlow Lite Micro folder (no {needed}); pass a "
                               f"tflite-micro checkout whose Makefile's downloads are in place")
    tools = [target.toolchain + "g++", target.toolchain + "size", "make"]
    if target.machine:
        tools.append("qemu-system-arm")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise KernormError(f"--device {device} needs {', '.join(missing)}: on Debian or Ubuntu, "
                           f"apt-get install {PACKAGES if target.machine else 'g++ make'}")
    return os.path.abspath(tflm_dir)


def kernel_sources(tflm_dir, ops, optimized=""):
    """TFLM's kernel sources that a graph of `ops` needs, relative to `tflm_dir`.

    Each op's kernel is the file that defines its `Register_<OP>()`, with its `<file>_common.cc` when
    there is one, and `kernel_util.cc`, which every kernel uses. With `optimized`, that folder's file of
    the same name replaces the reference kernel where it has one, as TFLM's Makefile does for its
    `OPTIMIZED_KERNEL_DIR`: the Makefile cannot do it here, since a list of sources given on its command
    line overrides the one it would specialize.

    Args:
        tflm_dir: TFLM's source folder.
        ops: op names as `kernorm.runtime.graph_ops` gives them, e.g. "CONV_2D".
        optimized: a folder of `tensorflow/lite/micro/kernels`, e.g. "cmsis_nn"; "" for the reference kernels.

    Returns:
        The sorted paths. An op no kernel registers raises `KernormError`.
    """
    folder = os.path.join(tflm_dir, KERNELS)
    texts = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".cc") and not name.endswith("_test.cc"):
            with open(os.path.join(folder, name)) as f:
                texts[name] = f.read()
    sources = {"kernel_util.cc"}
    for op in sorted(set(ops)):
        found = [name for name, text in texts.items() if re.search(rf"\bRegister_{op}\(\)\s*{{", text)]
        if not found:
            raise KernormError(f"TensorFlow Lite Micro in {tflm_dir} has no kernel for the model's op {op}; "
                               f"export a model without it")
        stem = found[0][:-len(".cc")]
        sources.update(name for name in (found[0], f"{stem}_common.cc") if name in texts)
    return [f"{KERNELS}/{optimized}/{name}" if optimized and os.path.exists(os.path.join(folder, optimized, name))
            else f"{KERNELS}/{name}" for name in sorted(sources)]


def _source_tree(tflm_dir, folder, target_name, target):
    """A writable copy of TFLM's folder made of links to its files, with kernorm's target file added.

    TFLM's Makefile reads a target's flags from `targets/<TARGET>_makefile.inc` inside the TFLM folder,
    which may be read-only; the links cost no copy.
    """
    tree = os.path.join(folder, "src")
    if not os.path.isdir(tree):
        staging = tempfile.mkdtemp(dir=folder)
        shutil.copytree(tflm_dir, os.path.join(staging, "src"), copy_function=os.symlink)
        for root, _, _ in os.walk(os.path.join(staging, "src")):
            os.chmod(root, 0o755)  # copytree keeps a read-only folder's mode
        os.replace(os.path.join(staging, "src"), tree)
        os.rmdir(staging)
    if target.toolchain:
        flags = " ".join(target.flags)
        write_text(os.path.join(tree, "tensorflow/lite/micro/tools/make/targets", f"{target_name}_makefile.inc"),
                   f"# Written by kernorm.firmware.\nTARGET_TOOLCHAIN_PREFIX := {target.toolchain}\n"
                   f"CXXFLAGS += {flags}\nCCFLAGS += {flags}\n")
    return tree


def _make_arguments(device, target, kernels, gendir):
    arguments = [f"BASE_GENDIR={gendir}", f"BUILD_TYPE={target.build_type}", "MICROLITE_CC_SIGNAL_KERNEL_SRCS=",
                 f"MICROLITE_CC_KERNEL_SRCS={' '.join(kernels)}"]
    if target.toolchain:
        arguments += [f"TARGET={_make_target(device)}", f"TARGET_ARCH={target.arch}"]
    if target.kernels:
        arguments.append(f"OPTIMIZED_KERNEL_DIR={target.kernels}")
    return arguments


def _make_target(device):
    return "kernorm_" + device.replace("-", "_")


def tflm_library(device, tflm_dir, ops, verbose=True):
    """TFLM's static library for a device with the kernels of `ops`, built unless the cache holds it.

    The build runs TFLM's own Makefile (`make microlite`) in a folder of the cache keyed by the TFLM
    folder and the target's flags; objects already compiled there are reused, so another model needs
    only its new kernels compiled, and a model built before needs nothing.

    Args:
        device: a name in `TARGETS`.
        tflm_dir: TFLM's source folder, checked by `check_setup`.
        ops: the model's op names.
        verbose: show a progress bar while compiling.

    Returns:
        `(library, include_flags)`: the `.a` file's path and the `-isystem` flags that compile against it.
    """
    target = TARGETS[device]
    kernels = kernel_sources(tflm_dir, ops, target.kernels)
    built_with = (os.path.realpath(tflm_dir), target.toolchain, target.arch, target.flags, target.kernels,
                  target.build_type)
    key = hashlib.sha256(repr(built_with).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir(), f"tflm-{device}-{key}")
    os.makedirs(folder, exist_ok=True)
    library = os.path.join(folder, f"libtflm-{hashlib.sha256(' '.join(kernels).encode()).hexdigest()[:16]}.a")
    tree = os.path.join(folder, "src")
    downloads = os.path.join(tree, DOWNLOADS)
    # -isystem: the warnings of TFLM's headers are TFLM's to fix, not the firmware's.
    includes = [f"-isystem{tree}"] + [f"-isystem{os.path.join(downloads, sub)}"
                                for sub in ("flatbuffers/include", "gemmlowp", "ruy")]
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build of a folder at a time, another process waits
        if os.path.exists(library):
            return library, includes
        tree = _source_tree(tflm_dir, folder, _make_target(device), target)
        gendir = os.path.join(folder, "gen")
        command = ["make", "-f", MAKEFILE, f"-j{_JOBS}", "microlite"] + _make_arguments(device, target, kernels,
                                                                                        gendir)
        # The Makefile runs TFLM's generate_cc_arrays.py with `python3`, which needs NumPy and Pillow:
        # this interpreter has both.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        dry = subprocess.run(command + ["-n"], cwd=tree, env=env, capture_output=True, text=True)
        if dry.returncode:
            raise KernormError(f"TensorFlow Lite Micro's Makefile in {tflm_dir} failed ({_last_line(dry)}); "
                               f"check --tflm-dir")
        total = sum(" -c " in line for line in dry.stdout.splitlines())
        bar = _progress(total, f"building TFLM for {device}") if verbose and total else None
        with subprocess.Popen(command + ["V=1"], cwd=tree, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as make:
            lines = []
            for line in make.stdout:
                lines.append(line)
                if bar and " -c " in line:
                    bar.add(1)
        if make.returncode:
            errors = [line.strip() for line in lines if "error" in line.lower()] or lines[-1:]
            raise KernormError(f"TensorFlow Lite Micro did not build for {device} ({errors[0][:300]}); "
                               f"check --tflm-dir")
        built = subprocess.run(["make", "-f", MAKEFILE, "list_gendir"] + _make_arguments(device, target, kernels,
                                                                                         gendir),
                               cwd=tree, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
        with atomic_path(library) as tmp:
            shutil.copyfile(os.path.join(tree, built, "lib", "libtensorflow-microlite.a"), tmp)
    return library, includes


def _progress(total, title):
    import keras  # its progress bar, as kernorm's training shows

    print(title, flush=True)
    return keras.utils.Progbar(total, unit_name="file" if "build" in title else "image")


def _last_line(result):
    lines = [line for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else f"status {result.returncode}"


def registrations(tflm_dir, device, ops):
    """The kernels a device's firmware registers in place of TFLM's default ones, by op.

    Args:
        tflm_dir: TFLM's source folder.
        device: a name in `TARGETS`.
        ops: the model's ops, as `kernorm.runtime.graph_ops` gives them.

    Returns:
        `{op: C++ expression of its TFLMRegistration}`: kernorm's kernels of the target's `own_kernels`,
        and with `int8_kernels` the optimized folder's `Register_<OP>_INT8()` for each op whose tensors are
        all int8.
    """
    target = TARGETS[device]
    names = {op["name"] for op in ops}
    chosen = {name: OWN_KERNELS[name][1] for name in target.own_kernels if name in names}
    if target.int8_kernels:
        folder = os.path.join(tflm_dir, KERNELS, target.kernels)
        defined = set()
        for file in os.listdir(folder):
            if file.endswith(".cc"):
                with open(os.path.join(folder, file)) as f:
                    defined.update(re.findall(r"TFLMRegistration Register_(\w+)_INT8\(\)\s*{", f.read()))
        for name in sorted(names & defined - set(chosen)):
            if all(set(op["types"]) == {"int8"} for op in ops if op["name"] == name):
                chosen[name] = f"tflite::Register_{name}_INT8()"
    return chosen


def model_settings(name, ops, registered=None):
    """`model_settings.h`: the names the firmware's sources use for the model `name`'s (`<name>.h`).

    `AddModelOps` is the model's own `Add<Name>Ops`, unless `registered` (see `registrations`) replaces
    some of the kernels of its `ops` (names): then it adds the same ops, those with their registrations.
    """
    from kernorm.micro import resolver_adds

    camel = "".join(part.capitalize() for part in name.split("_"))
    if registered:
        includes = "".join(f'#include "{header}"\n' for op, (header, _) in OWN_KERNELS.items() if op in registered)
        add_ops = (f"// The model's ops, with other kernels than TFLM's default for {', '.join(sorted(registered))}.\n"
                   f"inline TfLiteStatus AddModelOps(ModelOpResolver& resolver) {{\n"
                   f"{resolver_adds(ops, registered)}  return kTfLiteOk;\n}}\n")
    else:
        includes = ""
        add_ops = f"inline TfLiteStatus AddModelOps(ModelOpResolver& resolver) {{ return Add{camel}Ops(resolver); }}\n"
    return (f"// The model the firmware runs: {name}.tflite, as kernorm.micro.c_sources writes it.\n"
            f"#ifndef KERNORM_FIRMWARE_MODEL_SETTINGS_H_\n#define KERNORM_FIRMWARE_MODEL_SETTINGS_H_\n\n"
            f'#include "{name}.h"\n#include "{name}_op_resolver.h"\n{includes}\n'
            f"constexpr int kImageBytes = 28 * 28;\n"
            f"constexpr int kArenaSize = k{camel}ArenaSize;\n"
            f"constexpr int kNumClasses = k{camel}NumClasses;\n"
            f"constexpr float kInputScale = k{camel}InputScale;\n"
            f"constexpr int kInputZeroPoint = k{camel}InputZeroPoint;\n"
            f"const unsigned char* const kModelData = g_{name};\n"
            f"using ModelOpResolver = {camel}OpResolver;\n"
            f"{add_ops}\n"
            f"#endif  // KERNORM_FIRMWARE_MODEL_SETTINGS_H_\n")


def build(device, tflm_dir, name, sources, ops, folder, verbose=True):
    """Compiles and links the firmware of a model for a device.

    Args:
        device: a name in `TARGETS`.
        tflm_dir: TFLM's source folder, checked by `check_setup`.
        name: the model's stem, e.g. "model_int8".
        sources: its source and headers, `kernorm.micro.c_sources(name, ...)`.
        ops: its ops, as `kernorm.runtime.graph_ops` gives them.
        folder: where the objects and the firmware go.

    Returns:
        The firmware's path. A failed compilation or link, or firmware too large for the machine's memory,
        raises `KernormError`.
    """
    target = TARGETS[device]
    names = [op["name"] for op in ops]
    library, includes = tflm_library(device, tflm_dir, names, verbose)
    registered = registrations(tflm_dir, device, ops)
    for file, text in dict(sources, **{"model_settings.h": model_settings(name, names, registered)}).items():
        write_text(os.path.join(folder, file), text)
    files = [os.path.join(SOURCES, f) for f in APP_SOURCES + [f"platform_{target.platform}.cc"]]
    startup = os.path.join(SOURCES, f"startup_{target.platform}.c")
    files += [startup] if os.path.exists(startup) else []
    files.append(os.path.join(folder, f"{name}.cc"))
    flags = list(target.flags) + _APP_FLAGS + (["-DNDEBUG", "-DTF_LITE_STRIP_ERROR_STRINGS"]
                                               if target.build_type == "release" else [])
    objects = []
    for source in files:
        objects.append(os.path.join(folder, os.path.basename(source) + ".o"))
        compiler = [target.toolchain + ("gcc" if source.endswith(".c") else "g++")]
        language = [] if source.endswith(".c") else _CXX_FLAGS
        _run(compiler + language + flags + [f"-I{folder}", f"-I{SOURCES}"] + includes
             + ["-c", source, "-o", objects[-1]], f"{os.path.basename(source)} did not compile for {device}")
    firmware = os.path.join(folder, "firmware")
    link = [target.toolchain + "g++"] + list(target.flags) + objects + [library, "-lm", "-o", firmware,
                                                                         "-Wl,--gc-sections"]
    if target.linker_script:
        link += ["-T", os.path.join(SOURCES, target.linker_script), "-nostartfiles", "--specs=nano.specs",
                 "--specs=rdimon.specs"]
    _run(link, f"the firmware for {device} did not link")
    return firmware


def _run(command, what):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        overflow = re.search(r"region `(\w+)' overflowed by (\d+) bytes", result.stderr)
        if overflow:
            raise KernormError(f"{what}: it does not fit the machine's {overflow.group(1)} (over by "
                               f"{int(overflow.group(2)):,} bytes); export a smaller model")
        errors = [line for line in result.stderr.splitlines()
                  if "undefined reference" in line or "error:" in line and "collect2" not in line]
        errors = errors or [_last_line(result)]
        raise KernormError(f"{what} ({errors[0].strip()[:300]})")


def sizes(device, firmware):
    """The firmware's sections, as the toolchain's `size` counts them: `{"text", "data", "bss"}` in bytes.

    On a Cortex-M, text and data are the flash it takes and data and bss (the stack and heap reserved
    by the linker script included) the RAM.
    """
    output = subprocess.run([TARGETS[device].toolchain + "size", firmware], capture_output=True, text=True,
                            check=True).stdout.splitlines()[-1].split()
    return dict(zip(("text", "data", "bss"), map(int, output[:3])))


def idx_images(images):
    """`images` (uint8, `(N, 28, 28)`) in MNIST's IDX format: the bytes of the file the firmware reads."""
    header = np.array([0x803, *images.shape], ">u4").tobytes()
    return header + np.ascontiguousarray(images, np.uint8).tobytes()


def command(device, firmware_file, count):
    """The command line that runs the firmware from the folder holding it and `IMAGES_FILE`."""
    target = TARGETS[device]
    if not target.machine:
        return ["./" + firmware_file, IMAGES_FILE, str(count)]
    return ["qemu-system-arm", "-machine", target.machine, "-nographic", "-monitor", "none", "-icount", "shift=0",
            "-semihosting-config", f"enable=on,target=native,arg={firmware_file},arg={IMAGES_FILE},arg={count}",
            "-kernel", firmware_file]


def run(device, folder, firmware_file, count, verbose=True):
    """Runs firmware in `folder` on the first `count` images of its `IMAGES_FILE`.

    Returns:
        `(classes, summary)`: the class of each image, an int array, and the firmware's summary line as
        a dict of ints (see `kernorm/firmware/main_functions.h`). A run that fails, or does not end within
        `BASE_SECONDS + PER_IMAGE_SECONDS * count`, raises `KernormError`.
    """
    timeout = BASE_SECONDS + PER_IMAGE_SECONDS * count
    bar = _progress(count, f"running on {device}") if verbose and count else None
    classes, lines, stopped = {}, [], threading.Event()
    with subprocess.Popen(command(device, firmware_file, count), cwd=folder, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True) as process:

        def stop():
            stopped.set()
            process.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            for line in process.stdout:
                lines.append(line.strip())
                match = re.fullmatch(r"(\d+) (\d+)", lines[-1])
                if match:
                    classes[int(match.group(1))] = int(match.group(2))
                    if bar:
                        bar.add(1)
        finally:
            timer.cancel()
    if stopped.is_set():
        raise KernormError(f"the firmware on {device} did not finish {count} images in {timeout:g} s and was "
                           f"stopped; try fewer --device-images")
    summary = [line for line in lines if line.startswith("summary ")]
    if process.returncode or not summary or sorted(classes) != list(range(count)):
        said = [line for line in lines if line.startswith("error")] or lines[-1:] or ["no output"]
        raise KernormError(f"the firmware on {device} failed ({said[0][:300]}, exit status {process.returncode})")
    values = dict(pair.split("=") for pair in summary[-1].split()[1:])
    return np.array([classes[i] for i in range(count)]), {key: int(value) for key, value in values.items()}


def check(device, tflm_dir, name, flatbuffer, arena_bytes, x_test, y_test, count, verbose=True):
    """Builds a model's firmware for a device, runs it on test images and measures it.

    Args:
        device: a name in `TARGETS`.
        tflm_dir: TFLM's source folder, checked by `check_setup`.
        name: the model's stem, e.g. "model_int8".
        flatbuffer: its `.tflite` bytes (checked by `kernorm.micro.check`: TFLM runs it).
        arena_bytes: the tensor arena the firmware reserves (`kernorm.micro.check`'s `arena_bytes`).
        x_test, y_test: the test images `(N, 28, 28)` and labels; the first `count` are run.
        count: how many images to run.
        verbose: progress bars.

    Returns:
        `(record, files)`: the device record (see the README: `passed`, `failure`, the target, its
        memory and instruction counts, the `command` that runs it again) and, when it passed, the files
        to write beside the model: `{name: bytes}` of the firmware and the images file.
    """
    from kernorm import micro
    from kernorm.runtime import graph_ops

    target = TARGETS[device]
    quantize = name.split("_", 1)[1]
    firmware_file = f"firmware_{quantize}_{device}" + (".elf" if target.machine else "")
    ops = graph_ops(flatbuffer)
    record = {"target": device, "kernels": target.kernels or "reference", "qemu_machine": target.machine,
              "images": count, "firmware": None, "passed": False, "failure": None}
    images = x_test[:count]
    images_file = idx_images(images)
    expected = micro.MicroModel(flatbuffer, name).logits(images).argmax(-1)
    with tempfile.TemporaryDirectory(prefix="kernorm-firmware-") as folder:
        try:
            built = build(device, tflm_dir, name, micro.c_sources(name, flatbuffer, arena_bytes), ops,
                          folder, verbose)
            size = sizes(device, built)
            flash, ram = size["text"] + size["data"], size["data"] + size["bss"]
            if target.flash_bytes and (flash > target.flash_bytes or ram > target.ram_bytes):
                raise KernormError(f"the firmware needs {flash:,} bytes of flash and {ram:,} of RAM; the "
                                   f"{target.machine} has {target.flash_bytes:,} and {target.ram_bytes:,}")
            shutil.copyfile(built, os.path.join(folder, firmware_file))
            os.chmod(os.path.join(folder, firmware_file), 0o755)
            write_bytes(os.path.join(folder, IMAGES_FILE), images_file)
            classes, summary = run(device, folder, firmware_file, count, verbose)
        except KernormError as e:
            record["failure"] = str(e)
            return record, {}
        with open(os.path.join(folder, firmware_file), "rb") as f:
            files = {firmware_file: f.read()}
    macs = micro.count_macs(ops)
    per_inference = summary["ticks"] / summary["tick_hz"] / count  # seconds of the firmware's clock
    disagree = np.flatnonzero(classes != expected)
    record.update({
        "accuracy": float((classes == y_test[:count]).mean()),
        "agreement": float((classes == expected).mean()),
        "flash_bytes": flash,
        "ram_bytes": ram,
        "sections": size,
        "arena_bytes": arena_bytes,
        "arena_used_bytes": summary["arena_used_bytes"],
        # Measured on a QEMU machine only.
        "stack_used_bytes": summary["stack_used_bytes"] if target.machine else None,
        "heap_used_bytes": summary["heap_used_bytes"] if target.machine else None,
        # -icount shift=0: one instruction per nanosecond of emulated time.
        "instructions_per_inference": round(per_inference * 1e9) if target.machine else None,
        # This machine's processor time, which other processes do not inflate.
        "time_us_per_inference": None if target.machine else round(per_inference * 1e6, 1),
        "macs": macs,
        "instructions_per_mac": round(per_inference * 1e9 / macs, 2) if target.machine else None,
        "command": shlex.join(command(device, firmware_file, count)),
    })
    if len(disagree):
        record["failure"] = (f"the firmware on {device} classifies {len(disagree)} of {count} images unlike TFLM's "
                             f"Python interpreter (first: image {disagree[0]}, {classes[disagree[0]]} against "
                             f"{expected[disagree[0]]})")
        return record, {}
    record.update(passed=True, firmware=firmware_file)
    return record, dict(files, **{IMAGES_FILE: images_file})



def write_files(folder, files):
    """Writes `check`'s files into the export folder, each whole or not at all; firmware is made executable."""
    for name, data in files.items():
        path = os.path.join(folder, name)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755 if name.startswith("firmware_") else 0o644)


def summary_line(record):
    """One line of a model's device figures (`check`'s record), printed under its TFLM line."""
    verdict = "ok" if record["passed"] else "FAILED"
    if "flash_bytes" not in record:
        return f"{'':8s} {record['target']}: {record['failure']}  {verdict}"
    speed = (f"{record['instructions_per_inference'] / 1e6:.1f} M instructions per inference "
             f"({record['instructions_per_mac']:.1f} per MAC)" if record["instructions_per_inference"]
             else f"{record['time_us_per_inference']:.0f} µs per inference")
    return (f"{'':8s} {record['target']}: {record['images']} images, agree {100 * record['agreement']:.2f} % with "
            f"TFLM, acc {100 * record['accuracy']:.2f} %  flash {record['flash_bytes'] / 1024:.1f} KiB  RAM "
            f"{record['ram_bytes'] / 1024:.1f} KiB  arena used {record['arena_used_bytes'] / 1024:.1f} KiB  "
            f"{speed}  {verdict}")
