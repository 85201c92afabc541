"""kernorm's C++ normalization ops (`normalize_groups.cc`), compiled on first use and cached.

The ops compute `kernorm.norms.normalize_groups` and its gradient on a CPU in
two passes over the feature map each, faster than the XLA-compiled fallback
(docs/benchmarks.md measures both). They are built once per source, TensorFlow
version and machine with the C++ compiler TensorFlow's headers are made for
(`CXX`, default `g++`) into `$XDG_CACHE_HOME/kernorm` (default
`~/.cache/kernorm`). Without a compiler, on a failed build, or with a GPU
visible (the ops have CPU kernels only), `ops()` is None and kernorm uses
the XLA path, with one warning saying why where something failed.
"""

import functools
import hashlib
import os
import platform
import shlex
import subprocess
import warnings

import tensorflow as tf

from kernorm.files import atomic_path

SOURCE = os.path.join(os.path.dirname(__file__), "normalize_groups.cc")
# AVX2 and FMA: the vector width the strips are laid out for (16 floats = two
# registers). -march=native would also enable AVX512-FP16, which TensorFlow's
# Eigen headers fail to compile with under GCC 12.
_FLAGS = ["-O3", "-shared", "-fPIC", "-w"]
if platform.machine() in ("x86_64", "AMD64"):
    _FLAGS += ["-mavx2", "-mfma"]


@functools.cache
def ops():
    """The loaded op library (`kernorm_normalize_groups`, `kernorm_normalize_groups_grad`), or None."""
    if tf.config.list_physical_devices("GPU"):
        return None
    try:
        return tf.load_op_library(_build())
    except (OSError, subprocess.CalledProcessError, tf.errors.NotFoundError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"kernorm's C++ norm ops did not build ({detail.strip().splitlines()[-1][:200]}); "
                      "training uses the slower XLA path", stacklevel=2)
        return None


def _build():
    """Compiles `SOURCE` into the cache unless a library of the same inputs is there; returns its path."""
    compiler = os.environ.get("CXX", "g++")
    command = ([compiler, SOURCE] + _FLAGS + tf.sysconfig.get_compile_flags()
               + tf.sysconfig.get_link_flags())
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + shlex.join(command).encode() + tf.__version__.encode()).hexdigest()[:16]
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kernorm")
    library = os.path.join(folder, f"normalize_groups-{key}.so")
    if not os.path.exists(library):
        os.makedirs(folder, exist_ok=True)
        with atomic_path(library) as tmp:
            subprocess.run(command + ["-o", tmp], check=True, capture_output=True, text=True)
    return library


@tf.RegisterGradient("KernormNormalizeGroups")
def _normalize_groups_gradient(op, dy, *_):  # mean, variance and inv carry no gradient
    return ops().kernorm_normalize_groups_grad(dy, op.inputs[0], op.inputs[1], op.outputs[1], op.outputs[3],
                                               groups=op.get_attr("groups"), relu=op.get_attr("relu"))
