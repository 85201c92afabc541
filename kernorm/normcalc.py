"""`kernorm normcalc`: batch, layer and group normalization worked out number by number, and checked by Keras.

The study worked BN, LN and GN out by hand on a batch of 4 images of 2×2 pixels
with 4 channels, for two successive layers, from integers drawn in [-3, 3].
Here the two layers are:

- layer 1: the drawn integers are a layer's activations; the norm turns them
  into (x − mean) / √(variance + ε).
- layer 2: the next layer in the study's order conv → ReLU → norm. A 1×1
  convolution (integer weights, also drawn in [-3, 3]) mixes layer 1's
  normalized channels at each pixel, ReLU clips the negatives, and the same
  norm normalizes the result with statistics of its own.

The norm's scale γ and shift β are left at their initial 1 and 0, so the
normalized values are the layer's outputs. Arrays here are laid out
`(image, channel, row, column)`, as a person writes them down; Keras's layers
get them as `(image, row, column, channel)`.

Every number is computed twice: in NumPy, step by step, and by kernorm's own
Keras layers (`kernorm.norms.create_norm_layer`, BN in training mode). Keras
does not expose a layer's means and variances, so the check compares every
value the layers output: a mean off by δ would move all the outputs of its set
by δ / √(variance + ε).
"""

import csv
import io
import json

import keras
import numpy as np

from kernorm.config import DEFAULT_GROUPS
from kernorm.errors import KernormError
from kernorm.norms import EPSILON, create_norm_layer

NORMS = ("bn", "ln", "gn")
TITLES = {"bn": "Batch normalization (BN)", "ln": "Layer normalization (LN)", "gn": "Group normalization (GN)"}
DRAW_LOW, DRAW_HIGH = -3, 3  # the study's sheet drew integers in [-3, 3]
TOLERANCE = 1e-5


class CrossCheckError(RuntimeError):
    """NumPy's and Keras's numbers differ by more than `TOLERANCE`: a norm layer is misconfigured."""


def draw_values(batch=4, channels=4, size=2, seed=1):
    """Draws the example: integer activations and 1×1-convolution weights in [-3, 3].

    Returns:
        `(activations, weights)`: `(batch, channels, size, size)` and
        `(channels, channels)` float arrays; `weights[k, j]` takes input channel
        j to output channel k.
    """
    rng = np.random.default_rng(seed)
    activations = rng.integers(DRAW_LOW, DRAW_HIGH + 1, (batch, channels, size, size)).astype(float)
    weights = rng.integers(DRAW_LOW, DRAW_HIGH + 1, (channels, channels)).astype(float)
    return activations, weights


def read_values(path):
    """Reads the example from a JSON file `{"activations": [image][channel][row][col], "weights": [out][in]}`.

    Returns:
        `(activations, weights)` as `draw_values` does.
    """
    try:
        with open(path) as f:
            data = json.load(f)
        activations = np.array(data["activations"], dtype=float)
        weights = np.array(data["weights"], dtype=float)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise KernormError(f"{path}: cannot read the values ({type(e).__name__}: {e}); it must be JSON "
                           f'{{"activations": [image][channel][row][col], "weights": [out][in]}}') from None
    if activations.ndim != 4 or 0 in activations.shape:
        raise KernormError(f"{path}: activations have shape {activations.shape}; write them as "
                           f"[image][channel][row][col] lists of numbers")
    channels = activations.shape[1]
    if weights.shape != (channels, channels):
        raise KernormError(f"{path}: weights have shape {weights.shape}, expected ({channels}, {channels}): "
                           f"one row per output channel, one column per input channel")
    return activations, weights


def sharing_sets(norm, shape, groups):
    """The groups of values that share one mean and variance.

    Args:
        norm: "bn" (per channel over all images and pixels), "ln" (per image
            over all its channels and pixels) or "gn" (per image and group of
            channels).
        shape: `(images, channels, rows, columns)`.
        groups: channel groups for "gn".

    Returns:
        A list of `(label, mask)`, mask a boolean array of `shape`.
    """
    images, channels = shape[:2]

    def mask(image=slice(None), channel=slice(None)):
        m = np.zeros(shape, bool)
        m[image, channel] = True
        return m

    if norm == "bn":
        return [(f"channel {c + 1}, all images", mask(channel=c)) for c in range(channels)]
    if norm == "ln":
        return [(f"image {i + 1}, all channels", mask(image=i)) for i in range(images)]
    size = channels // groups
    return [(f"image {i + 1}, channels {g * size + 1}–{(g + 1) * size}", mask(i, slice(g * size, (g + 1) * size)))
            for i in range(images) for g in range(groups)]


