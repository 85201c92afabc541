"""kernorm: normalization and regularization for a tiny Keras CNN, from training to TFLite."""

import os
import platform
from importlib.metadata import version

__version__ = version("kernorm")  # written once, in setup.cfg

# TensorFlow's x86 builds run convolutions and matrix products through oneDNN only on CPUs with
# AVX512-VNNI, AVX512-BF16 or AMX; on the others (AVX2 ones such as AMD Zen 3) its own kernels train
# kernorm's networks far slower (docs/benchmarks.md). kernorm asks for oneDNN on every x86 CPU, so that
# training is as fast there and computes as on the newer CPUs. It counts only where TensorFlow is
# imported after kernorm; TF_ENABLE_ONEDNN_OPTS=0 turns it off.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
