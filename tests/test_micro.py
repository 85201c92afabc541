"""On a microcontroller: `kernorm export --micro` and `kernorm predict --runtime micro` through TFLM."""

import math
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import read_json, run_python

from kernorm import micro
from kernorm.cli import main
from kernorm.config import ExportConfig
from kernorm.errors import KernormError
from kernorm.runtime import TFLiteModel, graph_ops, graph_stats

REPO = pathlib.Path(__file__).resolve().parents[1]
# The MicroMutableOpResolver method that adds each op kernorm's networks convert to, named as in TFLM's
# tensorflow/lite/micro/micro_mutable_op_resolver.h.
TFLM_METHODS = {"ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONV_2D": "AddConv2D",
                "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "FULLY_CONNECTED": "AddFullyConnected", "MEAN": "AddMean",
                "MUL": "AddMul", "PACK": "AddPack", "QUANTIZE": "AddQuantize", "RESHAPE": "AddReshape",
                "RSQRT": "AddRsqrt", "SHAPE": "AddShape", "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub"}


def read(*parts, mode="r"):
    with open(os.path.join(*parts), mode) as f:
        return f.read()


@pytest.fixture(scope="module")
def int8_model(micro_exported):
    return read(micro_exported["export_dir"], "model_int8.tflite", mode="rb")


