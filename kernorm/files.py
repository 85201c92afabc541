"""Writing files so that each appears whole or not at all."""

import contextlib
import json
import os
import re

# atomic_path's temporary names: ".<name>.<pid>.tmp[<suffix>]".
_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp(\.[^.]+)?$")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` on success.

    The temporary name keeps the suffix (Keras insists on `.keras`), and is
    removed if the body raises, so a reader never sees a half-written file.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp{os.path.splitext(name)[1]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_bytes(path, data):
    """Writes the bytes `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path, data):
    """Writes `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def remove_leftovers(folder):
    """Deletes the temporary files `atomic_path` leaves behind when its process is killed mid-write."""
    for name in os.listdir(folder):
        if _TEMPORARY.match(name):
            os.remove(os.path.join(folder, name))

