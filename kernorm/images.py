"""Reading photos of handwritten digits and fitting them into MNIST's 28×28 format, for `kernorm predict`.

MNIST's digits are white on black, cropped to their bounding box, scaled so
the longer side is 20 pixels (keeping the aspect ratio) and pasted into a
28×28 frame with their centre of mass at its centre. A photo of a digit, or of
a number, goes through the same steps here before a model sees it, once its
strokes have been told apart from the photo's noise, uneven light, shadows,
paper lines and specks: `ink_map`, `stroke_mask`, `digit_groups`. Like the
runtime, this module needs no TensorFlow: OpenCV, Pillow and NumPy.
"""

import math
import os

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from kernorm.errors import KernormError
from kernorm.files import atomic_path

SIZE = 28
DIGIT_BOX = 20
# Ink fainter than this fraction of the digit's darkest lies outside its bounding box, as in MNIST.
INK_THRESHOLD = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Finding the strokes. A larger picture is shrunk until its shorter side is WORK_SIDE pixels
# (plenty for a digit, and fast); the sizes below are fractions of that side.
WORK_SIDE = 256
DENOISE = 1 / 50  # median filter against sensor noise and JPEG's blocks
PAPER_WINDOW = 3 / 4  # median filter whose output is the paper as lit: far wider than any stroke
# Ink is at least this much darker than the paper around it, as a fraction of the paper's brightness.
MIN_CONTRAST = 0.25
LINE_SPAN = 0.9  # a component this long across the picture is a ruled line, a grid or an edge
LINE_CONTRAST = 0.75  # lines at most this fraction of the ink's darkness are thresholded away
# Paper lines are narrower than pen strokes: at least LINE_WIDTH pixels wide is tried first, then wider,
# up to MAX_LINE_WIDTH of the side, until the lines come apart from the strokes (see `_line_pixels`).
LINE_WIDTH = 5
MAX_LINE_WIDTH = 0.05
SPECK = 0.03  # components smaller than this both ways are specks
MIN_HEIGHT = 0.1  # strokes shorter than this are no digit
# A component joins the digit before it (a 5's flag, a broken stroke) when their horizontal extents
# overlap by half the narrower one's and they lie at most MERGE_GAP apart vertically.
MERGE_OVERLAP = 0.5
MERGE_GAP = 0.08
GROW = 2  # pixels of soft edge kept around the strokes, as MNIST's digits have
# Cutting touching digits apart: a cut crosses at most CUT_STROKES stroke widths of ink and leaves
# pieces at least PIECE_HEIGHT of the group's height; groups narrower than MIN_CUT_WIDTH of their
# height are one digit; at most MAX_CUTS places are tried per group.
CUT_STROKES = 1.5
PIECE_HEIGHT = 0.6
MIN_CUT_WIDTH = 0.3
MAX_CUTS = 16


def load_digit(path):
    """Reads a picture of one digit as a 28×28 MNIST-style array of raw pixels.

    Args:
        path: a PNG or JPEG file of any size, colour or grayscale, with a
            dark digit on a light background or a light one on dark (see
            `fit_digit`); or a `.npy` file holding one image already in
            MNIST's format, an array of shape `(28, 28)` or `(28, 28, 1)` with
            values in 0–255.

    Returns:
        uint8 array `(28, 28)`: white digit on black, as in MNIST.
    """
    path = os.fspath(path)
    if _suffix(path) == ".npy":
        return _load_array(path)
    return fit_digit(_load_gray(path), name=path)


def load_digits(path, classify, max_digits=None):
    """Reads a picture of a handwritten number as its digits, left to right.

    Args:
        path: a PNG or JPEG file, as for `load_digit`; a `.npy` file holds one
            digit.
        classify: a function from uint8 crops `(N, 28, 28)` to class
            probabilities `(N, 10)`, e.g. `TFLiteModel.predict`; it decides
            where touching digits are cut apart (see `fit_digits`).
        max_digits: the most digits accepted; a picture with more raises
            `KernormError`. None: any number.

    Returns:
        uint8 array `(N, 28, 28)`: each digit fitted as MNIST's, left to right.
    """
    path = os.fspath(path)
    if _suffix(path) == ".npy":
        return _load_array(path)[None]
    return fit_digits(_load_gray(path), classify, max_digits, name=path)


