"""Builds the photo test set: MNIST test digits made to look like photos of handwriting.

Each single-digit photo is an MNIST **test** digit drawn as ink on grey paper
and photographed with one effect (`EFFECTS`, then `LATER_EFFECTS`); each
number photo is 2 to 4 digits side by side, some touching, some a gap-less
"11", with one of `NUMBER_EFFECTS`. Every photo is a JPEG, 200–320 pixels on its shorter side.
A seed makes the same set every time; the set in `tests/data/photos` is seed
21's, and another seed makes a separate set (to tune on, never the one
reported, or a larger one to measure on).

    python benchmarks/make_photos.py [--data-dir DIR] [--out tests/data/photos] [--seed 21]
                                     [--per-effect 30] [--numbers 60]

OUT gets the JPEGs and `labels.csv`: per photo its file, its label (a digit,
or a number's digits), its effect and the indices of its MNIST test digits.
`--data-dir` defaults to `KERNORM_DATA_DIR`, else Keras's download.
"""

import argparse
import csv
import io
import os
import sys

import cv2
import numpy as np

from kernorm.data import load_mnist
from kernorm.errors import KernormError
from kernorm.files import write_bytes, write_text

# One effect per single-digit photo, on top of the plain photo: black ink on grey paper, a
# little sensor noise, JPEG quality 75.
EFFECTS = ("clean", "blur", "noise", "jpeg", "shadow", "noise+shadow", "ruled", "squared", "blue-ink",
           "rotation", "perspective", "thick-pen", "thin-pen")
# Paper lines as dark as the ink and 3-4 px wide, which the strokes cross. Their photos are drawn after the
# numbers', so that every photo made before these effects were added stays as it was.
LATER_EFFECTS = ("ruled-dark", "squared-dark")
# Numbers are read whole only when every digit is, so they get the milder effects.
NUMBER_EFFECTS = ("clean", "noise", "shadow", "ruled", "blue-ink")
BLACK_INK, BLUE_INK = (35, 35, 40), (150, 60, 25)  # BGR, as OpenCV stores colour
# The colour of the paper's lines, as a fraction of the paper's: blue, blue-grey.
LINE_TINTS = {"ruled": (1.0, 0.85, 0.7), "squared": (1.0, 0.95, 0.9)}


def ink_alpha(digit, height, rng, effect):
    """An MNIST digit as pen strokes `height` pixels tall: float32 `(height, width)` coverage in 0–1."""
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    digit = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32) / 255
    width = max(1, round(digit.shape[1] * height / digit.shape[0]))
    alpha = cv2.resize(digit, (width, height), interpolation=cv2.INTER_CUBIC)
    # Upscaled MNIST strokes have soft edges over several pixels; a pen's are sharp.
    alpha = np.clip((alpha - 0.3) / 0.3, 0, 1)
    if effect in ("thick-pen", "thin-pen"):
        radius = max(1, round(height * rng.uniform(0.03, 0.05) if effect == "thick-pen" else height * 0.025))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        alpha = cv2.dilate(np.pad(alpha, radius), kernel) if effect == "thick-pen" else cv2.erode(alpha, kernel)
    return alpha


def paper(shape, rng, effect, height):
    """Grey paper, ruled or squared for those effects: float32 `(H, W, 3)` BGR."""
    grey = rng.uniform(160, 215)
    page = np.empty(shape + (3,), np.float32)
    page[:] = (grey * rng.uniform(0.9, 0.97), grey * rng.uniform(0.96, 1.0), grey)  # a little warm
    kind, dark = effect.removesuffix("-dark"), effect.endswith("-dark")
    if kind in LINE_TINTS:
        spacing = height * (rng.uniform(0.6, 0.9) if kind == "ruled" else rng.uniform(0.25, 0.4))
        colour = page[0, 0] * LINE_TINTS[kind] * (rng.uniform(0.2, 0.35) if dark else rng.uniform(0.5, 1.0))
        thickness = int(rng.integers(3, 5) if dark else rng.integers(1, 3))
        lines = rng.uniform(0, spacing) + np.arange(0, max(shape), spacing)
        for y in lines[lines < shape[0]]:
            cv2.line(page, (0, round(y)), (shape[1], round(y)), colour, thickness, cv2.LINE_AA)
        if kind == "squared":
            for x in lines[lines < shape[1]] - lines[0] + rng.uniform(0, spacing):
                cv2.line(page, (round(x), 0), (round(x), shape[0]), colour, thickness, cv2.LINE_AA)
    return page


