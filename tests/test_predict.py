"""`kernorm predict` and the MNIST-style preparation of digit pictures."""

import os
import pathlib
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kernorm.cli import main
from kernorm.errors import KernormError
from kernorm.images import fit_digit, load_digit
from kernorm.runtime import load_tflite

NUMBER_PHOTO = str(pathlib.Path(__file__).parent / "data" / "photos" / "number-012.jpg")  # the README's, 5357

def photo(digit, invert=True, scale=4, margin=(30, 50)):
    """An MNIST digit made to look like a picture: upscaled, off-centre, dark ink on light paper."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    canvas = np.zeros((28 * scale + 2 * margin[0], 28 * scale + 2 * margin[1]), np.uint8)
    canvas[margin[0] * 2:margin[0] * 2 + big.shape[0], margin[1]:margin[1] + big.shape[1]] = big
    return 235 - canvas * (220 / 255) if invert else canvas


def test_fitting_an_mnist_digit_changes_it_little(mnist):
    (_, _), (x_test, _) = mnist
    for digit in x_test[:20]:
        fitted = fit_digit(digit)
        assert fitted.shape == (28, 28) and fitted.dtype == np.uint8
        assert np.abs(fitted.astype(int) - digit).mean() < 2


@pytest.mark.slow
def test_pictures_of_digits_are_fitted_and_classified(exported, mnist, tmp_path):
    (_, _), (x_test, y_test) = mnist
    model = load_tflite(os.path.join(exported["export_dir"], "model_float32.tflite"))
    digits = x_test[:100]
    pictures = []
    for i, digit in enumerate(digits):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(np.round(photo(digit, invert=i % 3 != 0)).astype(np.uint8)).convert("RGB").save(path)
        pictures.append(load_digit(path))
    pictures = np.stack(pictures)
    # Same centre of mass as MNIST, within a pixel, whatever the margins and colours were.
    ys, xs = np.indices((28, 28))
    centre = [(pictures * c).sum((1, 2)) / pictures.sum((1, 2)) for c in (ys, xs)]
    assert np.abs(np.array(centre) - 14).max() <= 1
    original = (model.predict(digits).argmax(-1) == y_test[:100]).mean()
    fitted = (model.predict(pictures).argmax(-1) == y_test[:100]).mean()
    assert fitted >= original - 0.05


def test_transparent_png_counts_as_white_paper(mnist, tmp_path):
    (_, _), (x_test, _) = mnist
    rgba = np.zeros((112, 112, 4), np.uint8)  # black ink, alpha = ink: transparent background
    rgba[..., 3] = np.asarray(Image.fromarray(x_test[0]).resize((112, 112)))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ink.png")
    fitted = load_digit(tmp_path / "ink.png")
    assert fitted[0].max() == 0 and fitted.max() > 200  # white digit on black
    assert np.corrcoef(fitted.ravel(), fit_digit(x_test[0]).ravel())[0, 1] > 0.9


@pytest.mark.slow
def test_predict_prints_top_k_with_probabilities(exported, mnist, tmp_path):
    (_, _), (x_test, y_test) = mnist
    model_file = os.path.join(exported["export_dir"], "model_int8.tflite")
    np.save(tmp_path / "a.npy", x_test[0])
    np.save(tmp_path / "b.npy", x_test[1][..., None].astype(np.float32))
    Image.fromarray(np.round(photo(x_test[2])).astype(np.uint8)).save(tmp_path / "c.png")
    result = CliRunner().invoke(main, ["predict", model_file, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                                       str(tmp_path / "c.png"), "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    expected = load_tflite(model_file).predict(np.stack([x_test[0], x_test[1], load_digit(tmp_path / "c.png")]))
    for line, name, probs in zip(lines, ["a.npy", "b.npy", "c.png"], expected):
        path, ranked = line.split(": ")
        assert path.endswith(name)
        best, second = np.argsort(-probs)[:2]
        assert ranked == f"{best} ({probs[best]:.3f}), {second} ({probs[second]:.3f})"
    assert lines[0].split(": ")[1].startswith(f"{y_test[0]} (")


@pytest.mark.slow
def test_unreadable_images_and_wrong_arrays_give_one_clear_line(exported, tmp_path):
    model_file = os.path.join(exported["export_dir"], "model_float32.tflite")
    (tmp_path / "text.png").write_text("not a picture")
    np.save(tmp_path / "small.npy", np.zeros((27, 28)))
    np.save(tmp_path / "bright.npy", np.full((28, 28), 300.0))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(tmp_path / "blank.png")
    lined = np.full((120, 160), 220, np.uint8)
    lined[10::24] = lined[11::24] = 140  # ruled paper, no digit
    Image.fromarray(lined).save(tmp_path / "lined.png")
    (tmp_path / "digit.gif").write_bytes(b"GIF89a")
    (tmp_path / "model.tflite").write_bytes(b"junk")
    cases = [
        ([model_file, str(tmp_path / "text.png")], "text.png: not a readable image"),
        ([model_file, str(tmp_path / "small.npy")], "shape (27, 28); a .npy digit must be a (28, 28)"),
        ([model_file, str(tmp_path / "bright.npy")], "bright.npy: pixel values run from 300.0 to 300.0"),
        ([model_file, str(tmp_path / "objects.npy")], "objects.npy: not a readable .npy array"),
        ([model_file, str(tmp_path / "blank.png")], "blank.png: blank image, no digit found"),
        ([model_file, str(tmp_path / "lined.png"), "--digits"], "lined.png: no digit-like strokes found"),
        ([model_file, "--digits", str(tmp_path / "small.npy"), "--max-digits", "0"], "Invalid value for '--max"),
        ([model_file, str(tmp_path / "small.npy"), "--max-digits", "3"], "--max-digits limits --digits; add --digits"),
        ([model_file, str(tmp_path / "digit.gif")], "unknown image type .gif"),
        ([model_file, str(tmp_path / "missing.png")], "missing.png: not a readable image"),
        ([str(tmp_path / "model.tflite"), str(tmp_path / "small.npy")], "not a TFLite model"),
        ([model_file], "Missing argument 'IMAGE...'"),
        ([model_file, str(tmp_path / "small.npy"), "--top", "0"], "Invalid value for '--top'"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["predict"] + args)
        assert result.exit_code != 0, args
        assert message in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_predict_answers_every_image_and_exits_1_if_one_failed(exported, mnist, tmp_path):
    (_, _), (x_test, _) = mnist
    model_file = os.path.join(exported["export_dir"], "model_int8.tflite")
    np.save(tmp_path / "a.npy", x_test[0])
    np.save(tmp_path / "c.npy", x_test[1])
    (tmp_path / "bad.txt").write_text("not a picture")
    images = [str(tmp_path / name) for name in ["a.npy", "bad.txt", "c.npy"]]
    result = CliRunner().invoke(main, ["predict", model_file] + images)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    expected = load_tflite(model_file).predict(x_test[:2]).argmax(-1)
    assert lines[0].startswith(f"{images[0]}: {expected[0]} (")
    assert lines[1] == f"Error: {images[1]}: unknown image type .txt; pass a .png, .jpg, .jpeg or .npy file"
    assert lines[2].startswith(f"{images[2]}: {expected[1]} (") and len(lines) == 3
    assert "Traceback" not in result.output

    # A model that cannot be loaded: one line before any image.
    (tmp_path / "model.tflite").write_bytes(b"junk")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "model.tflite")] + images)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path / 'model.tflite'}: not a TFLite model"), lines


@pytest.mark.slow
def test_every_predict_form_of_the_readme_works(exported, mnist, tmp_path):
    (_, _), (x_test, _) = mnist
    model_file = os.path.join(exported["export_dir"], "model_int8.tflite")
    np.save(tmp_path / "two.npy", x_test[1])
    two = str(tmp_path / "two.npy")
    # --digits is a flag wherever it stands; --max-digits N limits it wherever it stands.
    numbers = set()
    for args in [[model_file, "--digits", NUMBER_PHOTO], [model_file, NUMBER_PHOTO, "--digits"],
                 ["--digits", model_file, NUMBER_PHOTO], [model_file, "--max-digits", "4", NUMBER_PHOTO, "--digits"],
                 [model_file, "--digits", NUMBER_PHOTO, "--max-digits", "10", "--runtime", "litert"]]:
        result = CliRunner().invoke(main, ["predict"] + args)
        assert result.exit_code == 0, (args, result.output)
        assert re.fullmatch(r".*number-012\.jpg: \d{4} \((\d \d\.\d{3}, ){3}\d \d\.\d{3}\)", result.output.strip()), (
            args, result.output)
        numbers.add(result.output)
    assert len(numbers) == 1
    result = CliRunner().invoke(main, ["predict", model_file, NUMBER_PHOTO, "--max-digits", "3", "--digits"])
    assert result.exit_code == 1 and "found 4 digits, more than the 3 allowed" in result.output

    crops = tmp_path / "crops"
    result = CliRunner().invoke(main, ["predict", model_file, two, "--top", "3", "--debug-dir", str(crops)])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r".*two\.npy: (\d \(\d\.\d{3}\), ){2}\d \(\d\.\d{3}\)", result.output.strip()), result.output
    assert os.listdir(crops) == ["two.png"]  # `--runtime micro`: test_micro.py


def test_fit_digit_rejects_a_blank_array():
    with pytest.raises(KernormError, match="blank image"):
        fit_digit(np.zeros((10, 10)))