def save_crops(folder, name, crops):
    """Writes 28×28 crops as PNG files into `folder`, each whole or not at all.

    Args:
        folder: created if missing.
        name: the files' stem: one crop becomes `<name>.png`, several
            `<name>-1.png`, `<name>-2.png`, ... left to right.
        crops: uint8 array `(N, 28, 28)`.
    """
    os.makedirs(folder, exist_ok=True)
    for i, crop in enumerate(crops, 1):
        path = os.path.join(folder, f"{name}.png" if len(crops) == 1 else f"{name}-{i}.png")
        with atomic_path(path) as tmp:
            Image.fromarray(crop).save(tmp)


def _suffix(path):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES + (".npy",):
        raise KernormError(f"{path}: unknown image type {suffix or '(no suffix)'}; "
                           f"pass a .png, .jpg, .jpeg or .npy file")
    return suffix


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
    """Fits a picture of one digit into MNIST's 28×28 format.

    The digit's strokes are found (`find_digits`): every digit-like group of
    strokes in the picture counts as the one digit, as every stroke of an
    MNIST image does. Their ink, with its soft edges and nothing else (paper
    lines, specks and shadows around them stay out), is fitted by `fit_ink`.

    Args:
        gray: 2-D array of gray values in 0–255, any size.
        name: what error messages call the picture.

    Returns:
        uint8 array `(28, 28)`.
    """
    ink, labels, groups = find_digits(gray, name)
    return _crop(ink, np.isin(labels, [label for group in groups for label in group]))


def fit_digits(gray, classify, max_digits=None, name="image"):
    """Fits a picture of a handwritten number into MNIST's format, one 28×28 crop per digit.

    Each digit-like group of strokes (`find_digits`) is a digit, unless
    `classify` reads it better cut in two: digits that touch. A cut follows
    the group's slant, crosses at most `CUT_STROKES` stroke widths of ink and
    leaves pieces of at least `PIECE_HEIGHT` of the group's height; the cut
    whose pieces' confidences multiply to the most is made if that beats the
    whole's confidence, and each piece is tried again.

    Args:
        gray: 2-D array of gray values in 0–255, any size.
        classify: a function from uint8 crops `(N, 28, 28)` to probabilities
            `(N, 10)`, e.g. `TFLiteModel.predict`.
        max_digits: the most digits accepted, or None for any number.
        name: what error messages call the picture.

    Returns:
        uint8 array `(N, 28, 28)`, the digits left to right.
    """
    ink, labels, groups = find_digits(gray, name)
    regions = [piece for group in groups for piece in _split(ink, np.isin(labels, group), classify)]
    if max_digits is not None and len(regions) > max_digits:
        raise KernormError(f"{name}: found {len(regions)} digits, more than the {max_digits} allowed; "
                           f"allow more (--max-digits N), or photograph fewer digits")
    return np.stack([_crop(ink, region) for region in regions])


def find_digits(gray, name="image"):
    """Finds the strokes of the digits in a picture.

    Args:
        gray: 2-D array of gray values in 0–255, any size.
        name: what error messages call the picture.

    Returns:
        `(ink, labels, groups)`: the picture's `ink_map` `(h, w)`; its strokes'
        connected components, int32 `(h, w)` (0 for none); and one list of
        component labels per digit-like group of strokes, left to right (see
        `digit_groups`). A blank picture, or one without digit-like strokes,
        raises `KernormError`.
    """
    ink = ink_map(gray)
    if ink.max() < MIN_CONTRAST:
        raise KernormError(f"{name}: blank image, no digit found; pass a picture of a digit, dark on light "
                           f"paper or light on dark")
    labels, groups = digit_groups(stroke_mask(ink))
    if not groups:
        raise KernormError(f"{name}: no digit-like strokes found (only specks, lines or edges); photograph the "
                           f"digits whole, filling a good part of the picture, with paper around them")
    return ink, labels, groups


