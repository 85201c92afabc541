import csv
import io
import json
import math
import os
import re

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kernorm import normcalc as nc
from kernorm.cli import main
from kernorm.errors import KernormError
from kernorm.norms import create_norm_layer

# Two images, four channels, 1×2 pixels: x[image][channel] = [pixel 1, pixel 2].
ACTIVATIONS = [[[[1, 3]], [[2, 2]], [[0, 4]], [[-1, -3]]],
               [[[3, 5]], [[0, 0]], [[2, 2]], [[1, 1]]]]
# Layer 2: channel 1 <- channel 2, channel 2 <- channel 1, channel 3 <- −channel 3, channel 4 <- channel 4.
WEIGHTS = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]]
EPS = 1e-5


@pytest.fixture(scope="module")
def values_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("normcalc") / "values.json"
    path.write_text(json.dumps({"activations": ACTIVATIONS, "weights": WEIGHTS}))
    return str(path)


@pytest.fixture(scope="module")
def calculations():
    return {c.norm: c for c in nc.normcalc(np.array(ACTIVATIONS, float), np.array(WEIGHTS, float), groups=2)}


def test_layer_one_statistics_worked_out_by_hand(calculations):
    # BN, per channel over both images: {1,3,3,5}, {2,2,0,0}, {0,4,2,2}, {-1,-3,1,1}
    bn = calculations["bn"].steps[0]
    assert bn.means == pytest.approx([3, 1, 2, -0.5])
    assert bn.variances == pytest.approx([2, 1, 2, 2.75])
    # LN, per image over all channels: {1,3,2,2,0,4,-1,-3}: mean 1, Σ(x−1)² = 36; {3,5,0,0,2,2,1,1}: 14/8, 19.5
    ln = calculations["ln"].steps[0]
    assert ln.means == pytest.approx([1, 1.75]) and ln.variances == pytest.approx([4.5, 2.4375])
    # GN, per image and channel pair: {1,3,2,2}, {0,4,-1,-3}, {3,5,0,0}, {2,2,1,1}
    gn = calculations["gn"].steps[0]
    assert gn.means == pytest.approx([2, 0, 2, 1.5]) and gn.variances == pytest.approx([0.5, 6.5, 4.5, 0.25])
    assert [label for label, _ in gn.sets] == ["image 1, channels 1–2", "image 1, channels 3–4",
                                              "image 2, channels 1–2", "image 2, channels 3–4"]


def test_layer_one_outputs_worked_out_by_hand(calculations):
    bn = calculations["bn"].steps[0].outputs
    np.testing.assert_allclose(bn[:, 0, 0], [[-2 / math.sqrt(2 + EPS), 0], [0, 2 / math.sqrt(2 + EPS)]], rtol=1e-12)
    assert bn[0, 3, 0, 1] == pytest.approx(-2.5 / math.sqrt(2.75 + EPS))
    ln = calculations["ln"].steps[0].outputs
    assert ln[1, 0, 0, 1] == pytest.approx((5 - 1.75) / math.sqrt(2.4375 + EPS))
    gn = calculations["gn"].steps[0].outputs
    np.testing.assert_allclose(gn[1, 2:, 0], [[0.5 / math.sqrt(0.25 + EPS)] * 2, [-0.5 / math.sqrt(0.25 + EPS)] * 2],
                               rtol=1e-12)  # {2, 2 | 1, 1}, mean 1.5


def test_layer_two_is_relu_of_the_1x1_convolution_then_the_norm_again(calculations):
    step = calculations["bn"].steps[1]
    s = 1 / math.sqrt(1 + EPS)  # BN's layer-1 channel 2 is {1, 1, -1, -1}·s; it becomes layer-2 channel 1
    np.testing.assert_allclose(step.inputs[:, 0, 0], [[s, s], [0, 0]], rtol=1e-12)
    # Layer-2 channel 3 = ReLU(−BN channel 3) = ReLU({2, −2, 0, 0}/√2) = {√2, 0, 0, 0}
    r = 2 / math.sqrt(2 + EPS)
    np.testing.assert_allclose(step.inputs[:, 2, 0], [[r, 0], [0, 0]], rtol=1e-12)
    assert step.means[2] == pytest.approx(r / 4) and step.variances[2] == pytest.approx(r * r * 3 / 16)
    assert step.means[0] == pytest.approx(s / 2) and step.variances[0] == pytest.approx(s * s / 4)
    assert step.outputs[0, 2, 0, 0] == pytest.approx((r - r / 4) / math.sqrt(r * r * 3 / 16 + EPS))


def test_every_number_agrees_with_keras(calculations):
    for calc in calculations.values():
        assert calc.keras_difference < nc.TOLERANCE