def reduce_prod_model():
    """A float32 "classifier" of 28×28×1 images whose graph holds REDUCE_PROD, an op TFLM lacks."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
    def logits(images):
        return tf.reduce_prod(images[:, :10, :, 0], axis=2)

    return tf.lite.TFLiteConverter.from_concrete_functions([logits.get_concrete_function()], logits).convert()


@pytest.mark.slow
def test_micro_export_writes_the_model_its_sources_and_figures(micro_exported):
    export_dir = micro_exported["export_dir"]
    assert sorted(os.listdir(export_dir)) == [".kernorm", "config.json", "export.json", "model_int8.cc",
                                               "model_int8.h", "model_int8.tflite", "model_int8_op_resolver.h"]
    figures = read_json(export_dir, "export.json")["models"]["int8"]
    tflm = figures["micro"]
    assert figures["passed"] and tflm["passed"] and tflm["failure"] is None
    # Only one-step ties may classify differently (kernorm.micro.near_ties), so the accuracies differ by at
    # most the images the two interpreters disagree on.
    assert tflm["agreement"] >= 0.999
    assert abs(tflm["acc"] - tflm["litert_acc"]) <= 1 - tflm["agreement"] + 1e-9
    assert tflm["flash_bytes"] == figures["size_bytes"]
    assert tflm["arena_bytes"] == tflm["arena_measured_bytes"] + 16
    ops, _ = graph_stats(os.path.join(export_dir, "model_int8.tflite"))
    assert tflm["ops"] == dict(ops) and tflm["files"] == ["model_int8.cc", "model_int8.h", "model_int8_op_resolver.h"]
    assert re.search(r"TFLM acc +\d+\.\d\d % \(LiteRT reference \d+\.\d\d %, agree \d+\.\d\d %\).*MACs  ok",
                     micro_exported["output"])
    assert ExportConfig(**read_json(export_dir, "config.json")).micro is True


@pytest.mark.slow
def test_micro_export_shows_a_bar_for_each_tflm_step(micro_exported):
    lines = micro_exported["output"].splitlines()
    assert "\x1b" not in micro_exported["output"] and "\r" not in micro_exported["output"]
    start = lines.index("the int8 model: TFLM on 10,000 test images")
    assert lines[start:start + 6:2] == ["the int8 model: TFLM on 10,000 test images",
                                        "the int8 model: LiteRT's reference kernels on 10,000 test images",
                                        f"the int8 model: TFLM's smallest arena, {micro.ARENA_TRIES} tries"]
    assert [line.split(" - ")[0] for line in lines[start + 1:start + 7:2]] == [
        "10000/10000", "10000/10000", f"{micro.ARENA_TRIES}/{micro.ARENA_TRIES}"]
    assert lines[start + 6].lstrip().startswith("TFLM acc")


@pytest.mark.slow
def test_source_holds_the_model_bytes_and_header_its_constants(micro_exported, int8_model):
    export_dir = micro_exported["export_dir"]
    source, header = read(export_dir, "model_int8.cc"), read(export_dir, "model_int8.h")
    [array] = re.findall(r"alignas\(16\) const unsigned char g_model_int8\[\] = \{(.*?)\};", source, re.S)
    assert bytes(int(byte, 16) for byte in re.findall(r"0x([0-9a-f]{2})", array)) == int8_model
    assert f"const unsigned int g_model_int8_len = {len(int8_model)};" in source
    tflm = read_json(export_dir, "export.json")["models"]["int8"]["micro"]
    model = TFLiteModel(int8_model)

    def constant(name):
        return float(re.search(rf"constexpr \w+ k{name} = (-?[\d.]+)f?;", header).group(1))

    assert constant("ModelInt8ArenaSize") == tflm["arena_bytes"]
    assert (constant("ModelInt8InputScale"), constant("ModelInt8InputZeroPoint")) == (1.0, 0)
    scale, zero_point = model.output_details["quantization"]
    assert constant("ModelInt8OutputScale") == pytest.approx(scale, rel=1e-7)
    assert constant("ModelInt8OutputZeroPoint") == zero_point
    assert re.findall(r'"(\d)"', header) == [str(digit) for digit in range(10)]


def test_resolver_methods_are_named_as_tflm_names_them():
    assert {op: micro.resolver_method(op) for op in TFLM_METHODS} == TFLM_METHODS


@pytest.mark.slow
def test_resolver_adds_exactly_the_ops_tflm_ran(micro_exported, int8_model):
    """The header's resolver adds each op kind of the model once, by TFLM's name for it, and holds no more;
    TFLM ran the model with those ops at LiteRT's accuracy."""
    header = read(micro_exported["export_dir"], "model_int8_op_resolver.h")
    tflm = read_json(micro_exported["export_dir"], "export.json")["models"]["int8"]["micro"]
    ops = {op["name"] for op in graph_ops(int8_model)}
    assert tflm["passed"] and set(tflm["ops"]) == ops and {"CONV_2D", "QUANTIZE", "FULLY_CONNECTED"} <= ops
    assert sorted(re.findall(r"resolver\.(Add\w+)\(\)", header)) == sorted(TFLM_METHODS[op] for op in ops)
    assert f"tflite::MicroMutableOpResolver<{len(ops)}>" in header


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
def test_sources_and_the_readme_program_compile_link_and_run(micro_exported, tmp_path):
    """Against stand-ins for the TFLM headers they include (TFLM's own cannot be fetched offline): the
    resolver's methods are named as TFLM's and refuse more ops than its size, as TFLM's do; the
    interpreter hands out an input buffer and logits in which class 3 wins."""
    methods = "".join(f"  TfLiteStatus {name}() {{ return Add(); }}\n" for name in TFLM_METHODS.values())
    stand_ins = {
        "micro_mutable_op_resolver.h":
            "#pragma once\n#include <cstddef>\n#include <cstdint>\nenum TfLiteStatus { kTfLiteOk, kTfLiteError };\n"
            "#define TF_LITE_ENSURE_STATUS(a) do { if ((a) != kTfLiteOk) return kTfLiteError; } while (0)\n"
            "namespace tflite {\nstruct MicroOpResolver {};\n"
            "template <unsigned int tOpCount> class MicroMutableOpResolver : public MicroOpResolver {\n public:\n"
            f"{methods} private:\n"
            "  TfLiteStatus Add() { return count_ < tOpCount ? (++count_, kTfLiteOk) : kTfLiteError; }\n"
            "  unsigned int count_ = 0;\n};\n}  // namespace tflite\n",
        "micro_interpreter.h":
            '#pragma once\n#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n'
            "struct TfLiteTensor { union { uint8_t* uint8; int8_t* int8; } data; };\n"
            "namespace tflite {\nstruct Model;\nclass MicroInterpreter {\n public:\n"
            "  MicroInterpreter(const Model*, const MicroOpResolver&, uint8_t* arena, size_t) {\n"
            "    in_.data.uint8 = arena; out_.data.int8 = reinterpret_cast<int8_t*>(arena) + 1024;\n"
            "    for (int i = 0; i < 10; ++i) out_.data.int8[i] = i == 3 ? 100 : -100;\n  }\n"
            "  TfLiteStatus AllocateTensors() { return kTfLiteOk; }\n  TfLiteStatus Invoke() { return kTfLiteOk; }\n"
            "  TfLiteTensor* input(size_t) { return &in_; }\n  TfLiteTensor* output(size_t) { return &out_; }\n"
            " private:\n  TfLiteTensor in_, out_;\n};\n}  // namespace tflite\n",
        "schema_generated.h":
            "#pragma once\nnamespace tflite {\nstruct Model;\n"
            "inline const Model* GetModel(const void* data) { return static_cast<const Model*>(data); }\n}\n",
    }
    for name, text in stand_ins.items():
        folder = tmp_path / "tensorflow" / "lite" / ("schema" if name.startswith("schema") else "micro")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    [program] = re.findall(r"```cpp\n(.*?)```", read(REPO, "README.md"), re.S)
    (tmp_path / "main.cc").write_text(
        program + "int main() {\n  const uint8_t pixels[28 * 28] = {};\n"
        "  static_assert(kModelInt8ArenaSize > 1024 && kModelInt8NumClasses == 10, \"constants\");\n"
        "  if (g_model_int8_len < 8 || g_model_int8[4] != 'T' || g_model_int8[7] != '3') return 2;\n"
        "  return Classify(pixels) == 3 ? 0 : 3;\n}\n")
    for name in ("model_int8.cc", "model_int8.h", "model_int8_op_resolver.h"):
        shutil.copy(os.path.join(micro_exported["export_dir"], name), tmp_path)
    binary = tmp_path / "check"
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-I", str(tmp_path), str(tmp_path / "main.cc"),
                            str(tmp_path / "model_int8.cc"), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert subprocess.run([str(binary)]).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="needs g++")