def ink_map(gray):
    """How much darker than the paper around it each pixel is: the picture with its uneven light taken out.

    The picture is shrunk to at most `WORK_SIDE` pixels on its shorter side
    and median-filtered against noise. A median filter far wider than any
    stroke then gives the paper's brightness at each pixel, shadows and
    gradients of light included, since strokes are too thin to move a median;
    a pixel's ink is its shortfall from that brightness, as a fraction of it.
    Light ink on dark (chalk, or MNIST's own images) is turned to dark on
    light first: the ink lies on the side where the picture departs most from
    its paper.

    Args:
        gray: 2-D array of gray values in 0–255, any size.

    Returns:
        float32 array `(h, w)` in 0–1: 0 for paper, near 1 for black ink; the
        picture's shape, shrunk so that `min(h, w) <= WORK_SIDE`.
    """
    gray = np.asarray(gray, np.float32)
    scale = WORK_SIDE / min(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    side = min(gray.shape)
    gray = cv2.medianBlur(gray, _odd(DENOISE * side))
    paper = cv2.medianBlur(gray, _odd(PAPER_WINDOW * side))
    away = gray.astype(np.float32) - paper
    if away[away > 0].sum() > -away[away < 0].sum():
        gray, paper = 255 - gray, 255 - paper
    paper = paper.astype(np.float32)
    return np.clip((paper - gray) / np.maximum(paper, 1), 0, 1)


def stroke_mask(ink):
    """Which pixels of an ink map are strokes: ink above Otsu's threshold, without the paper's lines.

    The threshold is Otsu's, and at least `MIN_CONTRAST`. Ruled lines, a
    grid, a page's edge show up as components that run across `LINE_SPAN` of
    the picture in a generous mask (half the threshold); their pixels outside
    the strokes that cross them are found by their width (`_line_pixels`).
    Lines fainter than the ink (`LINE_CONTRAST`) raise the threshold to
    halfway between them and the ink, so that they vanish, whatever their
    slant. The lines' pixels are then taken out, so that the strokes that
    cross them stay and come apart from them; what still runs across the
    picture (a page's edge) is dropped whole.

    Args:
        ink: float32 `(h, w)` ink map in 0–1 (`ink_map`).

    Returns:
        bool array `(h, w)`.
    """
    otsu, _ = cv2.threshold(np.round(ink * 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(otsu / 255, MIN_CONTRAST)
    mask = ink > threshold
    lines = _line_pixels(ink > threshold / 2)
    if lines.any() and mask.any():
        line, strokes = np.median(ink[lines]), np.percentile(ink[mask], 90)
        if line < LINE_CONTRAST * strokes:
            mask &= ink > (line + strokes) / 2
    # Lines as dark as the ink are taken out pixel by pixel: the strokes that cross them stay whole.
    mask &= ~lines
    return mask & ~_long_components(mask)


def _line_pixels(mask):
    """The pixels of the paper lines in `mask` that are not the strokes crossing them: bool, `mask`'s shape.

    Lines are the components that run across `LINE_SPAN` of the picture. An
    opening (erosion, then dilation) by a square as wide as a line removes
    the line and keeps the wider strokes, where they cross it too. The
    narrowest square from `LINE_WIDTH` up to `MAX_LINE_WIDTH` of the side that
    leaves no component across the picture is the lines' width; two pixels
    more take their uneven edges too. If none does (a page's edge, a wide
    shadow), the pixels narrower than `LINE_WIDTH` are the lines'.
    """
    long = _long_components(mask)
    if not long.any():
        return long
    for width in range(LINE_WIDTH, _odd(MAX_LINE_WIDTH * min(mask.shape)) + 1, 2):
        if not _long_components(_open(long, width)).any():
            return long & ~_open(long, width + 2)
    return long & ~_open(long, LINE_WIDTH)


def _open(mask, width):
    """`mask` opened by a `width`×`width` square: what is narrower than it is gone."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((width, width), np.uint8)).astype(bool)


def _long_components(mask):
    """The pixels of the components of `mask` that run across `LINE_SPAN` of its width or height."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    height, width = mask.shape
    long = (stats[:, cv2.CC_STAT_WIDTH] >= LINE_SPAN * width) | (stats[:, cv2.CC_STAT_HEIGHT] >= LINE_SPAN * height)
    long[0] = False  # the background
    return long[labels]


def digit_groups(mask):
    """Groups a stroke mask's connected components into digits, left to right.

    Specks (smaller than `SPECK` of the picture both ways) are dropped, and so
    are components that touch the picture's border (a shadow's or a page's
    edge) unless nothing digit-like is left without them (a digit cropped
    tight, as some of MNIST's are). A component joins the group before it when
    their horizontal extents overlap by `MERGE_OVERLAP` of the narrower one's
    and they lie at most `MERGE_GAP` apart vertically: the parts of one digit.
    Groups less than `MIN_HEIGHT` of the picture tall are no digits.

    Args:
        mask: bool array `(h, w)` (`stroke_mask`).

    Returns:
        `(labels, groups)`: the components, int32 `(h, w)` with 0 for
        background, and one list of component labels per group.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    height, width = mask.shape
    left, top, right, bottom = stats[:, 0], stats[:, 1], stats[:, 0] + stats[:, 2], stats[:, 1] + stats[:, 3]
    inside = (left > 0) & (top > 0) & (right < width) & (bottom < height)
    return labels, _group(stats, inside, min(height, width)) or _group(stats, np.ones(count, bool), min(height, width))


def _group(stats, candidates, side):
    """`digit_groups`' groups of the components `candidates` (bool per label) whose `stats` OpenCV gave."""
    groups, boxes = [], []
    for label in sorted(range(1, len(stats)), key=lambda i: stats[i, cv2.CC_STAT_LEFT]):
        x, y, w, h = stats[label, :4]
        if not candidates[label] or max(w, h) < SPECK * side:
            continue
        if boxes:
            left, top, right, bottom = boxes[-1]
            overlap = min(right, x + w) - max(left, x)
            gap = max(top, y) - min(bottom, y + h)
            if overlap >= MERGE_OVERLAP * min(w, right - left) and gap <= MERGE_GAP * side:
                boxes[-1] = [min(left, x), min(top, y), max(right, x + w), max(bottom, y + h)]
                groups[-1].append(label)
                continue
        boxes.append([x, y, x + w, y + h])
        groups.append([label])
    return [group for group, box in zip(groups, boxes) if box[3] - box[1] >= MIN_HEIGHT * side]


def fit_ink(ink):
    """Fits a digit's ink into MNIST's 28×28 frame.

    Crops to the bounding box of the ink above `INK_THRESHOLD` of its
    darkest, scales the longer side to 20 pixels keeping the aspect ratio,
    and pastes it so that its centre of mass lies at the centre of the frame.

    Args:
        ink: float array `(h, w)`, 0 for background, up to 255 for the
            digit's darkest ink.

    Returns:
        uint8 array `(28, 28)`.
    """
    strong = ink > INK_THRESHOLD * ink.max()
    rows, cols = np.flatnonzero(strong.any(axis=1)), np.flatnonzero(strong.any(axis=0))
    ink = np.asarray(ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], np.float32)

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


def _crop(ink, region):
    """The ink of the strokes in `region`, soft edges included and nothing else, fitted as MNIST's digits."""
    kept = cv2.dilate(region.astype(np.uint8), np.ones((2 * GROW + 1, 2 * GROW + 1), np.uint8)).astype(bool)
    return fit_ink(np.where(kept, np.clip(ink / ink[region].max(), 0, 1) * 255, 0))


def _split(ink, region, classify):
    """Cuts a group of strokes into the touching digits it holds (see `fit_digits`); returns their regions."""
    ys, xs = np.nonzero(region)
    height = ys.max() - ys.min() + 1
    moments = cv2.moments(region.astype(np.uint8), binaryImage=True)
    slant = moments["mu11"] / moments["mu02"] if moments["mu02"] else 0.0
    # Each pixel's column once the group's slant is taken out, so that slanted digits come apart upright.
    across = np.round(xs - slant * (ys - moments["m01"] / moments["m00"])).astype(int)
    across -= across.min()
    width = across.max() + 1
    if width < MIN_CUT_WIDTH * height:
        return [region]
    # A stroke's width is 4 times its pixels' mean distance to the background.
    stroke = 4 * cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)[region].mean()
    top, bottom = np.full(width, height * 10), np.full(width, -1)
    np.minimum.at(top, across, ys)
    np.maximum.at(bottom, across, ys)
    # The height of the piece left of each column and of the piece from it on.
    left = np.maximum.accumulate(bottom) - np.minimum.accumulate(top)
    right = (np.maximum.accumulate(bottom[::-1]) - np.minimum.accumulate(top[::-1]))[::-1]
    columns = np.bincount(across, minlength=width)
    cuts = [c for c in range(1, width - 1) if columns[c] <= CUT_STROKES * stroke
            and min(left[c - 1], right[c]) + 1 >= PIECE_HEIGHT * height]
    if not cuts:
        return [region]
    cuts = cuts[::math.ceil(len(cuts) / MAX_CUTS)]
    where = np.zeros(region.shape, int)
    where[ys, xs] = across
    pieces = [(region & (where < c), region & (where >= c)) for c in cuts]
    confidence = classify(np.stack([_crop(ink, region)] + [_crop(ink, p) for pair in pieces for p in pair])).max(-1)
    split = confidence[1::2] * confidence[2::2]
    best = int(np.argmax(split))
    if split[best] <= confidence[0]:
        return [region]
    return _split(ink, pieces[best][0], classify) + _split(ink, pieces[best][1], classify)


def _odd(size):
    """A median filter's width: `size` rounded down, plus 1 if that is even."""
    return max(1, int(size) // 2 * 2 + 1)
