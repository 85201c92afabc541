"""`kernorm export`: a trained model to TFLite, checked on the whole test set with the LiteRT runtime.

Each quantization is converted with TensorFlow's `TFLiteConverter`, then run
by `kernorm.runtime` (LiteRT, the path a device takes) on all 10,000 test
images and compared with the Keras model on the same images. A model file is
written only when its accuracy drop stays within `max_drop` points; the
figures of every model, passed or not, go to `export.json`.
"""

import contextlib
import hashlib
import io
import os
import time
import warnings

import numpy as np
import tensorflow as tf

from kernorm.config import ExportConfig
from kernorm.console import progress_bar
from kernorm.data import load_mnist, recorded_data_dir
from kernorm.errors import KernormError
from kernorm.files import write_bytes, write_json, write_text
from kernorm.folders import inside, prepare, saved_config
from kernorm.models import leaf_layers, load_model, with_batch_of_one, with_constant_flatten
from kernorm.rundir import CONFIG as RUN_CONFIG
from kernorm.runtime import TFLiteModel

# Batch-1 latency is timed over this many test images; throughput over all of them in batches of this size.
LATENCY_IMAGES = 1000
THROUGHPUT_BATCH = 256
KERAS_BATCH = 1000
CALIBRATION_SEED = 0
CONFIG = "config.json"
# How an export folder that an earlier kernorm wrote, before folders were marked, is known.
EARLIER_EXPORT = saved_config(CONFIG, ExportConfig)


def calibration_images(x_train, count, seed=CALIBRATION_SEED):
    """Draws the int8 calibration images from the training set, without replacement.

    Args:
        x_train: uint8 training images `(N, 28, 28)`; never the test set, which
            must stay unseen to measure the quantized model honestly.
        count: how many to draw.
        seed: seed of the draw.

    Returns:
        float32 raw pixels `(count, 28, 28, 1)`.
    """
    if not 1 <= count <= len(x_train):
        raise KernormError(f"--calibration {count}: choose between 1 and the {len(x_train)} training images")
    picked = np.random.default_rng(seed).choice(len(x_train), count, replace=False)
    return x_train[np.sort(picked)][..., None].astype(np.float32)


def convert(model, quantize, calibration=None):
    """Converts a Keras model to a TFLite flatbuffer.

    Args:
        model: the Keras model; input raw pixels, output logits.
        quantize: "float32" (no quantization); "float16" (float16 weights);
            "dynamic" (int8 weights, float activations; the converter leaves
            tensors under 1,024 elements in float, which here is every one);
            "int8" (full integer: int8 weights and activations, uint8 input
            that holds raw pixels exactly, int8 output logits).
        calibration: float32 images `(N, 28, 28, 1)` from the training set,
            required for "int8".

    Returns:
        The `.tflite` file's bytes.
    """
    model = with_constant_flatten(model)
    if any(max(getattr(layer, "dilation_rate", (1,))) > 1 for layer in leaf_layers(model)):
        # With a free batch the converter lowers a dilated conv to SPACE_TO_BATCH_ND, the conv and
        # BATCH_TO_SPACE_ND, and stores their tensors' shapes at batch 1 where the first makes a batch of
        # four: LiteRT recomputes shapes, TFLM allocates the stored ones and computes garbage. At batch 1
        # the converter fuses the three into one dilated conv, which both run.
        model = with_batch_of_one(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.int8
    # Keras prints where it saved its temporary SavedModel; the converter warns that the
    # input's range comes from calibration, which is what we want.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def latencies_us(predict, images, bar=None):
    """Microseconds of `predict` on each image alone (batch 1), one entry per image.

    `bar`, a `keras.utils.Progbar`, advances by one image after each timing, outside it.
    """
    times = []
    for i in range(len(images)):
        start = time.perf_counter_ns()
        predict(images[i:i + 1])
        times.append((time.perf_counter_ns() - start) / 1000)
        if bar:
            bar.add(1)
    return np.array(times)


def throughput(predict, images, batch_size, bar=None):
    """Runs `predict` over `images` in batches of `batch_size`, timed after one warm-up batch.

    `bar`, a `keras.utils.Progbar`, advances by each batch's images, inside the
    timing: it redraws at most every 0.05 s, well under 1 % of the time.

    Returns:
        `(outputs, images_per_second)`: the concatenated outputs of `predict`
        and the throughput.
    """
    predict(images[:batch_size])
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(images), batch_size):
        outputs.append(predict(images[i:i + batch_size]))
        if bar:
            bar.add(len(outputs[-1]))
    return np.concatenate(outputs), len(images) / (time.perf_counter() - start)


