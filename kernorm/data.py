"""MNIST: a small IDX reader for offline copies, Keras's download otherwise, and the tf.data input pipeline."""

import gzip
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from kernorm.errors import KernormError

DATA_DIR_ENV = "KERNORM_DATA_DIR"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
UBYTE = 0x08


def read_idx(path):
    """Reads an IDX file of unsigned bytes (gzip or raw) into a NumPy array.

    Args:
        path: the file; a name ending in ".gz" is decompressed.

    Returns:
        A uint8 array whose shape is the file's dimensions.
    """
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise KernormError(f"{path}: cannot read ({e}); replace it with a good copy") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != UBYTE or raw[3] == 0:
        raise KernormError(f"{path}: not an IDX file of unsigned bytes (wrong magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KernormError(f"{path}: truncated header; replace it with a good copy")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise KernormError(f"{path}: holds {len(raw) - header} data bytes, its header promises "
                           f"{expected} {dims}; the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(data_dir, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise KernormError(f"{os.path.join(data_dir, stem + '.gz')} not found; --data-dir must hold "
                       f"the four MNIST IDX files (gzip or raw)")


def _check(images, labels, split):
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise KernormError(f"MNIST {split} images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise KernormError(f"MNIST {split}: {len(images)} images but {labels.shape} labels; "
                           f"the image and label files do not belong together")
    if labels.size and labels.max() > 9:
        raise KernormError(f"MNIST {split} labels: found {labels.max()}, labels must lie in 0-9")


def recorded_data_dir(path):
    """The MNIST folder a run, sweep or study recorded: the `data_dir` of its JSON file at `path`.

    Args:
        path: a `config.json`, `sweep.json` or `reproduce.json`.

    Returns:
        The folder's path as written there; None when the file, or its entry, is missing or unreadable.
    """
    try:
        with open(path) as f:
            recorded = json.load(f).get("data_dir")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object: nothing recorded
        return None
    return recorded if isinstance(recorded, str) and recorded else None