def test_the_model_source_compiles_without_tflm(micro_exported, tmp_path):
    """As TFLM's own array generator's output: the model and its header need no TFLM header; the resolver's
    header does."""
    export_dir = micro_exported["export_dir"]
    assert "tensorflow/" not in read(export_dir, "model_int8.h") + read(export_dir, "model_int8.cc")
    assert '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"' in read(export_dir,
                                                                                 "model_int8_op_resolver.h")
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", "model_int8.cc", "-o",
                            str(tmp_path / "model.o")], cwd=export_dir, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr


@pytest.mark.slow
def test_measured_arena_is_the_smallest_that_runs(micro_exported, int8_model):
    measured = read_json(micro_exported["export_dir"], "export.json")["models"]["int8"]["micro"]["arena_measured_bytes"]
    assert micro.tflm_error(int8_model, measured) is None
    assert micro.tflm_error(int8_model, measured - 1)


@pytest.mark.parametrize("quantize", ["float32", "int8"])
def test_a_dilated_network_converts_to_dilated_convs_that_tflm_runs_as_litert(mnist, quantize):
    # With a free batch the converter would lower tiny's dilated convs to space-to-batch ops whose stored
    # shapes TFLM trusts and LiteRT recomputes: TFLM then classified one image in ten right.
    from kernorm.export import calibration_images, convert
    from kernorm.models import build_model

    (x_train, _), (x_test, _) = mnist
    flatbuffer = convert(build_model("bn", architecture="tiny"), quantize, calibration_images(x_train, 20))
    ops = graph_ops(flatbuffer)
    assert not {"SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND"} & {op["name"] for op in ops}
    assert [op["outputs"][0][1:3] for op in ops if op["name"] == "DEPTHWISE_CONV_2D"][-3:] == [
        (18, 18), (14, 14), (10, 10)]
    images = x_test[:50]
    litert = TFLiteModel(flatbuffer, reference=True)
    step = litert.output_details["quantization"][0]  # one int8 step; 0 for float logits
    np.testing.assert_allclose(micro.MicroModel(flatbuffer, "tiny").logits(images), litert.logits(images),
                               rtol=1e-5, atol=1.001 * step or 1e-4)