def camera(page, size, rng, effect):
    """Where the camera looks: a crop of `page` to `size` (W, H), turned or in perspective for those effects."""
    width, height = size
    offset = (page.shape[1] - width) / 2, (page.shape[0] - height) / 2
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    seen = corners + np.float32(offset)
    # A photo of ruled or squared paper is never quite square to its lines.
    degrees = {"rotation": rng.choice([-1, 1]) * rng.uniform(8, 20), "ruled": rng.uniform(-3, 3),
               "squared": rng.uniform(-3, 3)}.get(effect.removesuffix("-dark"), 0)
    if degrees:
        angle = np.radians(degrees)
        centre = seen.mean(0)
        turn = np.float32([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        seen = (seen - centre) @ turn.T + centre
    elif effect == "perspective":
        seen = seen + rng.uniform(-0.12, 0.12, (4, 2)).astype(np.float32) * np.float32([width, height])
    matrix = cv2.getPerspectiveTransform(corners, seen)
    return cv2.warpPerspective(page, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)


def lighting(photo, rng):
    """Uneven light (a gradient across the photo) and a soft-edged shadow over part of it."""
    height, width = photo.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = (np.cos(angle) * (xs - width / 2) + np.sin(angle) * (ys - height / 2)) / max(height, width)
    light = 1 + rng.uniform(0.3, 0.5) * along
    angle = rng.uniform(0, 2 * np.pi)
    across = np.cos(angle) * (xs - width / 2) + np.sin(angle) * (ys - height / 2) - rng.uniform(-0.3, 0.3) * width
    edge = max(2.0, min(height, width) * rng.uniform(0.01, 0.05))
    shadow = 1 - rng.uniform(0.3, 0.5) / (1 + np.exp(-across / edge))
    return photo * (light * shadow)[..., None]


def draw_ink(alpha, page, ink):
    """Ink of colour `ink` (BGR) and coverage `alpha` (same size as `page`) on `page`."""
    return page * (1 - alpha[..., None]) + np.float32(ink) * alpha[..., None]


def finish(photo, rng, effect, height):
    """The camera's and the file's effects on `photo` (float32 BGR, digits `height` pixels tall): its JPEG bytes."""
    if effect in ("shadow", "noise+shadow"):
        photo = lighting(photo, rng)
    if effect == "blur":
        photo = cv2.GaussianBlur(photo, (0, 0), height * rng.uniform(0.02, 0.04))
    else:
        photo = cv2.GaussianBlur(photo, (0, 0), 0.7)  # no lens is perfectly sharp
    # Sensor noise in brightness; a phone's processing removes most of the colour noise.
    noise = 12 if effect in ("noise", "noise+shadow") else 2
    photo = photo + rng.normal(0, noise, photo.shape[:2])[..., None]
    quality = int(rng.integers(10, 26)) if effect == "jpeg" else 75
    _, encoded = cv2.imencode(".jpg", np.clip(np.round(photo), 0, 255).astype(np.uint8),
                              [cv2.IMWRITE_JPEG_QUALITY, quality])
    return encoded.tobytes()


def compose(digits, rng, effect, gaps=None):
    """A photo of `digits` (MNIST images) side by side, with one `effect`: JPEG bytes.

    Args:
        digits: list of uint8 `(28, 28)` MNIST digits, left to right.
        rng: a NumPy `Generator`.
        effect: one of `EFFECTS` or `LATER_EFFECTS`.
        gaps: the space between neighbours, as fractions of the digits' height
            (negative: they overlap); `None` for one digit.
    """
    # A single digit fills half the photo's height or more (a little less when the view is turned or
    # slanted, which would move it out of the picture); a number's digits are smaller.
    fill = (0.3, 0.5) if len(digits) > 1 else (0.4, 0.55) if effect in ("rotation", "perspective") else (0.45, 0.7)
    short = int(rng.integers(200, 321))
    height = round(short * rng.uniform(*fill))
    alphas = [ink_alpha(d, round(height * rng.uniform(0.92, 1.08)), rng, effect) for d in digits]
    gaps = [round(g * height) for g in (gaps or [])]
    width = sum(a.shape[1] for a in alphas) + sum(gaps)
    size = (max(short, round(width / rng.uniform(0.6, 0.85))), short)
    # A page larger than the photo, so that a turned or slanted view still shows only paper.
    page_shape = (size[1] * 2, size[0] * 2)
    ink = np.zeros(page_shape, np.float32)
    x = page_shape[1] // 2 - width // 2 + round(rng.uniform(-0.1, 0.1) * (size[0] - width))
    middle = page_shape[0] // 2 + round(rng.uniform(-0.1, 0.1) * (size[1] - height))
    for alpha, gap in zip(alphas, gaps + [0]):
        top = middle - alpha.shape[0] // 2 + round(rng.uniform(-0.04, 0.04) * height)
        region = ink[top:top + alpha.shape[0], x:x + alpha.shape[1]]
        np.maximum(region, alpha, out=region)
        x += alpha.shape[1] + gap
    page = draw_ink(ink, paper(page_shape, rng, effect, height), BLUE_INK if effect == "blue-ink" else BLACK_INK)
    return finish(camera(page, size, rng, effect), rng, effect, height)


def number_gaps(labels, rng):
    """Gaps between a number's digits: mostly apart, a quarter touching or nearly, "11" gap-less."""
    gaps = []
    for left, right in zip(labels, labels[1:]):
        if left == right == 1:
            gaps.append(rng.uniform(-0.02, 0.03))
        elif rng.random() < 0.25:
            gaps.append(rng.uniform(-0.06, 0.0))
        else:
            gaps.append(rng.uniform(0.05, 0.35))
    return gaps


def build(x_test, y_test, out, seed, per_effect, numbers):
    """Writes the photos and `labels.csv` into `out`; returns the number of photos."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    order = rng.permutation(len(x_test))
    rows, taken = [], 0

    def singles(effects):
        nonlocal taken
        for effect in effects:
            for i in range(per_effect):
                index = int(order[taken])
                taken += 1
                name = f"{effect}-{i:03d}.jpg"
                write_bytes(os.path.join(out, name), compose([x_test[index]], rng, effect))
                rows.append([name, str(y_test[index]), effect, str(index)])

    singles(EFFECTS)
    ones = np.flatnonzero(y_test == 1)
    for i in range(numbers):
        count = int(rng.integers(2, 5))
        indices = [int(k) for k in order[taken:taken + count]]
        taken += count
        if i % 5 == 0:  # every fifth number holds a gap-less "11"
            at = int(rng.integers(0, count - 1))
            indices[at:at + 2] = [int(k) for k in rng.choice(ones, 2, replace=False)]
        labels = [int(y_test[k]) for k in indices]
        effect = NUMBER_EFFECTS[i % len(NUMBER_EFFECTS)]
        name = f"number-{i:03d}.jpg"
        photo = compose([x_test[k] for k in indices], rng, effect, number_gaps(labels, rng))
        write_bytes(os.path.join(out, name), photo)
        rows.append([name, "".join(map(str, labels)), effect, " ".join(map(str, indices))])
    singles(LATER_EFFECTS)
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([["file", "label", "effect", "mnist_test_indices"]] + rows)
    write_text(os.path.join(out, "labels.csv"), table.getvalue())
    return len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=os.path.join("tests", "data", "photos"))
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--per-effect", type=int, default=30)
    parser.add_argument("--numbers", type=int, default=60)
    args = parser.parse_args()
    try:
        (_, _), (x_test, y_test) = load_mnist(args.data_dir)
        count = build(x_test, y_test, args.out, args.seed, args.per_effect, args.numbers)
    except KernormError as e:
        sys.exit(f"error: {e}")
    print(f"{count} photos and labels.csv in {args.out}")


if __name__ == "__main__":
    main()