def find_data_dir(data_dir=None, recorded=None):
    """The MNIST folder a command reads, by one rule for every command.

    The first of: `data_dir` (the `--data-dir` option), the `KERNORM_DATA_DIR`
    environment variable, and `recorded` (the folder a run was trained on,
    see `recorded_data_dir`) when it still exists; None stands for Keras's download.

    Args:
        data_dir: the folder the user named, or None.
        recorded: the folder the run recorded, or None.

    Returns:
        A folder's path, or None.
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if chosen:
        return chosen
    return recorded if recorded and os.path.isdir(recorded) else None


def load_mnist(data_dir=None, recorded=None):
    """Loads MNIST as uint8 arrays, from the folder `find_data_dir` picks or else Keras's download.

    Args:
        data_dir: a folder with the four standard IDX files (gzip or raw), or None.
        recorded: the folder the run was trained on, tried after `KERNORM_DATA_DIR`.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: images `(N, 28, 28)` and labels `(N,)`, uint8.
    """
    folder = find_data_dir(data_dir, recorded)
    if folder:
        if not os.path.isdir(folder):
            raise KernormError(f"data directory {folder} does not exist; pass --data-dir with the MNIST IDX files")
        arrays = {key: read_idx(_find(folder, stem)) for key, stem in FILES.items()}
        train = arrays["train_images"], arrays["train_labels"]
        test = arrays["test_images"], arrays["test_labels"]
    else:
        train, test = _download(recorded)
    _check(*train, "train")
    _check(*test, "test")
    return train, test


def _download(recorded):
    try:
        return keras.datasets.mnist.load_data()
    except Exception as e:  # any network or cache failure ends in the same advice, naming its cause
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        missing = f"; the run's folder {recorded} does not exist here" if recorded else ""
        raise KernormError(f"downloading MNIST failed ({cause}){missing}; pass --data-dir DIR (or set "
                           f"{DATA_DIR_ENV}) with the four MNIST IDX files") from None


# Training-time augmentation: small rotations and shifts, as handwriting varies (and scalings, with a zoom).
MAX_ROTATION_DEGREES = 7.0
MAX_SHIFT_PIXELS = 1.0


def augment(images, seed, zoom=0.0):
    """Rotates and shifts (and with `zoom`, scales) each image of a batch by its own random amount.

    Each image is turned by an angle drawn uniformly from ±`MAX_ROTATION_DEGREES`
    about its centre, scaled about its centre by a factor drawn uniformly from
    1 ± `zoom`, and moved by up to ±`MAX_SHIFT_PIXELS` along each axis.
    Each output pixel copies its nearest input pixel (0, the background of
    raw MNIST, from outside the image): bilinear interpolation would blur
    every image it moves by a fraction of a pixel, and the test images are
    sharp. The draws are stateless: the same `seed` gives the same batch, so
    a resumed run sees the images it would have seen.

    Args:
        images: float32 `(batch, H, W, 1)` raw pixels.
        seed: int64 tensor of shape `(2,)`.
        zoom: the largest change of scale, a fraction in [0, 1); 0 scales no
            image, and draws the rotations and shifts it always did.

    Returns:
        The transformed batch, same shape and dtype.
    """
    n = tf.shape(images)[0]
    rotation_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    angle = tf.random.stateless_uniform([n], rotation_seed, -1.0, 1.0) * (MAX_ROTATION_DEGREES * math.pi / 180)
    shift = tf.random.stateless_uniform([n, 2], shift_seed, -MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS)
    cos, sin = tf.cos(angle), tf.sin(angle)
    if zoom:  # its own stream, folded from the seed, so the rotation and shift streams stay as they were
        scale_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        inverse = 1 / tf.random.stateless_uniform([n], scale_seed, 1 - zoom, 1 + zoom)
        cos, sin = cos * inverse, sin * inverse  # an image s times larger reads its input at 1/s the distance
    cx = (tf.cast(tf.shape(images)[2], tf.float32) - 1) / 2
    cy = (tf.cast(tf.shape(images)[1], tf.float32) - 1) / 2
    # affine_transform maps each output pixel (x, y) to the input pixel it reads:
    # x_in = cos·x − sin·y + a2, y_in = sin·x + cos·y + b2, a rotation (and scaling) about the centre less the shift.
    a2 = cx - cos * cx + sin * cy - shift[:, 0]
    b2 = cy - sin * cx - cos * cy - shift[:, 1]
    zeros = tf.zeros_like(angle)
    transform = tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)
    return keras.ops.image.affine_transform(images, transform, interpolation="nearest", fill_mode="constant")


def split_validation(images, labels, count):
    """Holds out the last `count` images as a validation set.

    Args:
        images, labels: the training arrays, `(N, ...)` and `(N,)`.
        count: images to hold out; 0 holds out none.

    Returns:
        `(train, validation)`: `(images, labels)` pairs, the first `N - count`
        images and the last `count`; `validation` is None when `count` is 0.
    """
    if not 0 <= count < len(images):
        raise KernormError(f"--validation {count}: hold out fewer than the {len(images):,} training images "
                           f"(and at least 0)")
    if not count:
        return (images, labels), None
    cut = len(images) - count
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def epoch_seeds(seed, epoch):
    """The shuffle seed and the augmentation key of one epoch of one run: two independent streams.

    Both come from NumPy's `SeedSequence` over `(seed, epoch)`, which hashes
    the pair, so no two pairs share a stream: seed r at epoch e + 1 draws
    nothing that seed r + 1 draws at epoch e (as `seed + epoch` would).

    Returns:
        `(shuffle_seed, augment_key)`, two ints below 2**32.
    """
    shuffle_seed, augment_key = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle_seed), int(augment_key)


def make_dataset(images, labels, batch_size, seed=None, epoch=1, augment_images=False, zoom=0.0):
    """A tf.data pipeline of `(images, labels)` batches for training or evaluation.

    Args:
        images: uint8 `(N, 28, 28)` array.
        labels: `(N,)` array of class indices.
        batch_size: images per batch; the last batch may be smaller.
        seed: the run's seed; the order is shuffled from the streams of
            `epoch_seeds(seed, epoch)`. None keeps the order.
        epoch: the epoch this pipeline serves, from 1.
        augment_images: rotate and shift every image at random (see `augment`),
            from the epoch's augmentation key and the batch's index; needs a `seed`.
        zoom: with `augment_images`, also scale each image by up to 1 ± `zoom`.

    Returns:
        A `tf.data.Dataset` of float32 `(batch, 28, 28, 1)` raw pixels and int32 labels.
    """
    if augment_images and seed is None:
        raise KernormError("augmentation needs a seed: it draws from it")
    ds = tf.data.Dataset.from_tensor_slices((images[..., None], labels.astype("int32")))
    if seed is not None:
        shuffle_seed, augment_key = epoch_seeds(seed, epoch)
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment_images:
        ds = ds.enumerate().map(
            lambda i, batch: (augment(batch[0], tf.stack([tf.constant(augment_key, tf.int64), i]), zoom), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