@pytest.mark.parametrize("architecture", ["study", "compact", "tiny"])
def test_macs_are_every_weights_use_in_the_keras_model(architecture):
    import keras

    from kernorm.export import convert
    from kernorm.models import build_model

    def leaves(layer):
        return [leaf for sub in layer.layers for leaf in leaves(sub)] if hasattr(layer, "layers") else [layer]

    model = build_model("bn", architecture=architecture)
    expected = 0
    for layer in leaves(model):
        shape = layer.output.shape[1:]
        if isinstance(layer, keras.layers.SeparableConv2D):  # depthwise k×k, then pointwise 1×1
            kh, kw, channels, multiplier = layer.depthwise_kernel.shape
            expected += math.prod(shape[:-1]) * channels * multiplier * (kh * kw + shape[-1])
        elif isinstance(layer, keras.layers.Conv2D):
            expected += math.prod(shape) * math.prod(layer.kernel.shape[:-1])
        elif isinstance(layer, keras.layers.Dense):
            expected += math.prod(shape) * layer.kernel.shape[0]
    assert micro.count_macs(graph_ops(convert(model, "float32"))) == expected


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "float32"])
def test_micro_runtime_matches_litert(exported, mnist, quantize):
    (_, _), (x_test, _) = mnist
    path = os.path.join(exported["export_dir"], f"model_{quantize}.tflite")
    images = x_test[:200]
    litert = TFLiteModel(read(path, mode="rb"), reference=True)  # the kernels TFLM's derive from
    tflm, expected = micro.load_tflite(path).logits(images), litert.logits(images)
    np.testing.assert_array_equal(tflm.argmax(-1), expected.argmax(-1))
    step = litert.output_details["quantization"][0]  # one int8 step; 0 for float logits
    np.testing.assert_allclose(tflm, expected, rtol=1e-5, atol=1.001 * step or 1e-4)


@pytest.mark.slow
def test_predict_with_the_micro_runtime(exported, mnist, tmp_path):
    (_, _), (x_test, _) = mnist
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"digit{i}.npy"))
        np.save(paths[-1], x_test[i])
    model = os.path.join(exported["export_dir"], "model_int8.tflite")
    tops = {}
    for runtime in ("litert", "micro"):
        result = CliRunner().invoke(main, ["predict", model, *paths, "--runtime", runtime, "--top", "1"])
        assert result.exit_code == 0, result.output
        tops[runtime] = [line.split(": ")[1].split(" ")[0] for line in result.output.splitlines()]
    assert tops["micro"] == tops["litert"] and len(tops["micro"]) == 3


