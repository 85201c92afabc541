import math
import os

import keras
import numpy as np

from kernorm.config import TrainConfig
from kernorm.models import build_model, dtype_policy, load_model
from kernorm.rundir import read_history
from kernorm.train import train


def policies(model):
    found = {}
    stack = [model]
    while stack:
        layer = stack.pop()
        found[layer.name] = layer.dtype_policy.name
        stack += getattr(layer, "layers", [])
    return found


def test_mixed_policy_computes_in_low_precision_but_logits_in_float32():
    with dtype_policy("mixed_bfloat16"):
        model = build_model("bn")
    assert keras.config.dtype_policy().name == "float32"  # restored after the block
    found = policies(model)
    assert found.pop("logits") == "float32"
    assert set(found.values()) == {"mixed_bfloat16"}
    conv = model.get_layer("block1").layers[0]
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert model(np.zeros((2, 28, 28, 1), "float32")).dtype == "float32"


def test_bfloat16_training_saves_a_float32_model(tmp_path, data_dir):
    config = TrainConfig(norm="bn", epochs=1, limit=256, precision="mixed_bfloat16", data_dir=data_dir,
                         out=str(tmp_path / "bf16"))
    metrics = train(config, verbose=False)
    assert keras.config.dtype_policy().name == "float32"
    [row] = read_history(config.out)
    assert math.isfinite(row["train_loss"]) and metrics["epochs_completed"] == 1
    model = load_model(os.path.join(config.out, "model.keras"))
    assert set(policies(model).values()) == {"float32"}
    assert all(w.dtype == "float32" for w in model.get_weights())
