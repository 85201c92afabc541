"""kernorm: normalization and regularization for a tiny Keras CNN, from training to TFLite."""

from importlib.metadata import version

__version__ = version("kernorm")  # written once, in setup.cfg
