"""Running exported `.tflite` models with the LiteRT runtime alone.

This module imports only `ai_edge_litert`, NumPy and `kernorm.errors`, never
TensorFlow, so inference runs where TensorFlow cannot be installed (a
Raspberry Pi, a slim container): `pip install ai-edge-litert numpy` is enough.

The models take raw pixels 0–255 (they normalise inside) and end in 10
logits, not probabilities: a softmax inside an int8 model would squeeze every
probability onto 256 levels of 1/256, rounding the small ones to zero, so
`TFLiteModel.predict` applies the softmax here, in float, on the dequantized
logits.
"""

import collections
import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from kernorm.errors import KernormError

# A TFLite file is a FlatBuffer whose identifier, at bytes 4–8, is "TFL3".
TFLITE_IDENTIFIER = b"TFL3"
PIXEL_RANGE = (0, 255)


def load_tflite(path):
    """Reads a `.tflite` file into a `TFLiteModel`.

    Args:
        path: the file, e.g. one written by `kernorm export`.

    Returns:
        A `TFLiteModel`. A missing, unreadable, truncated, corrupt or
        non-TFLite file raises `KernormError`. (`kernorm.micro.load_tflite`
        runs it with TensorFlow Lite Micro's interpreter instead.)
    """
    return TFLiteModel(read_tflite(path), name=os.fspath(path))


