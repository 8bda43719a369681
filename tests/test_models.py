"""Tests for bacon_jax.models: geometry, PyTorch-default init, norms, BatchNorm state, registry."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import models

SHAPES = ((28, 28, 1), (32, 32, 3), (64, 64, 3))

# Real forward passes of every registered net at every size take minutes on 2 CPU cores; the
# default run traces all of them abstractly (jax.eval_shape) and executes one size per family.
FULL_SWEEP = os.environ.get("BACON_JAX_FULL_MODEL_SWEEP", "") == "1"


def _images(key, n, shape, loc=0.0, scale=1.0):
    return loc + scale * jax.random.normal(key, (n, *shape), jnp.float32)


def _intermediates(model, variables, x, **kwargs):
    _, state = model.apply(
        variables, x, capture_intermediates=True, mutable=["intermediates"], **kwargs
    )
    return state["intermediates"]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "shape, depth, expected_d",
    [((28, 28, 1), 3, 2048), ((32, 32, 3), 3, 2048), ((64, 64, 3), 3, 8192), ((8, 8, 1), 3, 128),
     ((32, 32, 3), 4, 512), ((32, 32, 3), 1, 32768)],
)
def test_convnet_default_width_feature_size(shape, depth, expected_d):
    model = models.ConvNet(10, depth=depth)
    features = jax.eval_shape(
        lambda k: model.apply(models.init_model(model, k, shape), jnp.zeros((2, *shape)),
                              method=model.embed),
        jax.random.key(0),
    )
    chex.assert_shape(features, (2, expected_d))


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3), (8, 8, 1)])
def test_convnet_small_width_features_and_logits_one_pass(shape):
    width = 8
    model = models.ConvNet(10, width=width)
    variables = models.init_model(model, jax.random.key(1), shape)
    x = _images(jax.random.key(2), 2, shape)
    features, logits = model.apply(variables, x, method="features_and_logits")
    # 32x32-equivalent size for 1-channel inputs (first-conv padding 3), halved three times.
    side = (shape[0] + (4 if shape[-1] == 1 else 0)) // 8
    chex.assert_shape(features, (2, width * side * side))
    chex.assert_shape(logits, (2, 10))
    kernel = variables["params"]["classifier"]["kernel"]
    bias = variables["params"]["classifier"]["bias"]
    chex.assert_trees_all_close(logits, features @ kernel + bias, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(model.apply(variables, x), logits, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(model.apply(variables, x, method=model.embed), features)
    chex.assert_trees_all_close(
        model.apply(variables, features, method=model.classify), logits, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "shape, first_conv_side",
    [((28, 28, 1), 32), ((32, 32, 1), 36), ((28, 28, 3), 28), ((32, 32, 3), 32)],
)
def test_first_conv_padding_three_only_for_one_channel(shape, first_conv_side):
    model = models.ConvNet(3, width=4)

    def intermediates(key):
        return _intermediates(model, models.init_model(model, key, shape), jnp.ones((1, *shape)))

    inter = jax.eval_shape(intermediates, jax.random.key(0))["trunk"]
    chex.assert_shape(inter["Conv2d_0"]["__call__"][0], (1, first_conv_side, first_conv_side, 4))
    # Later convs keep the spatial size (padding 1): block 2 sees the pooled map.
    side2 = first_conv_side // 2
    chex.assert_shape(inter["Conv2d_1"]["__call__"][0], (1, side2, side2, 4))


# --------------------------------------------------------------------------- initialisation


def test_pytorch_default_init_bounds_and_uniformity():
    shape = (32, 32, 3)
    model = models.ConvNet(10)  # default width 128, so the samples are large
    params = models.init_model(model, jax.random.key(3), shape)["params"]
    checks = {
        "conv0": (params["trunk"]["Conv2d_0"], 3 * 3 * 3),
        "conv1": (params["trunk"]["Conv2d_1"], 3 * 3 * 128),
        "classifier": (params["classifier"], 2048),
    }
    for name, (layer, fan_in) in checks.items():
        bound = 1.0 / math.sqrt(fan_in)
        kernel = np.asarray(layer["kernel"])
        bias = np.asarray(layer["bias"])
        assert np.abs(kernel).max() <= bound, name
        # Uniform on [-b, b]: the extremes come close to b and the std is b / sqrt(3).
        assert np.abs(kernel).max() > 0.99 * bound, name
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05, err_msg=name)
        assert abs(kernel.mean()) < 0.05 * bound, name
        assert np.abs(bias).max() <= bound, name
        assert np.abs(bias).max() > 0.8 * bound, name  # a zero/lecun bias init fails here
    for i in range(3):
        norm = params["trunk"][f"GroupNorm_{i}"]
        chex.assert_trees_all_equal(norm["scale"], jnp.ones(128))
        chex.assert_trees_all_equal(norm["bias"], jnp.zeros(128))


def test_torch_bias_init_bound():
    values = models.torch_bias_init(25)(jax.random.key(0), (10000,))
    assert float(jnp.abs(values).max()) <= 0.2
    assert float(jnp.abs(values).max()) > 0.199


def test_linear_layers_of_mlp_use_pytorch_init():
    params = models.init_model(models.MLP(10), jax.random.key(0), (28, 28, 1))["params"]
    first = params["trunk"]["Linear_0"]
    chex.assert_shape(first["kernel"], (784, 128))
    bound = 1 / math.sqrt(784)
    assert float(jnp.abs(first["kernel"]).max()) <= bound
    assert float(jnp.abs(first["kernel"]).max()) > 0.99 * bound
    assert float(jnp.abs(first["bias"]).max()) <= bound


def test_vmapped_init_gives_independent_stack():
    model = models.ConvNet(10, width=8)
    shape = (8, 8, 1)
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.jit(jax.vmap(lambda k: models.init_model(model, k, shape)))(keys)
    kernel = stack["params"]["trunk"]["Conv2d_0"]["kernel"]
    chex.assert_shape(kernel, (3, 3, 3, 1, 8))
    assert not np.allclose(kernel[0], kernel[1])
    single = models.init_model(model, keys[1], shape)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], stack), single)


# --------------------------------------------------------------------------- norms


def test_instance_norm_is_per_sample_per_channel():
    shape = (32, 32, 3)
    model = models.ConvNet(10, width=8)
    variables = models.init_model(model, jax.random.key(0), shape)
    # Non-centred, channel-dependent input so that any pooling across samples/channels shows.
    x = _images(jax.random.key(1), 3, shape, loc=5.0, scale=3.0) * jnp.array([1.0, 4.0, 0.5])
    inter = _intermediates(model, variables, x)["trunk"]
    conv_out = inter["Conv2d_0"]["__call__"][0]
    normed = inter["GroupNorm_0"]["__call__"][0]
    mean = normed.mean(axis=(1, 2))
    var = normed.var(axis=(1, 2))
    chex.assert_trees_all_close(mean, jnp.zeros_like(mean), atol=1e-4)
    chex.assert_trees_all_close(var, jnp.ones_like(var), atol=1e-3)
    mu = conv_out.mean(axis=(1, 2), keepdims=True)
    sigma2 = ((conv_out - mu) ** 2).mean(axis=(1, 2), keepdims=True)  # biased variance
    expected = (conv_out - mu) / jnp.sqrt(sigma2 + 1e-5)
    chex.assert_trees_all_close(normed, expected, atol=1e-4)


def test_group_norm_has_four_groups_and_layer_norm_is_elementwise():
    shape = (32, 32, 3)
    x = _images(jax.random.key(1), 2, shape, loc=2.0)
    gn = models.ConvNet(10, width=8, norm="groupnorm")
    gn_vars = models.init_model(gn, jax.random.key(0), shape)
    normed = _intermediates(gn, gn_vars, x)["trunk"]["GroupNorm_0"]["__call__"][0]
    groups = normed.reshape(2, 32, 32, 4, 2)
    chex.assert_trees_all_close(groups.mean(axis=(1, 2, 4)), jnp.zeros((2, 4)), atol=1e-4)
    # Within a group, single channels are NOT normalised (unlike instance norm).
    assert float(jnp.abs(normed.mean(axis=(1, 2))).max()) > 0.05
    assert models.get_model("ConvNetGN", 10, shape).norm == "groupnorm"
    ln = models.get_model("ConvNetLN", 10, shape)
    ln_params = jax.eval_shape(lambda k: models.init_model(ln, k, shape), jax.random.key(0))
    chex.assert_shape(ln_params["params"]["trunk"]["LayerNorm_0"]["scale"], (32, 32, 128))
    chex.assert_shape(ln_params["params"]["trunk"]["LayerNorm_2"]["scale"], (8, 8, 128))


# --------------------------------------------------------------------------- BatchNorm


def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
    shape = (8, 8, 1)
    model = models.ConvNet(10, width=8, norm="batchnorm")
    variables = models.init_model(model, jax.random.key(0), shape)
    assert set(variables) == {"params", "batch_stats"}
    stats0 = variables["batch_stats"]["trunk"]["BatchNorm_0"]
    chex.assert_trees_all_equal(stats0["mean"], jnp.zeros(8))
    chex.assert_trees_all_equal(stats0["var"], jnp.ones(8))

    x = _images(jax.random.key(1), 6, shape, loc=3.0, scale=2.0)  # far from mean 0 / var 1
    logits_train, state = model.apply(
        variables, x, train=True, capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    conv_out = state["intermediates"]["trunk"]["Conv2d_0"]["__call__"][0]
    normed = state["intermediates"]["trunk"]["BatchNorm_0"]["__call__"][0]
    # Train mode normalises each channel over (N, H, W) with the batch's biased variance.
    chex.assert_trees_all_close(normed.mean(axis=(0, 1, 2)), jnp.zeros(8), atol=1e-4)
    chex.assert_trees_all_close(normed.var(axis=(0, 1, 2)), jnp.ones(8), atol=1e-3)
    # PyTorch momentum 0.1: running = 0.9 * old + 0.1 * batch statistic.
    new_stats = state["batch_stats"]["trunk"]["BatchNorm_0"]
    chex.assert_trees_all_close(
        new_stats["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(new_stats["var"], 1.0)

    # Eval mode uses running stats (still mean 0 / var 1 here), so it differs from train mode.
    logits_eval = model.apply(variables, x, train=False)
    assert float(jnp.abs(logits_eval - logits_train).max()) > 1e-3

    # The helper threads the state and gives the same numbers as the raw apply.
    feats, logits, new_vars = models.apply_features_and_logits(model, variables, x, train=True)
    chex.assert_trees_all_close(logits, logits_train, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new_vars["batch_stats"], state["batch_stats"])
    chex.assert_shape(feats, (6, 8))
    _, logits_e, same_vars = models.apply_features_and_logits(model, variables, x, train=False)
    chex.assert_trees_all_close(logits_e, logits_eval)
    chex.assert_trees_all_equal(same_vars, variables)


def test_non_bn_nets_have_no_batch_stats():
    for name in ("ConvNet", "ConvNetLN", "ConvNetGN", "VGG11", "ResNet18", "AlexNet", "MLP"):
        shape = (32, 32, 3)
        model = models.get_model(name, 10, shape)
        variables = jax.eval_shape(lambda k: models.init_model(model, k, shape), jax.random.key(0))
        assert set(variables) == {"params"}, name
    for name in ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN",
                 "ResNet18BN_AP"):
        shape = (32, 32, 3)
        model = models.get_model(name, 10, shape)
        variables = jax.eval_shape(lambda k: models.init_model(model, k, shape), jax.random.key(0))
        assert set(variables) == {"params", "batch_stats"}, name


# --------------------------------------------------------------------------- registry / sweep


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_architecture_traces_at_every_size(name, shape):
    model = models.get_model(name, 13, shape)

    def forward(key):
        variables = models.init_model(model, key, shape)
        return model.apply(variables, jnp.zeros((2, *shape)), method="features_and_logits")

    features, logits = jax.eval_shape(forward, jax.random.key(0))
    chex.assert_shape(logits, (2, 13))
    assert features.ndim == 2 and features.shape[0] == 2


# Reference classifier input sizes (SPEC §2.3) at 28/32 px and our 64 px sizes (A7).
EXPECTED_D = {
    ("MLP", 28): 128, ("MLP", 64): 128,
    ("LeNet", 28): 84, ("LeNet", 64): 84,
    ("AlexNet", 28): 192 * 4 * 4, ("AlexNet", 32): 192 * 4 * 4, ("AlexNet", 64): 192 * 8 * 8,
    ("VGG11", 28): 512, ("VGG11", 32): 512, ("VGG11", 64): 512 * 2 * 2,
    ("ResNet18", 28): 512, ("ResNet18", 32): 512, ("ResNet18", 64): 512,
    ("ResNet18BN_AP", 28): 512 * 3 * 3, ("ResNet18BN_AP", 32): 512 * 4 * 4,
    ("ResNet18BN_AP", 64): 512 * 8 * 8,
    ("ConvNetNP", 32): 128 * 32 * 32, ("ConvNetD4", 28): 128 * 2 * 2,
}


@pytest.mark.parametrize("name, side", sorted(EXPECTED_D))
def test_cross_architecture_feature_sizes(name, side):
    shape = (side, side, 1 if side == 28 else 3)
    model = models.get_model(name, 10, shape)
    features = jax.eval_shape(
        lambda k: model.apply(models.init_model(model, k, shape), jnp.zeros((1, *shape)),
                              method="embed"),
        jax.random.key(0),
    )
    chex.assert_shape(features, (1, EXPECTED_D[(name, side)]))


# One real (executed) forward per cross-architecture family, spread over the three sizes.
REAL_RUNS = (
    ("MLP", (28, 28, 1)), ("LeNet", (64, 64, 3)), ("AlexNet", (32, 32, 3)),
    ("AlexNetBN", (28, 28, 1)), ("VGG11", (28, 28, 1)), ("VGG11BN", (64, 64, 3)),
    ("ResNet18", (64, 64, 3)), ("ResNet18BN", (28, 28, 1)), ("ResNet18BN_AP", (32, 32, 3)),
    ("ConvNetLN", (64, 64, 3)), ("ConvNetASwishBN", (32, 32, 3)),
)
FULL_RUNS = tuple((n, s) for n in models.MODEL_NAMES for s in SHAPES if (n, s) not in REAL_RUNS)


def _cheap_variables(model, shape):
    """Variables with PyTorch-like ranges drawn by numpy.

    Real initialisation is tested on ConvNet/MLP above (all nets share `Conv2d`/`Linear`); here
    it would only add seconds of threefry compilation per architecture.
    """
    abstract = jax.eval_shape(lambda k: models.init_model(model, k, shape), jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        bound = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if name == "kernel" else 0.05
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _check_real_forward(name, shape):
    model = models.get_model(name, 10, shape)
    variables = _cheap_variables(model, shape)
    x = _images(jax.random.key(1), 2, shape)
    forward = jax.jit(
        lambda v, x: models.apply_features_and_logits(model, v, x, train=True)[:2]
    )
    features, logits = forward(variables, x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite((features, logits))
    kernel = variables["params"]["classifier"]["kernel"]
    bias = variables["params"]["classifier"]["bias"]
    chex.assert_trees_all_close(features @ kernel + bias, logits, rtol=1e-4, atol=1e-4)
    if name == "ResNet18":
        # The CMI teacher's embedding: 512-d mean of a post-ReLU map, hence non-negative.
        chex.assert_shape(features, (2, 512))
        assert float(features.min()) >= 0.0


@pytest.mark.parametrize("name, shape", REAL_RUNS)
def test_real_forward_per_family(name, shape):
    _check_real_forward(name, shape)


@pytest.mark.skipif(not FULL_SWEEP, reason="set BACON_JAX_FULL_MODEL_SWEEP=1 (minutes on CPU)")
@pytest.mark.parametrize("name, shape", FULL_RUNS)
def test_real_forward_full_sweep(name, shape):
    _check_real_forward(name, shape)


def test_unknown_model_name_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        models.get_model("ConvNetXL", 10, (32, 32, 3))
    message = str(err.value)
    assert "ConvNetXL" in message
    for name in models.MODEL_NAMES:
        assert name in message


def test_bad_image_shape_and_bad_options_raise():
    with pytest.raises(ValueError, match="image_shape"):
        models.get_model("ConvNet", 10, (32, 32))
    with pytest.raises(ValueError, match="tanh"):
        models.init_model(models.ConvNet(10, width=4, act="tanh"), jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match="too small"):
        models.init_model(models.get_model("LeNet", 10, (8, 8, 1)), jax.random.key(0), (8, 8, 1))


def test_registry_contents_match_spec():
    for name in ("ConvNet", "ConvNetW32", "ConvNetW256", "ConvNetD1", "ConvNetD4", "ConvNetAS",
                 "ConvNetAR", "ConvNetAL", "ConvNetASwish", "ConvNetNN", "ConvNetBN", "ConvNetLN",
                 "ConvNetIN", "ConvNetGN", "ConvNetNP", "ConvNetMP", "ConvNetAP",
                 "ConvNetASwishBN", "MLP", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN",
                 "ResNet18", "ResNet18BN", "ResNet18BN_AP"):
        assert name in models.MODEL_NAMES
    net = models.get_model("ConvNetW64", 10, (32, 32, 3))
    assert (net.width, net.depth, net.act, net.norm, net.pooling) == (
        64, 3, "relu", "instancenorm", "avgpooling")
    assert models.get_model("ConvNetASwishBN", 10, (32, 32, 3)).norm == "batchnorm"
    assert models.get_model("ConvNetAL", 10, (32, 32, 3)).act == "leakyrelu"


def test_eval_pools():
    assert models.eval_pool("M") == ("MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18")
    assert models.eval_pool("S") == ("ConvNet",)
    assert set(models.EVAL_POOLS) == {"M", "B", "W", "D", "A", "P", "N", "S"}
    for pool in models.EVAL_POOLS.values():
        for name in pool:
            assert name in models.MODEL_NAMES
    with pytest.raises(ValueError) as err:
        models.eval_pool("Q")
    assert "Q" in str(err.value) and "M" in str(err.value)


def test_networks_that_ignore_their_input_are_refused():
    # Instance-norm ResNet18 on 8x8 reaches a 1x1 map, where instance norm outputs its bias: the
    # logits do not depend on the input (it scored exactly chance, 10.00 +- 0.00, on digits).
    with pytest.raises(ValueError, match=r"'ResNet18'.*\(8, 8, 1\)"):
        models.check_architecture("ResNet18", 10, (8, 8, 1))
    models.check_architecture("ResNet18BN", 10, (8, 8, 1))
    models.check_architecture("ConvNetW8", 10, (8, 8, 1))


@pytest.mark.parametrize("name", ["VGG11", "LeNet"])
def test_networks_too_deep_for_the_image_are_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"'{name}' cannot take images of shape \(8, 8, 1\).*"
                                         "too small"):
        models.check_architecture(name, 10, (8, 8, 1))