def describe_sets(norm, shape, groups):
    """One sentence saying which values share statistics."""
    images, channels, rows, cols = shape
    pixels = f"{rows}×{cols} pixels"
    if norm == "bn":
        return (f"one mean and variance per channel, over all {images} images and their {pixels} "
                f"({images * rows * cols} values each)")
    if norm == "ln":
        return (f"one mean and variance per image, over all its {channels} channels and their {pixels} "
                f"({channels * rows * cols} values each)")
    size = channels // groups
    return (f"one mean and variance per image and group of {size} channels ({groups} groups), over those "
            f"channels' {pixels} ({size * rows * cols} values each)")


class Step:
    """One norm applied to one layer's values, with every number a hand calculation writes down.

    Attributes:
        inputs: `(images, channels, rows, cols)` values before the norm.
        sets: `(label, mask)` pairs from `sharing_sets`.
        means, variances: one per set; the variance is the population one (divided by n).
        outputs: `(inputs − mean) / √(variance + ε)` with each value's own set's statistics.
    """

    def __init__(self, inputs, sets):
        self.inputs, self.sets = inputs, sets
        self.means = np.array([inputs[m].mean() for _, m in sets])
        self.variances = np.array([((inputs[m] - mean) ** 2).mean() for (_, m), mean in zip(sets, self.means)])
        self.outputs = np.empty_like(inputs)
        for (_, m), mean, var in zip(sets, self.means, self.variances):
            self.outputs[m] = (inputs[m] - mean) / np.sqrt(var + EPSILON)


def next_layer_input(outputs, weights):
    """Layer 2's input: ReLU of the 1×1 convolution `Σ_j weights[k, j] · outputs[:, j]`."""
    return np.maximum(np.einsum("kj,bjhw->bkhw", weights, outputs), 0)


class Calculation:
    """A norm worked out on both layers: `steps[0]` for layer 1, `steps[1]` for layer 2."""

    def __init__(self, norm, activations, weights, groups):
        self.norm, self.groups = norm, groups
        sets = sharing_sets(norm, activations.shape, groups)
        first = Step(activations, sets)
        self.steps = [first, Step(next_layer_input(first.outputs, weights), sets)]
        self.keras_difference = None  # set by cross_check


def keras_values(norm, activations, weights, groups, norm_factory=create_norm_layer):
    """The same two layers computed by Keras layers from `norm_factory`.

    Args:
        norm: "bn", "ln" or "gn".
        activations: `(images, channels, rows, cols)` layer-1 values.
        weights: `(channels, channels)` 1×1-convolution weights, `[out, in]`.
        groups: channel groups for "gn".
        norm_factory: `(norm, channels, groups) -> layer`; kernorm's `create_norm_layer`.

    Returns:
        `[layer-1 outputs, layer-2 inputs, layer-2 outputs]`, each `(images, channels, rows, cols)`.
    """
    channels = activations.shape[1]
    conv = keras.layers.Conv2D(channels, 1, use_bias=False,
                               kernel_initializer=keras.initializers.Constant(weights.T[None, None]))
    first, second = norm_factory(norm, channels, groups), norm_factory(norm, channels, groups)
    x = activations.transpose(0, 2, 3, 1).astype("float32")
    y1 = first(x, training=True)
    z = keras.layers.ReLU()(conv(y1))
    y2 = second(z, training=True)
    return [keras.ops.convert_to_numpy(v).transpose(0, 3, 1, 2) for v in (y1, z, y2)]


def cross_check(calculation, activations, weights, norm_factory=create_norm_layer):
    """Compares every number of `calculation` with Keras's; raises CrossCheckError beyond `TOLERANCE`.

    Returns:
        The largest absolute difference found (also stored as `calculation.keras_difference`).
    """
    first, second = calculation.steps
    ours = [first.outputs, second.inputs, second.outputs]
    names = ["layer 1 output", "layer 2 input (1×1 conv, ReLU)", "layer 2 output"]
    theirs = keras_values(calculation.norm, activations, weights, calculation.groups, norm_factory)
    largest = 0.0
    for name, a, b in zip(names, ours, theirs):
        diff = np.abs(a - b)
        worst = np.unravel_index(diff.argmax(), diff.shape)
        if diff[worst] > TOLERANCE:
            image, channel, row, col = (int(i) + 1 for i in worst)
            raise CrossCheckError(
                f"{TITLES[calculation.norm]}: Keras and NumPy disagree on the {name} at image {image}, "
                f"channel {channel}, pixel ({row}, {col}): {b[worst]:.6f} vs {a[worst]:.6f} "
                f"(difference {diff[worst]:.1e} > {TOLERANCE:g}); the Keras norm layer is misconfigured")
        largest = max(largest, float(diff.max()))
    calculation.keras_difference = largest
    return largest


