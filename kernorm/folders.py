"""The output folders kernorm makes, marked as its own, so that it replaces or writes into no other.

Every run, export, sweep and report (`kernorm reproduce`) folder that kernorm
makes holds a small file, `.kernorm`, naming its kind. A folder is kernorm's
of a kind when it is marked so or, unmarked, when it holds the configuration
an earlier kernorm, which marked nothing, saved in that kind of folder.
`--overwrite` replaces only kernorm's folder of the kind being written, and
`sweep` and `reproduce` go on only in their own kind of folder; any other
folder that holds files is the user's, and is left as it is.
"""

import json
import os
import shutil

from kernorm.errors import KernormError
from kernorm.files import write_text

MARKER = ".kernorm"


def mark(folder, kind):
    """Makes `folder` (and its parents) if need be and marks it as kernorm's folder of `kind`.

    Args:
        folder: the folder's path.
        kind: "run", "export", "sweep" or "report".
    """
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, MARKER), kind + "\n")


def marked_kind(folder):
    """The kind `mark` wrote into `folder`; None for a folder without the mark."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def saved_config(name, cls):
    """A test of whether a folder holds the file `name` that loads as the configuration dataclass `cls`.

    It is how a folder that an earlier kernorm wrote, before the mark, is known.

    Returns:
        A function of a folder's path that returns True or False.
    """
    def holds(folder):
        try:
            with open(os.path.join(folder, name)) as f:
                cls(**json.load(f))
        except (OSError, ValueError, TypeError):  # missing, unreadable, not JSON, not this configuration
            return False
        return True
    return holds


def inside(path, folder):
    """Whether `path` is `folder` or lies within it."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def holds_files(folder):
    """Whether `folder` is a folder with anything in it."""
    return os.path.isdir(folder) and bool(os.listdir(folder))


def check_writable(folder, option="--out"):
    """Raises a `KernormError` naming `option` unless `folder` is, or can be made, a folder this process writes in.

    A missing folder is judged by the nearest folder above it that exists.
    """
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise KernormError(f"{option} {folder} is not a folder: {existing} is a file; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KernormError(f"{option} {folder} cannot be written: {existing} is not writable; choose another "
                           f"{option}")


def check_own(folder, kind, earlier=None, option="--out"):
    """Raises a `KernormError` when `folder` holds files and is not kernorm's folder of `kind`; changes nothing.

    Args:
        folder: the folder's path.
        kind: "run", "export", "sweep" or "report".
        earlier: a function of the folder (see `saved_config`) that tells an
            unmarked folder an earlier kernorm wrote as `kind`; None: only the
            mark counts.
        option: the command-line option that names the folder, for the message.
    """
    if not holds_files(folder):
        return
    marked = marked_kind(folder)
    if marked == kind or marked is None and earlier is not None and earlier(folder):
        return
    what = f"kernorm's {marked} folder" if marked else "a folder kernorm did not make"
    raise KernormError(f"{folder} is {what}, not a kernorm {kind} folder; nothing in it is changed: choose "
                       f"another {option}")


def prepare(folder, kind, overwrite, earlier=None):
    """Makes `folder` an empty folder marked `kind`; one that holds files must be kernorm's folder of `kind`
    (see `check_own`), and is replaced only with `overwrite`."""
    check_writable(folder)
    check_own(folder, kind, earlier)
    if holds_files(folder):
        if not overwrite:
            raise KernormError(f"output folder {folder} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(folder)
    mark(folder, kind)


def claim(folder, kind, earlier=None):
    """Makes `folder` a folder marked `kind` that keeps what it holds: a new or empty folder, or kernorm's
    folder of `kind`, to go on with (see `check_own`)."""
    check_writable(folder)
    check_own(folder, kind, earlier)
    mark(folder, kind)