@pytest.mark.slow
def test_a_model_tflm_cannot_run_ends_in_one_line_naming_the_op(exported, tmp_path, mnist):
    digit = tmp_path / "digit.npy"
    np.save(digit, np.zeros((28, 28), np.uint8))
    unsupported = tmp_path / "reduce_prod.tflite"
    unsupported.write_bytes(reduce_prod_model())
    for model, op in ((os.path.join(exported["export_dir"], "model_float16.tflite"), "DEQUANTIZE"),
                      (str(unsupported), "REDUCE_PROD")):
        result = CliRunner().invoke(main, ["predict", model, str(digit), "--runtime", "micro"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith(f"Error: {model}: TFLM cannot run it (") and op in line
    (_, _), (x_test, y_test) = mnist
    figures = micro.check(unsupported.read_bytes(), x_test, y_test)
    assert figures == {"passed": False,
                       "failure": "TFLM cannot run it (Didn't find op for builtin opcode 'REDUCE_PROD')"}


@pytest.mark.slow
def test_tflm_disagreeing_with_litert_fails_the_export_and_writes_no_model(exported, tmp_path, data_dir,
                                                                          monkeypatch):
    monkeypatch.setattr(micro.MicroModel, "_invoke", lambda self, batch: np.zeros((len(batch), 10), np.float32))
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", exported["run_dir"], "--quantize", "float32", "--micro",
                                       "--out", str(out), "--data-dir", data_dir])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"Error: TFLM check failed: float32: 9\.80 % under TFLM, \d+\.\d\d % under LiteRT's reference "
                        r"kernels, \d+ image\(s\) classified otherwise beyond a one-step tie; no model file written "
                        r"for float32, figures in .*export\.json", last), last
    assert sorted(os.listdir(out)) == [".kernorm", "config.json", "export.json"]
    figures = read_json(out, "export.json")["models"]["float32"]
    assert figures["passed"] is False and figures["file"] is None and figures["micro"]["files"] is None
    assert figures["micro"]["acc"] == 0.098 and figures["drop_points"] <= 0.3


def test_only_a_tie_within_one_output_step_may_flip_a_class():
    step = 0.1
    tflm = np.array([[1.0, 0.0, 0.3], [0.4, 0.5, 0.0], [0.5, 0.4, 0.0], [0.7, 0.0, 0.2], [0.0, 0.0, 0.0]])
    litert = np.array([[1.0, 0.0, 0.2], [0.5, 0.5, 0.0], [0.3, 0.5, 0.0], [0.7, 0.0, 0.9], [0.0, 0.0, 0.1]])
    # Same class; a tie in LiteRT one step from TFLM's; two steps apart in LiteRT; far apart in both;
    # one step apart, then the same as a float output (step 0), where only TFLM ties.
    np.testing.assert_array_equal(micro.near_ties(tflm, litert, step), [True, True, False, False, True])
    assert micro.near_ties(tflm[4:], litert[4:], 0.0).tolist() == [False]
    assert micro.near_ties(tflm[4:], tflm[4:], 0.0).tolist() == [True]


def test_micro_requests_tflm_cannot_serve_give_one_line(tmp_path):
    assert ExportConfig(model="m", quantize="all", micro=True).micro_quantizations == ("float32", "int8")
    assert ExportConfig(model="m", quantize="all").micro_quantizations == ()
    for quantize in ("float16", "dynamic"):
        with pytest.raises(KernormError, match=f"--micro with --quantize {quantize}: .* pass --quantize float32, "
                                               f"int8 or all"):
            _ = ExportConfig(model="m", quantize=quantize, micro=True).micro_quantizations
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--quantize", "float16", "--micro", "--out", str(out)])
    assert result.exit_code == 1 and result.output.startswith("Error: --micro with --quantize float16")
    assert not out.exists()


def test_micro_without_its_extra_names_the_install(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"read before TFLM is imported")
    np.save(tmp_path / "digit.npy", np.zeros((28, 28), np.uint8))
    code = ("import sys\nsys.modules['tflite_micro'] = None  # as if the micro extra were not installed\n"
            "from kernorm.cli import main\n"
            f"main(['predict', {str(model)!r}, {str(tmp_path / 'digit.npy')!r}, '--runtime', 'micro'])\n")
    result = run_python(["-c", code])
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: TensorFlow Lite Micro is not installed; pip install 'kernorm[micro]'"