def normcalc(activations, weights, groups=DEFAULT_GROUPS, norm_factory=create_norm_layer):
    """Works BN, LN and GN out on the two layers and checks every number with Keras.

    Args:
        activations: `(images, channels, rows, cols)` layer-1 values.
        weights: `(channels, channels)` weights of the 1×1 convolution into layer 2, `[out, in]`.
        groups: channel groups for GN; must divide the channel count.
        norm_factory: builds the Keras norm layers; kernorm's `create_norm_layer`.

    Returns:
        A `Calculation` per norm, in the order of `NORMS`.
    """
    channels = activations.shape[1]
    if groups < 1 or channels % groups:
        raise KernormError(f"--groups {groups} does not divide {channels} channels; pick a divisor of {channels}")
    calculations = [Calculation(norm, activations, weights, groups) for norm in NORMS]
    for calculation in calculations:
        cross_check(calculation, activations, weights, norm_factory)
    return calculations


# ---- Layout: text, markdown and CSV --------------------------------------------------------------

def number(value):
    """A value as a student writes it: integers bare, others with 4 decimals."""
    value = float(value)
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.4f}"


def grid(values, column="channel"):
    """A `(images, channels, rows, cols)` array as aligned text: one line of cells per pixel row."""
    images, channels, rows, cols = values.shape
    texts = np.vectorize(number)(values)
    width = max(len(t) for t in texts.flat)
    cell = max(cols * width + cols - 1, len(f"{column} {channels}"))
    label = len(f"image {images}")
    lines = [" " * label + "".join(f"   {f'{column} {c + 1}':<{cell}}" for c in range(channels)).rstrip()]
    for i in range(images):
        for r in range(rows):
            head = f"image {i + 1}" if r == 0 else ""
            cells = ("   " + " ".join(f"{t:>{width}}" for t in texts[i, c, r]) for c in range(channels))
            lines.append(f"{head:<{label}}" + "".join(f"{c:<{cell + 3}}" for c in cells).rstrip())
        if i < images - 1 and rows > 1:
            lines.append("")
    return "\n".join(lines)


def weights_grid(weights):
    """The 1×1-convolution weights as aligned text: a row per output channel."""
    texts = [[number(w) for w in row] for row in weights]
    width = max(len(t) for row in texts for t in row)
    head = "from channel"
    label = len(f"to channel {len(weights)}")
    lines = [" " * label + "  " + " ".join(f"{j + 1:>{width}}" for j in range(len(weights))) + "   ← " + head]
    lines += [f"{f'to channel {k + 1}':<{label}}  " + " ".join(f"{t:>{width}}" for t in row)
              for k, row in enumerate(texts)]
    return "\n".join(lines)


def _statistics(step):
    """Per set: label, its values, n, Σx, mean, Σ(x − mean)², variance."""
    for (label, m), mean, var in zip(step.sets, step.means, step.variances):
        values = step.inputs[m]
        yield label, values, values.size, values.sum(), mean, ((values - mean) ** 2).sum(), var


NORMALIZED = f"normalized = (x − mean) / √(variance + {EPSILON:g}); γ = 1 and β = 0, their initial values"
MEAN_VARIANCE = "mean = Σx / n and variance = Σ(x − mean)² / n, the population variance"


def _intro(calculations, activations, weights):
    images, channels, rows, cols = activations.shape
    return (f"{images} images of {rows}×{cols} pixels with {channels} channels, ε = {EPSILON:g}, "
            f"GN with {calculations[0].groups} groups.",
            "Layer 2 is a 1×1 convolution of layer 1's normalized output (the weights below), then ReLU, "
            "then the same norm again: the study's conv → ReLU → norm order.")


def _layer_title(index, norm):
    if index == 0:
        return "Layer 1"
    return f"Layer 2: ReLU(1×1 convolution of layer 1's {norm.upper()} output), then {norm.upper()}"


