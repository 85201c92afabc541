"""kernorm: normalization and regularization for a tiny Keras CNN, from training to TFLite."""

__version__ = "0.1.0"
