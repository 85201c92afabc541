import keras
import numpy as np
import pytest

from kernorm.errors import KernormError
from kernorm.layers import conv_block, conv_layer, trans_block
from kernorm.models import build_model
from kernorm.norms import NORMS, create_norm_layer


def kinds(stack):
    return [type(layer).__name__ for layer in stack]


def test_conv_layer_order_is_conv_activation_norm_dropout():
    stack = conv_layer(10, norm="bn", dropout=0.1)
    assert kinds(stack) == ["Conv2D", "BatchNorm", "Dropout"]  # the norm applies the activation first
    conv = stack[0]
    assert conv.kernel_size == (3, 3) and conv.padding == "valid" and not conv.use_bias
    assert stack[1].input_activation is keras.activations.relu


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])  # a ReLU runs fused into the norm's op
@pytest.mark.parametrize("training", [True, False])
def test_conv_layer_computes_conv_then_activation_then_norm(norm, activation, training):
    rng = np.random.default_rng(0)
    conv, norm_layer = conv_layer(6, norm=norm, activation=activation)
    features = conv(rng.normal(size=(4, 9, 9, 3)).astype("float32"))
    separate = create_norm_layer(norm, 6)  # no input activation: the study's separate layers
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    for layer in (norm_layer, separate):
        layer.build(features.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    expected = separate(keras.activations.get(activation)(features), training=training)
    np.testing.assert_allclose(norm_layer(features, training=training), expected, atol=1e-5)


def test_conv_layer_without_norm_or_dropout():
    assert kinds(conv_layer(8)) == ["Conv2D", "Activation"]


def test_separable_conv_layer_filters_each_channel_then_mixes_them():
    conv, norm_layer = conv_layer(8, norm="gn", separable=True, l2=1e-3)
    assert type(conv).__name__ == "SeparableConv2D" and type(norm_layer).__name__ == "GroupNorm"
    features = keras.random.normal((2, 9, 9, 4), seed=0)
    out = conv(features)
    assert out.shape == (2, 7, 7, 8)
    depthwise, pointwise = conv.get_weights()
    assert depthwise.size + pointwise.size == 3 * 3 * 4 + 4 * 8  # not 3·3·4·8
    # The same as a 3×3 filter per channel followed by a 1×1 convolution.
    per_channel = keras.ops.depthwise_conv(features, depthwise, padding="valid")
    np.testing.assert_allclose(out, keras.ops.conv(per_channel, pointwise), atol=1e-5)
    assert len(conv.losses) == 2  # the regularizer covers both kernels


@pytest.mark.parametrize("norm, kind", [("bn", "BatchNorm"), ("ln", "LayerNorm"), ("gn", "GroupNorm"),
                                         ("none", None), (None, None)])
def test_registry_picks_the_norm(norm, kind):
    layer = create_norm_layer(norm, 10)
    assert (type(layer).__name__ if layer else None) == kind


def test_norm_settings_match_pytorch_defaults():
    bn, ln, gn = (create_norm_layer(n, 10, groups=2) for n in ("bn", "ln", "gn"))
    assert bn.epsilon == ln.epsilon == gn.epsilon == 1e-5
    assert bn.momentum == 0.9
    assert ln.groups == 1 and gn.groups == 2


def test_registry_errors():
    with pytest.raises(KernormError, match="unknown norm 'xn'.*bn, ln, gn"):
        create_norm_layer("xn", 10)
    with pytest.raises(KernormError, match="groups=3 does not divide 10"):
        create_norm_layer("gn", 10, groups=3)
    assert set(NORMS) == {"bn", "ln", "gn", "none"}


def test_dropout_last_puts_one_dropout_after_the_block():
    block = conv_block([10, 10, 10], norm="gn", dropout=0.2, dropout_layers="last")
    assert kinds(block.layers) == ["Conv2D", "GroupNorm"] * 3 + ["Dropout"]


def test_dropout_all_puts_one_after_every_layer():
    block = conv_block([10, 10], norm="ln", dropout=0.2, dropout_layers="all")
    assert kinds(block.layers) == ["Conv2D", "LayerNorm", "Dropout"] * 2


def test_bad_dropout_layers():
    with pytest.raises(KernormError, match="unknown dropout placement .first.; choose one of last, all"):
        conv_block([10], dropout=0.1, dropout_layers="first")


def test_transition_without_and_with_1x1_conv():
    same = trans_block(10, 10)
    assert kinds(same.layers) == ["AveragePooling2D"]
    change = trans_block(10, 16)
    assert kinds(change.layers) == ["Conv2D", "Activation", "AveragePooling2D"]
    assert change.layers[0].kernel_size == (1, 1)
    out = change(np.zeros((2, 8, 8, 10), "float32"))
    assert out.shape == (2, 4, 4, 16)


# --- regularization --------------------------------------------------------------

def test_regularization_losses_equal_hand_computed_sum():
    l1, l2 = 1e-3, 2e-3
    model = build_model("bn", l1=l1, l2=l2)
    kernels = [v.numpy() for v in model.trainable_weights if v.path.endswith("kernel")]
    assert len(kernels) == 6  # five convs and the dense layer; norms' γ/β are not regularized
    expected = sum(l1 * np.abs(k).sum() + l2 * np.square(k).sum() for k in kernels)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def test_no_regularization_by_default():
    assert build_model("gn").losses == []