def format_text(calculations, activations, weights):
    """The whole calculation as plain text, aligned for a terminal."""
    first, second = _intro(calculations, activations, weights)
    out = [first, second, "", "Layer 1 values (the same for all three norms):", grid(activations), "",
           "1×1 convolution weights into layer 2:", weights_grid(weights)]
    for calc in calculations:
        title = TITLES[calc.norm]
        out += ["", "", title, "=" * len(title),
                f"Shares statistics: {describe_sets(calc.norm, activations.shape, calc.groups)}."]
        for index, step in enumerate(calc.steps):
            heading = _layer_title(index, calc.norm)
            out += ["", heading, "-" * len(heading)]
            if index:
                out += ["Input:", grid(step.inputs), ""]
            out += [f"Statistics: {MEAN_VARIANCE}."]
            for label, values, n, total, mean, squares, var in _statistics(step):
                out += [f"  {label}: {', '.join(number(v) for v in values)}",
                        f"      n = {n}, mean = {number(total)} / {n} = {mean:.4f}, "
                        f"variance = {number(squares)} / {n} = {var:.4f}"]
            out += ["", f"Output, {NORMALIZED}:", grid(step.outputs)]
        out += ["", f"Keras check: every value above agrees with kernorm's Keras layers "
                    f"(largest difference {calc.keras_difference:.1e})."]
    return "\n".join(out) + "\n"


def format_markdown(calculations, activations, weights):
    """The whole calculation as markdown: headings, statistics tables, grids in text blocks."""
    def block(text):
        return ["```text", text, "```"]

    first, second = _intro(calculations, activations, weights)
    out = [first, second, "", "**Layer 1 values** (the same for all three norms):", "", *block(grid(activations)),
           "", "**1×1 convolution weights** into layer 2:", "", *block(weights_grid(weights))]
    for calc in calculations:
        out += ["", f"### {TITLES[calc.norm]}", "",
                f"Shares statistics: {describe_sets(calc.norm, activations.shape, calc.groups)}."]
        for index, step in enumerate(calc.steps):
            out += ["", f"#### {_layer_title(index, calc.norm)}", ""]
            if index:
                out += ["Input:", "", *block(grid(step.inputs)), ""]
            out += [f"Statistics: {MEAN_VARIANCE}.", "",
                    "| values sharing statistics | values | n | Σx | mean | Σ(x − mean)² | variance |",
                    "|---|---|---|---|---|---|---|"]
            for label, values, n, total, mean, squares, var in _statistics(step):
                out.append(f"| {label} | {', '.join(number(v) for v in values)} | {n} | {number(total)} | "
                           f"{mean:.4f} | {number(squares)} | {var:.4f} |")
            out += ["", f"Output, {NORMALIZED}:", "", *block(grid(step.outputs))]
        out += ["", f"Keras check: every value above agrees with kernorm's Keras layers "
                    f"(largest difference {calc.keras_difference:.1e})."]
    return "\n".join(out) + "\n"


CSV_FIELDS = ["norm", "layer", "quantity", "set", "image", "channel", "row", "col", "value"]


def format_csv(calculations, activations, weights):
    """Every number as one CSV row (1-based indices): inputs, weights, means, variances and outputs.

    `quantity` is `input`, `weight` (`channel` = output channel, `set` = the
    input channel it comes from), `mean`, `variance` (`set` names the values
    sharing it) or `output`.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()

    def cells(norm, layer, quantity, values):
        for (i, c, r, k), v in np.ndenumerate(values):
            writer.writerow({"norm": norm, "layer": layer, "quantity": quantity, "image": i + 1, "channel": c + 1,
                             "row": r + 1, "col": k + 1, "value": repr(float(v))})

    for (k, j), w in np.ndenumerate(weights):
        writer.writerow({"layer": 2, "quantity": "weight", "set": f"from channel {j + 1}", "channel": k + 1,
                         "value": repr(float(w))})
    for calc in calculations:
        for layer, step in enumerate(calc.steps, 1):
            cells(calc.norm, layer, "input", step.inputs)
            for (label, _), mean, var in zip(step.sets, step.means, step.variances):
                writer.writerow({"norm": calc.norm, "layer": layer, "quantity": "mean", "set": label,
                                 "value": repr(float(mean))})
                writer.writerow({"norm": calc.norm, "layer": layer, "quantity": "variance", "set": label,
                                 "value": repr(float(var))})
            cells(calc.norm, layer, "output", step.outputs)
    return buf.getvalue()


FORMATTERS = {"text": format_text, "markdown": format_markdown, "csv": format_csv}
