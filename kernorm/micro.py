"""Exported models on a microcontroller: TensorFlow Lite Micro (TFLM) runs, measures and embeds them.

TFLM's Python package (`pip install 'kernorm[micro]'`) runs a `.tflite` model
with TFLM's reference kernels, the C++ a microcontroller build of TFLM
compiles unless a kernel library (CMSIS-NN, say) replaces some. This module
checks a model with it on the test set (`check`), measures the tensor arena
it needs, and writes the model as the C++ source and header a TFLM program
compiles in (`c_sources`). `MicroModel` classifies images through TFLM, for
`kernorm predict --runtime micro`.

Like `kernorm.runtime`, it imports neither TensorFlow nor Keras; only `check`,
which `kernorm export` calls, imports Keras, for its progress bars.
"""

import collections
import math
import os
import re
import subprocess
import sys

import numpy as np

from kernorm.console import progress_bar
from kernorm.errors import KernormError
from kernorm.runtime import Classifier, TFLiteModel, check_tflite, dequantize, graph_ops, quantize, read_tflite

try:
    from tflite_micro import runtime as tflm
except ImportError:  # the optional `micro` extra
    raise KernormError("TensorFlow Lite Micro is not installed; pip install 'kernorm[micro]'") from None

# The host arena TFLM runs in here; a host has memory to spare, and `smallest_arena` measures the need.
HOST_ARENA_BYTES = 1 << 20
# TFLM aligns the arena's start to 16 bytes: an arena that is not 16-byte aligned loses up to 15
# of its bytes, so micro_interpreter.h asks for the bytes used plus 16.
ARENA_ALIGNMENT = 16
# LiteRT's batch on the test set, for the comparison with TFLM.
LITERT_BATCH = 1000
# The ops that multiply-accumulate; their weights are their second input.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# TFLM's own words for an op it lacks or cannot run, e.g. "Didn't find op for builtin opcode 'TOPK_V2'"
# or "Node DEQUANTIZE (number 0) failed to prepare with status 1".
_OP_FAILURE = re.compile(r"Didn't find op for builtin opcode '\w+'|Node \w+ \(number \d+\) failed to \w+")
# One try of a model in a child process: TFLM's Python interpreter crashes (SIGSEGV) on some arenas
# too small for its own bookkeeping, and writes why it fails to the C++ standard error.
_TRY = """
import sys
import numpy as np
from tflite_micro import runtime
try:
    interpreter = runtime.Interpreter.from_bytes(sys.stdin.buffer.read(), arena_size=int(sys.argv[1]))
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    interpreter.invoke()
except RuntimeError:
    sys.exit(1)
"""


def tflm_error(flatbuffer, arena_size):
    """Why TFLM cannot allocate and run a model in an arena of `arena_size` bytes; None when it can.

    The model is run once, on a blank input, in a child process.

    Args:
        flatbuffer: the `.tflite` bytes.
        arena_size: the tensor arena, in bytes.

    Returns:
        None, or one line in TFLM's words: the one naming the failing op when
        there is one, e.g. "Didn't find op for builtin opcode 'TOPK_V2'".
    """
    result = subprocess.run([sys.executable, "-c", _TRY, str(arena_size)], input=flatbuffer, capture_output=True)
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
    named = [match.group() for line in lines if (match := _OP_FAILURE.search(line))]
    return (named or lines or [f"TFLM exited with status {result.returncode}"])[0]


# Tries of the arena search: bisection from 0 to HOST_ARENA_BYTES, one try per halving.
ARENA_TRIES = math.ceil(math.log2(HOST_ARENA_BYTES))


def smallest_arena(flatbuffer, bar=None):
    """The fewest tensor-arena bytes with which TFLM allocates and runs a model, found by bisection.

    Measured on this host: a 64-bit CPU, whose pointers make TFLM's own
    bookkeeping in the arena larger than a 32-bit microcontroller's, so a
    Cortex-M needs at most this. The arena must be 16-byte aligned, or
    `ARENA_ALIGNMENT` bytes larger.

    Args:
        flatbuffer: the `.tflite` bytes of a model TFLM runs in `HOST_ARENA_BYTES`.
        bar: a `keras.utils.Progbar` of `ARENA_TRIES` steps, advanced by each try; None shows nothing.

    Returns:
        The arena size in bytes: it runs, one byte less does not.
    """
    fails, runs = 0, HOST_ARENA_BYTES
    while runs - fails > 1:
        middle = (fails + runs) // 2
        if tflm_error(flatbuffer, middle) is None:
            runs = middle
        else:
            fails = middle
        if bar:
            bar.add(1)
    return runs