def check(flatbuffer, quantize, x_test, y_test, keras_pred, verbose=False):
    """Runs a converted model with the LiteRT runtime on the test set and measures it.

    Args:
        flatbuffer: the `.tflite` bytes.
        quantize: its quantization, for messages.
        x_test, y_test: the test images `(N, 28, 28)` and labels.
        keras_pred: the Keras model's predicted classes on `x_test`.
        verbose: show a progress bar over the test images and the batch-1 timings.

    Returns:
        A dict: accuracy, agreement with Keras, file size, batch-1 latency
        p50/p99 in µs, throughput in images/s, input and output dtype and
        quantization (scale, zero point).
    """
    model = TFLiteModel(flatbuffer, name=f"the {quantize} model")
    images = x_test[..., None]
    timed = images[:LATENCY_IMAGES]
    bar = progress_bar(len(images) + len(timed), f"the {quantize} model: LiteRT on {len(images):,} test images, then "
                       f"{len(timed):,} timed one by one", verbose, unit_name="image")
    probabilities, images_per_second = throughput(model.predict, images, THROUGHPUT_BATCH, bar)
    pred = probabilities.argmax(-1)
    latency = latencies_us(model.predict, timed, bar)
    inp, out = model.input_details, model.output_details
    return {
        "tflite_acc": float((pred == y_test).mean()),
        "agreement": float((pred == keras_pred).mean()),
        "size_bytes": len(flatbuffer),
        "sha256": hashlib.sha256(flatbuffer).hexdigest(),
        "latency_us_p50": float(np.percentile(latency, 50)),
        "latency_us_p99": float(np.percentile(latency, 99)),
        "throughput_ips": images_per_second,
        "input": {"dtype": np.dtype(inp["dtype"]).name, "quantization": list(inp["quantization"])},
        "output": {"dtype": np.dtype(out["dtype"]).name, "quantization": list(out["quantization"])},
    }


def export(config, overwrite=False, verbose=True):
    """Exports a trained model to TFLite as `config` says, and checks every model.

    Writes into `config.out_dir`: `config.json`, `model_<quantize>.tflite` for
    each model whose accuracy drop is at most `config.max_drop` points, and
    `export.json` with the figures and pass/fail of every model. With
    `config.micro`, each of `config.micro_quantizations` must also run under
    TFLM at LiteRT's accuracy, and gets `model_<quantize>.cc` and `.h` too
    (`kernorm.micro.c_sources`). A model that fails leaves no file; then, after
    writing `export.json`, a `KernormError` names the failures.

    Args:
        config: a `kernorm.config.ExportConfig`.
        overwrite: replace an existing export folder, only one kernorm made (`kernorm.folders`).
        verbose: print a progress bar per long step and one line of figures per model.

    Returns:
        The report also written to `export.json`.
    """
    quantizations, micro_quantizations = config.quantizations, config.micro_quantizations
    if micro_quantizations:
        from kernorm import micro  # the optional extra: when it is missing, one line says so before any work
    if config.device and not micro_quantizations:
        raise KernormError(f"--device {config.device} builds the models --micro checks; pass --micro too")
    if config.max_drop < 0:
        raise KernormError(f"--max-drop {config.max_drop}: the accepted drop cannot be negative")
    out_dir = config.out_dir
    if inside(config.model_file, out_dir):
        raise KernormError(f"--out {out_dir} holds the model being exported, {config.model_file}; choose a "
                           f"folder outside it (the default is export/ beside the model)")
    keras_model = load_model(config.model_file)
    # A run folder's model reads MNIST from the folder the run was trained on, after --data-dir and the variable.
    recorded = recorded_data_dir(os.path.join(os.path.dirname(config.model_file), RUN_CONFIG))
    (x_train, _), (x_test, y_test) = load_mnist(config.data_dir, recorded)
    calibration = calibration_images(x_train, config.calibration) if "int8" in quantizations else None
    if config.device:
        from kernorm import firmware

        tflm_dir = firmware.check_setup(config.device, config.tflm_dir, config.device_images, len(x_test))
    prepare(out_dir, "export", overwrite, EARLIER_EXPORT)
    config.save(os.path.join(out_dir, CONFIG))

    keras_pred = keras_model.predict(x_test[..., None].astype(np.float32), batch_size=KERAS_BATCH,
                                     verbose=0).argmax(-1)
    keras_acc = float((keras_pred == y_test).mean())
    report = {"model": config.model_file, "test_images": len(x_test), "keras_acc": keras_acc,
              "max_drop": config.max_drop, "calibration_images": len(calibration) if calibration is not None else 0,
              "models": {}}
    for quantize in quantizations:
        if verbose:
            print(f"the {quantize} model: converting", flush=True)
        flatbuffer = convert(keras_model, quantize, calibration)
        figures = check(flatbuffer, quantize, x_test, y_test, keras_pred, verbose)
        # Accuracies are multiples of 1/10,000; rounding keeps float noise out of the comparison.
        figures["drop_points"] = round(100 * (keras_acc - figures["tflite_acc"]), 6)
        figures["passed"] = figures["drop_points"] <= config.max_drop
        if verbose:
            print(summary_line(quantize, figures, keras_acc), flush=True)
        if quantize in micro_quantizations:
            figures["micro"] = micro.check(flatbuffer, x_test, y_test, name=f"the {quantize} model", verbose=verbose)
            figures["passed"] = figures["passed"] and figures["micro"]["passed"]
            if verbose:
                print(micro_line(figures["micro"]), flush=True)
            if config.device and figures["passed"]:
                device, device_files = firmware.check(config.device, tflm_dir, f"model_{quantize}", flatbuffer,
                                                      figures["micro"]["arena_bytes"], x_test, y_test,
                                                      config.device_images, verbose)
                figures["micro"]["device"], figures["passed"] = device, device["passed"]
                if verbose:
                    print(firmware.summary_line(device), flush=True)
        stem = f"model_{quantize}"
        figures["file"] = f"{stem}.tflite" if figures["passed"] else None
        if figures["passed"]:
            write_bytes(os.path.join(out_dir, figures["file"]), flatbuffer)
        if "micro" in figures:
            sources = micro.c_sources(stem, flatbuffer, figures["micro"]["arena_bytes"]) if figures["passed"] else {}
            for name, text in sources.items():
                write_text(os.path.join(out_dir, name), text)
            figures["micro"]["files"] = sorted(sources) or None
        if figures["passed"] and "device" in figures.get("micro", {}):
            firmware.write_files(out_dir, device_files)
        report["models"][quantize] = figures
    failed = [q for q, figures in report["models"].items() if not figures["passed"]]
    report["passed"] = not failed
    write_json(os.path.join(out_dir, "export.json"), report)
    if failed:
        raise KernormError(failure_message(report) + f"; no model file written for {', '.join(failed)}, figures in "
                           f"{os.path.join(out_dir, 'export.json')}")
    return report