@pytest.mark.parametrize("norm, wrong", [
    ("ln", lambda channels, groups: keras.layers.LayerNormalization(axis=-1, epsilon=EPS)),  # per pixel
    ("gn", lambda channels, groups: keras.layers.GroupNormalization(groups=4, epsilon=EPS)),
    ("bn", lambda channels, groups: keras.layers.BatchNormalization(epsilon=1e-3)),
])
def test_cross_check_fails_on_a_misconfigured_layer(norm, wrong):
    def factory(name, channels, groups):
        return wrong(channels, groups) if name == norm else create_norm_layer(name, channels, groups)

    with pytest.raises(nc.CrossCheckError, match=re.escape(nc.TITLES[norm]) + ".*misconfigured"):
        nc.normcalc(np.array(ACTIVATIONS, float), np.array(WEIGHTS, float), 2, norm_factory=factory)


def test_text_and_markdown_show_the_working(values_file):
    text = CliRunner().invoke(main, ["normcalc", "--values", values_file])
    assert text.exit_code == 0, text.output
    assert "  channel 1, all images: 1, 3, 3, 5\n      n = 4, mean = 12 / 4 = 3.0000, variance = 8 / 4 = 2.0000" \
        in text.output
    assert "  image 1, all channels: 1, 3, 2, 2, 0, 4, -1, -3\n      n = 8, mean = 8 / 8 = 1.0000, " \
           "variance = 36 / 8 = 4.5000" in text.output
    assert "image 2    3  5        0  0        2  2        1  1" in text.output
    markdown = CliRunner().invoke(main, ["normcalc", "--values", values_file, "--format", "markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert "| image 2, channels 3–4 | 2, 2, 1, 1 | 4 | 6 | 1.5000 | 1 | 0.2500 |" in markdown.output
    assert markdown.output.count("Keras check: every value above agrees") == 3


def test_csv_holds_every_number(values_file):
    result = CliRunner().invoke(main, ["normcalc", "--values", values_file, "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 16 + 3 * 2 * (16 + 16) + 2 * (4 + 2 + 4) * 2  # weights, inputs/outputs, means/variances
    variance = [r for r in rows if (r["norm"], r["layer"], r["quantity"], r["set"]) ==
                ("ln", "1", "variance", "image 2, all channels")]
    assert [float(r["value"]) for r in variance] == [2.4375]
    weight = [r for r in rows if r["quantity"] == "weight" and r["channel"] == "3" and r["set"] == "from channel 3"]
    assert [float(r["value"]) for r in weight] == [-1]


def test_drawn_values_are_integers_in_the_study_s_range():
    activations, weights = nc.draw_values(batch=4, channels=4, size=2, seed=7)
    assert activations.shape == (4, 4, 2, 2) and weights.shape == (4, 4)
    for values in (activations, weights):
        assert values.min() >= -3 and values.max() <= 3 and (values == np.round(values)).all()
    assert (nc.draw_values(seed=7)[0] == activations).all() and not (nc.draw_values(seed=8)[0] == activations).all()


def test_cli_fails_loudly_when_keras_disagrees(values_file, monkeypatch):
    real = nc.keras_values
    monkeypatch.setattr(nc, "keras_values", lambda *a, **kw: [v + 1e-3 for v in real(*a, **kw)])
    result = CliRunner().invoke(main, ["normcalc", "--values", values_file])
    assert result.exit_code == 1
    assert "Error: Batch normalization (BN): Keras and NumPy disagree on the layer 1 output" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--channels", "4", "--groups", "3"], "--groups 3 does not divide 4 channels"),
    (["--values", "VALUES", "--batch", "2"], "--batch cannot go with --values"),
    (["--values", "/nonexistent.json"], "/nonexistent.json: cannot read the values"),
    (["--format", "xml"], "Invalid value for '--format'"),
])
def test_user_errors(values_file, args, message):
    result = CliRunner().invoke(main, ["normcalc"] + [values_file if a == "VALUES" else a for a in args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_values_file_must_be_rectangular(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"activations": ACTIVATIONS, "weights": [[1, 0], [0, 1]]}))
    with pytest.raises(KernormError, match=r"weights have shape \(2, 2\), expected \(4, 4\)"):
        nc.read_values(str(path))


def test_the_docs_embed_the_current_worked_example():
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "normalization.md")).read()
    embedded = re.search(r"<!-- normcalc: begin.*?-->\n\n(.*)\n<!-- normcalc: end -->", docs, re.S).group(1)
    result = CliRunner().invoke(main, ["normcalc", "--format", "markdown"])
    assert result.exit_code == 0, result.output

    def steady(text):  # the float32 round-off Keras leaves differs between machines
        return re.sub(r"largest difference \S+\)", "largest difference …)", text)

    assert steady(embedded) == steady(result.output)