def count_macs(ops):
    """Multiply-accumulates of one inference, counted from the graph.

    Counts CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED: each output
    element takes one MAC per weight that feeds it, the weights divided by the
    output channels (k_h·k_w·C_in for a convolution, k_h·k_w for a depthwise
    one, the inputs for a dense layer). Bias adds, requantization, pooling and
    the element-wise ops of the norms (MEAN, MUL, ADD, ...) are not counted;
    GN's group sums, which the graph computes as 1×1 convolutions, are.

    Args:
        ops: the graph's ops, as `kernorm.runtime.graph_ops` lists them (batch 1).

    Returns:
        The count, an int.
    """
    return sum(math.prod(op["outputs"][0]) * math.prod(op["inputs"][1]) // op["outputs"][0][-1]
               for op in ops if op["name"] in MAC_OPS)


def load_tflite(path):
    """Reads a `.tflite` file into a `MicroModel`, as `kernorm.runtime.load_tflite` into a LiteRT model."""
    return MicroModel(read_tflite(path), name=os.fspath(path))


class MicroModel(Classifier):
    """A TFLite image classifier run by TFLM's interpreter, one image at a time (see `Classifier`).

    TFLM computes every output, in an arena of `HOST_ARENA_BYTES`. A model
    that TFLM cannot run raises `KernormError` with one line naming the op.

    Args:
        content: the bytes of a `.tflite` file.
        name: what error messages call the model (its path, say).
    """

    def __init__(self, content, name="model"):
        check_tflite(content, name)
        error = tflm_error(content, HOST_ARENA_BYTES)
        if error:
            raise KernormError(f"{name}: TFLM cannot run it ({error}); run it with "
                               f"--runtime litert, or export an int8 or float32 model with --micro")
        self._tflm = tflm.Interpreter.from_bytes(content, arena_size=HOST_ARENA_BYTES)
        super().__init__(name, _details(self._tflm.get_input_details(0)), _details(self._tflm.get_output_details(0)))

    def _invoke(self, batch):
        # TFLM's tensors have a fixed batch of 1.
        outputs = []
        for image in quantize(batch, self.input_details):
            self._tflm.set_input(image[None], 0)
            self._tflm.invoke()
            outputs.append(self._tflm.get_output(0)[0])
        return dequantize(np.stack(outputs), self.output_details)


def in_chunks(logits, images, bar):
    """`logits(images)` computed `LITERT_BATCH` images at a time, advancing `bar` (a `keras.utils.Progbar`) by each."""
    outputs = []
    for i in range(0, len(images), LITERT_BATCH):
        outputs.append(logits(images[i:i + LITERT_BATCH]))
        bar.add(len(outputs[-1]))
    return np.concatenate(outputs)


def _details(tflm_details):
    """A TFLM tensor's details as LiteRT words them: `dtype`, `shape` and `quantization` (scale, zero point)."""
    parameters = tflm_details["quantization_parameters"]
    scales, zero_points = list(parameters["scales"]), list(parameters["zero_points"])
    return {"dtype": tflm_details["dtype"], "shape": np.asarray(tflm_details["shape"]),
            "quantization": (float(scales[0]) if scales else 0.0, int(zero_points[0]) if zero_points else 0)}