def failure_message(report):
    """What failed in an export, in one line: the accuracy drops beyond `max_drop`, then the TFLM checks."""
    models, max_drop = report["models"], report["max_drop"]
    drops = [f"{q} dropped {figures['drop_points']:.2f} points" for q, figures in models.items()
             if figures["drop_points"] > max_drop]
    tflm = [f"{q}: {figures['micro']['failure']}" for q, figures in models.items()
            if "micro" in figures and not figures["micro"]["passed"]]
    device = [f"{q}: {figures['micro']['device']['failure']}" for q, figures in models.items()
              if not figures.get("micro", {}).get("device", {"passed": True})["passed"]]
    parts = []
    if drops:
        parts.append(f"accuracy check failed: {', '.join(drops)} (Keras {100 * report['keras_acc']:.2f} %), more "
                     f"than --max-drop {max_drop:g}")
    if tflm:
        parts.append(f"TFLM check failed: {', '.join(tflm)}")
    if device:
        parts.append(f"device check failed: {', '.join(device)}")
    return "; ".join(parts)


def summary_line(quantize, figures, keras_acc):
    """One line of a model's figures, as `kernorm export` prints them; the verdict is LiteRT's accuracy check."""
    verdict = "ok" if figures["passed"] else "FAILED"
    return (f"{quantize:8s} acc {100 * figures['tflite_acc']:6.2f} % (Keras {100 * keras_acc:.2f} %, "
            f"drop {figures['drop_points']:+.2f} pt, agree {100 * figures['agreement']:.2f} %)  "
            f"{figures['size_bytes'] / 1024:5.1f} KiB  batch-1 p50 {figures['latency_us_p50']:4.0f} µs "
            f"p99 {figures['latency_us_p99']:5.0f} µs  {figures['throughput_ips']:7,.0f} img/s  {verdict}")


def micro_line(figures):
    """One line of a model's TFLM figures (`kernorm.micro.check`), printed under its model's line."""
    verdict = "ok" if figures["passed"] else "FAILED"
    if "acc" not in figures:
        return f"{'':8s} TFLM: {figures['failure']}  {verdict}"
    return (f"{'':8s} TFLM acc {100 * figures['acc']:6.2f} % (LiteRT reference {100 * figures['litert_acc']:.2f} %, "
            f"agree {100 * figures['agreement']:.2f} %)  arena {figures['arena_bytes'] / 1024:5.1f} KiB  flash "
            f"{figures['flash_bytes'] / 1024:5.1f} KiB  {figures['macs']:,} MACs  {verdict}")
