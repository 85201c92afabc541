"""kernorm's C++ normalization ops (`normalize_groups.cc`), compiled on first use and cached.

The ops compute `kernorm.norms.normalize_groups` and its gradient on a CPU in
two passes over the feature map each, faster than the XLA-compiled fallback
(docs/benchmarks.md measures both). They are built once per source, flags,
TensorFlow version and machine with the C++ compiler TensorFlow's headers are
made for (`CXX`, default `g++`) into `$XDG_CACHE_HOME/kernorm` (default
`~/.cache/kernorm`), with AVX2 and FMA only where the CPU has them.

`KERNORM_NATIVE` chooses whether kernorm uses them:
- unset: yes, unless a GPU is visible (the ops have CPU kernels only); without
  a compiler or on a failed build, the XLA path, with one warning saying why;
- `0`: never; nothing is compiled;
- `1`: always, a GPU visible or not (they then run on the CPU); a failed build
  is an error.
"""

import fcntl
import functools
import hashlib
import os
import shlex
import subprocess
import warnings

import tensorflow as tf

from kernorm.errors import KernormError
from kernorm.files import atomic_path

SOURCE = os.path.join(os.path.dirname(__file__), "normalize_groups.cc")
SWITCH = "KERNORM_NATIVE"
_FLAGS = ["-O3", "-shared", "-fPIC", "-Wall", "-Wextra"]
# What `load` raises where the ops cannot be had: no compiler, a failed build, a library this TensorFlow refuses.
BUILD_ERRORS = (OSError, subprocess.CalledProcessError, tf.errors.NotFoundError)


@functools.cache
def ops():
    """The op library kernorm's layers train with (see the module's docstring), or None for the XLA path."""
    switch = os.environ.get(SWITCH, "")
    if switch not in ("", "0", "1"):
        raise KernormError(f"{SWITCH}={switch}: set it to 1 (use the C++ norm ops), 0 (never) or leave it unset")
    if switch == "0" or (not switch and tf.config.list_physical_devices("GPU")):
        return None
    try:
        return load()
    except BUILD_ERRORS as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1][:200]
        if switch == "1":
            raise KernormError(f"kernorm's C++ norm ops did not build ({detail}); install a C++ compiler "
                               f"(or set CXX), or unset {SWITCH}") from None
        warnings.warn(f"kernorm's C++ norm ops did not build ({detail}); training uses the slower XLA path",
                      stacklevel=2)
        return None


@functools.cache
def load():
    """Builds the ops if the cache lacks them and loads them, whatever `KERNORM_NATIVE` says.

    Raises:
        One of `BUILD_ERRORS`: no compiler, a failed build, or a library this TensorFlow does not load.
    """
    return tf.load_op_library(_build())


def _build():
    """Compiles `SOURCE` into the cache unless a library of the same inputs is there; returns its path.

    Under a lock file in the cache folder, so that of processes starting at
    once one compiles and the others load its library.

    Warnings of the compiler on kernorm's source reach the user as Python warnings; TensorFlow's
    headers are system headers, whose own warnings are theirs to fix.
    """
    compiler = os.environ.get("CXX", "g++")
    tf_flags = [f"-isystem{flag[2:]}" if flag.startswith("-I") else flag for flag in tf.sysconfig.get_compile_flags()]
    command = ([compiler, SOURCE] + _FLAGS + _vector_flags(compiler) + tf_flags + tf.sysconfig.get_link_flags())
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + shlex.join(command).encode() + tf.__version__.encode()).hexdigest()[:16]
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kernorm")
    library = os.path.join(folder, f"normalize_groups-{key}.so")
    if os.path.exists(library):
        return library
    os.makedirs(folder, exist_ok=True)
    # Processes started together (`kernorm sweep --jobs N`) build once: the first to hold the lock builds,
    # the others wait for it and then find the library. The OS releases the lock when its holder ends.
    with open(os.path.join(folder, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(library):
            with atomic_path(library) as tmp:
                built = subprocess.run(command + ["-o", tmp], check=True, capture_output=True, text=True)
            if built.stderr.strip():
                warnings.warn(f"compiler warnings building kernorm's C++ norm ops:\n{built.stderr}", stacklevel=3)
    return library


def _vector_flags(compiler):
    """`-mavx2 -mfma` where this machine's CPU has both, else none: the compiler tells, from `-march=native`.

    AVX2 and FMA are the vector width the strips are laid out for (16 floats =
    two registers); without them the ops still build, for the baseline
    instruction set. `-march=native` itself would also enable AVX512-FP16,
    which TensorFlow's Eigen headers fail to compile with under GCC 12.
    """
    try:
        macros = subprocess.run([compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                                check=True, capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []  # a compiler that cannot say (or none: the build itself then reports it)
    return ["-mavx2", "-mfma"] if {"__AVX2__", "__FMA__"} <= set(macros) else []


@tf.RegisterGradient("KernormNormalizeGroups")
def _normalize_groups_gradient(op, dy, *_):  # mean, variance and inv carry no gradient
    return load().kernorm_normalize_groups_grad(dy, op.inputs[0], op.inputs[1], op.outputs[1], op.outputs[3],
                                                groups=op.get_attr("groups"), relu=op.get_attr("relu"))