def check(flatbuffer, x_test, y_test, name="model", verbose=False):
    """Runs a model under TFLM on the test set, compares it with LiteRT and measures its memory.

    The comparison is with LiteRT's reference kernels on the same file
    (`TFLiteModel(..., reference=True)`), the plain C++ TFLM's kernels derive
    from: LiteRT's optimized kernels and XNNPACK delegate round int8
    arithmetic their own ways, so their classes may differ from both on a few
    images. Even the two reference kernel sets requantize an int8 output by
    one step apart now and then, which flips a class where its two best
    logits are that close. The model passes when every image TFLM classifies
    otherwise than LiteRT is such a tie (`near_ties`).

    Args:
        flatbuffer: the `.tflite` bytes.
        x_test, y_test: the test images `(N, 28, 28)` and labels `(N,)`.
        name: what messages call the model.
        verbose: show a progress bar over each step: TFLM's and LiteRT's passes over the test
            images, and the arena search.

    Returns:
        A dict: `passed`, `failure` (why not, one line; None when passed), and
        when TFLM runs the model: `acc` (TFLM's), `litert_acc`, `agreement`
        (the share of images TFLM and LiteRT classify alike), `arena_bytes`
        (`smallest_arena` plus `ARENA_ALIGNMENT`), `arena_measured_bytes`
        (`smallest_arena`), `flash_bytes` (the model's), `ops` (op name ->
        count) and `macs` (`count_macs`).
    """
    error = tflm_error(flatbuffer, HOST_ARENA_BYTES)
    if error:
        return {"passed": False, "failure": f"TFLM cannot run it ({error})"}
    count = f"{len(x_test):,} test images"
    bar = progress_bar(len(x_test), f"{name}: TFLM on {count}", verbose, unit_name="image")
    logits = in_chunks(MicroModel(flatbuffer, name).logits, x_test, bar)
    bar = progress_bar(len(x_test), f"{name}: LiteRT's reference kernels on {count}", verbose, unit_name="image")
    litert = TFLiteModel(flatbuffer, name, reference=True)
    litert_logits = in_chunks(litert.logits, x_test, bar)
    pred, litert_pred = logits.argmax(-1), litert_logits.argmax(-1)
    acc, litert_acc = float((pred == y_test).mean()), float((litert_pred == y_test).mean())
    apart = int(np.sum(~near_ties(logits, litert_logits, litert.output_details["quantization"][0])))
    failure = (f"{100 * acc:.2f} % under TFLM, {100 * litert_acc:.2f} % under LiteRT's reference kernels, "
               f"{apart} image(s) classified otherwise beyond a one-step tie")
    bar = progress_bar(ARENA_TRIES, f"{name}: TFLM's smallest arena, {ARENA_TRIES} tries", verbose, unit_name="try")
    arena = smallest_arena(flatbuffer, bar)
    ops = graph_ops(flatbuffer)
    return {
        "passed": apart == 0,
        "failure": None if apart == 0 else failure,
        "acc": acc,
        "litert_acc": litert_acc,
        "agreement": float((pred == litert_pred).mean()),
        "arena_bytes": arena + ARENA_ALIGNMENT,
        "arena_measured_bytes": arena,
        "flash_bytes": len(flatbuffer),
        "ops": dict(collections.Counter(op["name"] for op in ops)),
        "macs": count_macs(ops),
    }


def near_ties(logits, other, step):
    """Per image, whether two interpreters' logits `(N, classes)` pick the same class, or classes whose
    logits lie at most `step` (the output's quantization step; 0 for a float output) apart in both."""
    rows = np.arange(len(logits))
    chosen, other_chosen = logits.argmax(-1), other.argmax(-1)
    margin = step * (1 + 1e-3)  # the float logits are integers times `step`, up to float rounding
    return (chosen == other_chosen) | ((np.abs(logits[rows, chosen] - logits[rows, other_chosen]) <= margin)
                                       & (np.abs(other[rows, chosen] - other[rows, other_chosen]) <= margin))


def resolver_method(op):
    """The `tflite::MicroMutableOpResolver` method that adds a builtin op, by the rule of TFLM's own
    resolver generator: "CONV_2D" -> "AddConv2D"."""
    return "Add" + "".join(part.capitalize() if part[0].isalpha() else part for part in op.split("_"))


def resolver_adds(ops, registrations=None):
    """The C++ lines of an `Add<Name>Ops(resolver)` function that add each op once, in name order.

    Args:
        ops: op names, e.g. "CONV_2D".
        registrations: `{op: C++ expression of a TFLMRegistration}` for ops whose kernel is not TFLM's default.
    """
    registrations = registrations or {}
    return "".join(f"  TF_LITE_ENSURE_STATUS(resolver.{resolver_method(op)}({registrations.get(op, '')}));\n"
                   for op in sorted(set(ops)))


