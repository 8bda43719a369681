"""The fused ConvNet blocks (bacon_jax/fused.py) compute the op-by-op ConvNet's functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import fused, losses, models


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)


# (architecture, image shape): 1-channel inputs (padding 3) on 8x8, whose third block falls back
# to op by op, and on 28x28; 3 channels (27 taps) with a depth-4 net whose last block is 2x2.
CASES = [("ConvNetW8", (8, 8, 1)), ("ConvNetW16", (28, 28, 1)), ("ConvNetD4", (16, 16, 3))]


@pytest.mark.parametrize("name,shape", CASES)
def test_fused_convnet_matches_op_by_op(name, shape):
    # 8x8 digits: the third conv's 3x3 output cannot be pooled by a fused block (op by op).
    all_fused = shape != (8, 8, 1)
    plain = models.get_model(name, 5, shape)
    fast = models.get_model(name, 5, shape, fused=True)
    variables = models.init_model(plain, jax.random.PRNGKey(0), shape)
    # Same parameter tree, names and initial values from the same key.
    fast_variables = models.init_model(fast, jax.random.PRNGKey(0), shape)
    assert jax.tree.structure(variables) == jax.tree.structure(fast_variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(fast_variables)):
        np.testing.assert_array_equal(a, b)

    x = 1.3 * jax.random.normal(jax.random.PRNGKey(1), (6,) + shape) + 0.2
    labels = jnp.arange(6) % 5

    def loss(model, params, x):
        return losses.cross_entropy(model.apply({"params": params}, x), labels)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)
    value, (g_params, g_x) = grad(plain, variables["params"], x)
    fast_value, (fast_g_params, fast_g_x) = grad(fast, variables["params"], x)
    assert abs(float(value - fast_value)) < 1e-5
    embed = jax.jit(lambda model, x: model.apply(variables, x, method="embed"), static_argnums=0)
    assert _relative(embed(plain, x), embed(fast, x)) < 1e-5
    assert _relative(g_x, fast_g_x) < 1e-5
    flat = jax.tree_util.tree_leaves_with_path(g_params)
    for (path, a), b in zip(flat, jax.tree.leaves(fast_g_params)):
        where = jax.tree_util.keystr(path)
        if where.endswith("['bias']") and "Conv2d" in where:
            # Instance norm cancels the conv bias: round-off vs (in fused blocks) exact zero.
            assert np.max(np.abs(a)) < 1e-5 and np.max(np.abs(b)) < 1e-5, where
            if all_fused:
                np.testing.assert_array_equal(b, 0.0)
        else:
            assert _relative(a, b) < 2e-5, where


def test_fused_blocks_vmap_over_networks():
    # The pool and evaluation nets are vmapped over per-network weights.
    shape = (8, 8, 1)
    plain = models.get_model("ConvNetW8", 3, shape)
    fast = models.get_model("ConvNetW8", 3, shape, fused=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = jax.vmap(lambda k: models.init_model(plain, k, shape)["params"])(keys)
    x = jax.random.normal(jax.random.PRNGKey(1), (4,) + shape)

    @jax.jit
    def grads(params):
        def for_model(model):
            loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
            return jax.vmap(jax.grad(loss))(params)
        return for_model(plain), for_model(fast)

    plain_grads, fast_grads = grads(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain_grads),
                            jax.tree.leaves(fast_grads)):
        if "Conv2d" not in jax.tree_util.keystr(path) or "kernel" in jax.tree_util.keystr(path):
            assert _relative(a, b) < 2e-5, jax.tree_util.keystr(path)


def test_unsupported_blocks_fall_back_to_op_by_op():
    # Odd conv outputs cannot be average-pooled by the fused block: the layer runs op by op.
    assert fused.supports((1, 8, 8, 3), (3, 3, 3, 4), 1)
    assert not fused.supports((1, 7, 7, 3), (3, 3, 3, 4), 1)
    shape = (9, 9, 3)
    plain = models.get_model("ConvNetW8", 2, shape)
    fast = models.get_model("ConvNetW8", 2, shape, fused=True)
    variables = models.init_model(fast, jax.random.PRNGKey(0), shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (3,) + shape)
    apply = jax.jit(lambda model, x: model.apply(variables, x), static_argnums=0)
    assert _relative(apply(plain, x), apply(fast, x)) < 1e-5


def test_other_convnet_kinds_keep_their_op_by_op_blocks():
    # Only instance norm + ReLU + average pooling blocks have a fused form; the others run the
    # same ops whatever `fused` says (bit-identical outputs).
    shape = (16, 16, 3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2,) + shape)
    for name in ("ConvNetBN", "ConvNetMP"):
        plain = models.get_model(name, 3, shape)
        fast = models.get_model(name, 3, shape, fused=True)
        variables = models.init_model(plain, jax.random.PRNGKey(0), shape)
        apply = jax.jit(lambda model: model.apply(variables, x), static_argnums=0)
        np.testing.assert_array_equal(apply(plain), apply(fast))
