"""Reading digit images and fitting them into MNIST's 28×28 format, for `kernorm predict`.

MNIST's digits are white on black, cropped to their bounding box, scaled so
the longer side is 20 pixels (keeping the aspect ratio) and pasted into a
28×28 frame with their centre of mass at its centre. A photo or a scan of a
digit goes through the same steps here before a model sees it. Like the
runtime, this module needs no TensorFlow: only Pillow and NumPy.
"""

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from kernorm.errors import KernormError

SIZE = 28
DIGIT_BOX = 20
# Pixels darker than this fraction of the brightest one count as background when cropping.
INK_THRESHOLD = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_digit(path):
    """Reads one digit image as a 28×28 MNIST-style array of raw pixels.

    Args:
        path: a PNG or JPEG file of any size, colour or grayscale, with a
            dark digit on a light background or a light one on dark; or a
            `.npy` file holding one image already in MNIST's format, an array
            of shape `(28, 28)` or `(28, 28, 1)` with values in 0–255.

    Returns:
        uint8 array `(28, 28)`: white digit on black, as in MNIST.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _load_array(path)
    if suffix not in IMAGE_SUFFIXES:
        raise KernormError(f"{path}: unknown image type {suffix or '(no suffix)'}; "
                           f"pass a .png, .jpg, .jpeg or .npy file")
    return fit_digit(_load_gray(path), name=path)


def _load_array(path):
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise KernormError(f"{path}: not a readable .npy array ({e}); save one with numpy.save") from None
    if array.shape not in ((SIZE, SIZE), (SIZE, SIZE, 1)) or array.dtype.kind not in "uif":
        raise KernormError(f"{path}: holds a {array.dtype} array of shape {array.shape}; "
                           f"a .npy digit must be a (28, 28) or (28, 28, 1) array of pixels")
    if not (np.isfinite(array).all() and 0 <= array.min() and array.max() <= 255):
        raise KernormError(f"{path}: pixel values run from {array.min()} to {array.max()}; "
                           f"a .npy digit holds raw pixels in 0-255 (white digit on black)")
    return np.round(array.reshape(SIZE, SIZE)).astype(np.uint8)


def _load_gray(path):
    try:
        with Image.open(path) as image:
            image.load()
            if "A" in image.getbands() or "transparency" in image.info:
                # A transparent background counts as white paper.
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(background, image)
            return np.asarray(image.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise KernormError(f"{path}: not a readable image ({e}); pass a PNG or JPEG file") from None


def fit_digit(gray, name="image"):
    """Fits a grayscale digit into MNIST's 28×28 format.

    Steps: make the digit light on dark (an image whose border is brighter
    than mid-gray is inverted), subtract the background level (the border's
    median) and stretch to 0–255, crop to the digit's bounding box, scale the
    longer side to 20 pixels keeping the aspect ratio, and paste it so that its
    centre of mass lies at the centre of the 28×28 frame.

    Args:
        gray: 2-D array of gray values in 0–255, any size.
        name: what error messages call the image.

    Returns:
        uint8 array `(28, 28)`.
    """
    gray = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127.5:
        gray, border = 255 - gray, 255 - border
    ink = np.clip(gray - np.median(border), 0, None)
    if ink.max() <= 0:
        raise KernormError(f"{name}: blank image, no digit found; pass a picture of one digit")
    ink *= 255 / ink.max()
    rows = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD * 255).any(axis=0))
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    height, width = ink.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray(np.ascontiguousarray(ink)).resize(size, Image.Resampling.LANCZOS))
    digit = np.clip(digit, 0, 255)

    total = digit.sum()
    ys, xs = np.indices(digit.shape)
    centre_y, centre_x = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = int(np.clip(round(SIZE / 2 - centre_y), 0, SIZE - digit.shape[0]))
    left = int(np.clip(round(SIZE / 2 - centre_x), 0, SIZE - digit.shape[1]))
    frame = np.zeros((SIZE, SIZE), np.float32)
    frame[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return np.round(frame).astype(np.uint8)