def c_sources(name, flatbuffer, arena_bytes):
    """The C++ source and headers that compile a `.tflite` model into a TFLM program, in TFLM's style.

    `<name>.cc` holds the model, `alignas(16) const unsigned char g_<name>[]`,
    and its length `g_<name>_len`. `<name>.h` declares them and defines, with
    `<Name>` the name in CamelCase ("model_int8" -> "ModelInt8"):
    `k<Name>ArenaSize`; the input's and output's `k<Name>InputScale`,
    `k<Name>InputZeroPoint`, `k<Name>OutputScale`, `k<Name>OutputZeroPoint`
    (0 and 0: a float tensor); `k<Name>Labels`, the class of each output, in
    order. Like TFLM's own array generator, they include no TFLM header, so
    the model compiles on its own. `<name>_op_resolver.h`, which includes
    `<name>.h` and TFLM's resolver, defines `<Name>OpResolver`, a `tflite::MicroMutableOpResolver` of
    exactly as many ops as the graph has kinds, and `Add<Name>Ops(resolver)`,
    which adds each of them.

    Args:
        name: the files' stem and the C++ names' root, e.g. "model_int8".
        flatbuffer: the `.tflite` bytes.
        arena_bytes: the tensor arena the header asks for (`check`'s `arena_bytes`).

    Returns:
        `{"<name>.cc": text, "<name>.h": text, "<name>_op_resolver.h": text}`.
    """
    model = TFLiteModel(flatbuffer, name)
    camel = "".join(part.capitalize() for part in name.split("_"))
    ops = sorted({op["name"] for op in graph_ops(flatbuffer)})
    array = ",\n  ".join(", ".join(f"0x{byte:02x}" for byte in flatbuffer[i:i + 12])
                         for i in range(0, len(flatbuffer), 12))
    source = (f"// {name}.tflite for TensorFlow Lite Micro, written by kernorm export --micro.\n"
              f'#include "{name}.h"\n\n'
              f"alignas(16) const unsigned char g_{name}[] = {{\n  {array}\n}};\n"
              f"const unsigned int g_{name}_len = {len(flatbuffer)};\n")

    def tensor(role, details):
        scale, zero_point = details["quantization"]
        shape = "x".join(map(str, details["shape"]))
        return (f"// {role}: {np.dtype(details['dtype']).name} {shape}; real = (q - zero point) * scale "
                f"(scale 0: not quantized).\n"
                f"constexpr float k{camel}{role}Scale = {float(scale)!r}f;\n"
                f"constexpr int k{camel}{role}ZeroPoint = {int(zero_point)};\n")

    # MNIST's classes: output i is digit i.
    labels = ", ".join(f'"{digit}"' for digit in range(model.num_classes))
    adds = resolver_adds(ops)
    guard = f"KERNORM_{name.upper()}_H_"
    header = (f"// {name}.tflite for TensorFlow Lite Micro, written by kernorm export --micro.\n"
              f"#ifndef {guard}\n#define {guard}\n\n"
              f"extern const unsigned char g_{name}[];\n"
              f"extern const unsigned int g_{name}_len;\n\n"
              f"// The smallest tensor arena TFLM ran the model in on a 64-bit host (a 32-bit MCU needs at most\n"
              f"// that), plus {ARENA_ALIGNMENT} bytes for an arena that is not {ARENA_ALIGNMENT}-byte aligned.\n"
              f"constexpr int k{camel}ArenaSize = {arena_bytes};\n\n"
              + tensor("Input", model.input_details) + tensor("Output", model.output_details) +
              f"\nconstexpr int k{camel}NumClasses = {model.num_classes};\n"
              f"constexpr const char* k{camel}Labels[k{camel}NumClasses] = {{{labels}}};\n\n"
              f"#endif  // {guard}\n")
    guard = f"KERNORM_{name.upper()}_OP_RESOLVER_H_"
    resolver = (f"// The TFLM ops of {name}.tflite, written by kernorm export --micro.\n"
                f"#ifndef {guard}\n#define {guard}\n\n"
                f'#include "{name}.h"\n#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
                f"// Exactly the ops the model holds.\n"
                f"using {camel}OpResolver = tflite::MicroMutableOpResolver<{len(ops)}>;\n\n"
                f"inline TfLiteStatus Add{camel}Ops({camel}OpResolver& resolver) {{\n{adds}  return kTfLiteOk;\n}}\n\n"
                f"#endif  // {guard}\n")
    return {f"{name}.cc": source, f"{name}.h": header, f"{name}_op_resolver.h": resolver}