def read_tflite(path):
    """The bytes of a `.tflite` file; one that cannot be read raises `KernormError`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KernormError(f"{path}: cannot read ({e.strerror}); "
                           f"pass a .tflite file written by kernorm export") from None


def check_tflite(content, name="model"):
    """Raises `KernormError` unless `content` begins as a TFLite file does."""
    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise KernormError(f"{name}: not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier); "
                           f"pass a .tflite file written by kernorm export")


def graph_ops(content):
    """The ops of a `.tflite` graph as converted, in the order they run, with their tensors' shapes.

    LiteRT lists ops only through a private method; without its default
    XNNPACK delegate the listing is the converted graph itself.

    Args:
        content: the `.tflite` bytes.

    Returns:
        One dict per op: `name` (e.g. "CONV_2D"), `inputs` and `outputs`: the
        shapes of its tensors at batch 1, as tuples (None for an optional
        input left out), and `types`: the NumPy type name of its first input and of
        its outputs, e.g. `["int8", "int8"]`.
    """
    interpreter = Interpreter(model_content=content,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    details = interpreter.get_tensor_details()
    shapes = {t["index"]: tuple(int(d) for d in t["shape"]) for t in details}
    types = {t["index"]: np.dtype(t["dtype"]).name for t in details}
    return [{"name": op["op_name"], "inputs": [shapes.get(i) for i in op["inputs"]],
             "outputs": [shapes[i] for i in op["outputs"]],
             "types": [types[i] for i in list(op["inputs"][:1]) + list(op["outputs"])]}
            for op in interpreter._get_ops_details()]


def graph_stats(path):
    """The op types of a `.tflite` graph, counted, and the number of pieces XNNPACK runs it in.

    With LiteRT's default XNNPACK delegate, each piece of the graph the
    delegate took shows up as one DELEGATE op.

    Returns:
        `(ops, pieces)`: a `collections.Counter` of op names (see `graph_ops`),
        and the count of DELEGATE ops.
    """
    with open(path, "rb") as f:
        content = f.read()
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    pieces = sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())
    return collections.Counter(op["name"] for op in graph_ops(content)), pieces


class Classifier:
    """An image classifier of one `.tflite` model, whichever interpreter runs it.

    Works for float models (float32, float16, dynamic-range) and full-integer
    ones alike: integer inputs are quantized and integer outputs dequantized
    with the scale and zero point stored in the model itself. A subclass
    runs a batch in `_invoke`: `TFLiteModel` with LiteRT, and
    `kernorm.micro.MicroModel` with TensorFlow Lite Micro.

    Args:
        name: what error messages call the model (its path, say).
        input_details, output_details: the one input's and output's `dtype`,
            `shape` (batch first) and `quantization` (scale, zero point), as
            LiteRT's `get_input_details()` gives them.

    Attributes:
        input_details, output_details: as given.
        image_shape: the shape of one input image, e.g. `(28, 28, 1)`.
        num_classes: length of the output vector.
    """

    def __init__(self, name, input_details, output_details):
        self.name = name
        if len(output_details["shape"]) != 2:
            raise KernormError(f"{name}: has an output of shape {tuple(output_details['shape'])}; kernorm runs "
                               f"image classifiers with one image input and one (batch, classes) output")
        self.input_details, self.output_details = input_details, output_details
        self.image_shape = tuple(int(d) for d in input_details["shape"][1:])
        self.num_classes = int(output_details["shape"][1])

    def predict(self, images, batch_size=None):
        """Class probabilities for a batch of images.

        Args:
            images: raw pixels in 0–255, any real dtype, shape `(N, 28, 28, 1)`
                or `(N, 28, 28)` (generally `(N,) + image_shape`, the last
                axis optional when it is 1).
            batch_size: images per interpreter call; default all N at once.

        Returns:
            float32 array `(N, num_classes)`: the softmax of the model's logits.
        """
        return softmax(self.logits(images, batch_size))

    def logits(self, images, batch_size=None):
        """The model's float logits, `(N, num_classes)`; arguments as `predict`."""
        images = self._check(images)
        if not len(images):
            return np.zeros((0, self.num_classes), np.float32)
        batch_size = batch_size or len(images)
        if len(images) <= batch_size:  # one call needs no concatenation, which a batch-1 loop would pay for
            return self._invoke(images)
        return np.concatenate([self._invoke(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    def _check(self, images):
        images = given = np.asarray(images)
        if images.dtype.kind not in "uif":
            raise KernormError(f"{self.name}: images must be a numeric array of raw pixels, got dtype {images.dtype}")
        if images.ndim == len(self.image_shape) and self.image_shape[-1] == 1:
            images = images[..., None]
        if images.shape[1:] != self.image_shape:
            shapes = "(N, " + ", ".join(map(str, self.image_shape)) + ")"
            if self.image_shape[-1] == 1:
                shapes += " or (N, " + ", ".join(map(str, self.image_shape[:-1])) + ")"
            raise KernormError(f"{self.name}: images have shape {given.shape}; the model takes {shapes}")
        # uint8 holds 0–255 by its type: no min and max to pay for on every batch-1 call.
        if images.size and images.dtype != np.uint8 and not (
                (images.dtype.kind != "f" or np.isfinite(images).all())
                and PIXEL_RANGE[0] <= images.min() and images.max() <= PIXEL_RANGE[1]):
            raise KernormError(f"{self.name}: pixel values must be raw pixels in 0–255 (the model normalises "
                               f"inside), got values from {images.min()} to {images.max()}")
        return images

    def _invoke(self, batch):
        """The float logits of a batch of raw-pixel images of `image_shape`, `(len(batch), num_classes)`."""
        raise NotImplementedError


class TFLiteModel(Classifier):
    """A TFLite image classifier run by LiteRT's interpreter (see `Classifier`).

    The batch size is free: the input tensor is resized to each batch.

    Args:
        content: the bytes of a `.tflite` file.
        name: what error messages call the model (its path, say).
        reference: run it with LiteRT's reference kernels, the plain C++ that
            TFLM's kernels derive from, instead of its optimized kernels and
            XNNPACK delegate, which round int8 arithmetic their own ways:
            slower, and the arithmetic of TFLM (see `kernorm.micro.check`).
    """

    def __init__(self, content, name="model", reference=False):
        check_tflite(content, name)
        try:
            resolver = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
            self._interpreter = Interpreter(model_content=content, experimental_op_resolver_type=resolver)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise KernormError(f"{name}: corrupt or truncated TFLite model ({str(e).splitlines()[0]}); "
                               f"export it again") from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise KernormError(f"{name}: has {len(inputs)} inputs and {len(outputs)} outputs; kernorm runs "
                               f"image classifiers with one image input and one (batch, classes) output")
        super().__init__(name, inputs[0], outputs[0])
        self._batch = int(self.input_details["shape"][0])

    def _invoke(self, batch):
        index = self.input_details["index"]
        if len(batch) != self._batch:
            # Reallocating is costly, so the tensor keeps its size until a batch of another size comes.
            self._interpreter.resize_tensor_input(index, (len(batch),) + self.image_shape)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(index, quantize(batch, self.input_details))
        self._interpreter.invoke()
        return dequantize(self._interpreter.get_tensor(self.output_details["index"]), self.output_details)


def quantize(values, details):
    """Converts real values to a tensor's dtype, `round(x / scale) + zero_point` for integer tensors.

    Args:
        values: a real array.
        details: the tensor's entry of `get_input_details()`.

    Returns:
        An array of the tensor's dtype; integer values are clipped to its range.
    """
    dtype = np.dtype(details["dtype"])
    scale, zero_point = details["quantization"]
    if dtype.kind == "f":
        return values.astype(dtype)
    if values.dtype == dtype and scale in (0, 1) and zero_point == 0:
        return values  # raw uint8 pixels into a uint8 input of scale 1: nothing to compute
    if scale:
        values = np.round(values.astype(np.float32) / scale) + zero_point
    limits = np.iinfo(dtype)
    return np.clip(values, limits.min, limits.max).astype(dtype)


def dequantize(values, details):
    """Real values of a tensor's contents, `(q - zero_point) * scale` for quantized ones, as float32."""
    scale, zero_point = details["quantization"]
    values = values.astype(np.float32)
    if np.dtype(details["dtype"]).kind != "f" and scale:
        # float32 scalars keep the arithmetic in float32: fewer casts, on every call of a batch-1 loop.
        return (values - np.float32(zero_point)) * np.float32(scale)
    return values


def softmax(logits):
    """Probabilities from logits along the last axis, computed stably in float32."""
    logits = np.asarray(logits, np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k(probabilities, k):
    """The `k` most probable classes of one image, best first, as `[(class, probability), ...]`."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(c), float(probabilities[c])) for c in order]
