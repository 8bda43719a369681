"""loops.scan: the unrolled form equals lax.scan and, like it, holds one iteration's temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import loops


def _independent_step(carry, x):
    """No carry dependence: each iteration builds a (n, n) temporary from its own row."""
    outer = jnp.outer(x, x)
    return carry, jnp.sum(jnp.sin(outer) @ jnp.cos(outer))


def test_unrolled_equals_scan_with_carry_and_mixed_dtypes():
    xs = {"x": jnp.linspace(-2.0, 2.0, 12).reshape(4, 3), "i": jnp.arange(4, dtype=jnp.int32),
          "k": jnp.arange(8, dtype=jnp.uint32).reshape(4, 2)}

    def step(carry, x):
        carry = carry * 0.5 + jnp.sum(x["x"]) + x["i"] + jnp.sum(x["k"])
        return carry, {"y": x["x"] * carry, "i": x["i"], "k": x["k"]}

    want = jax.jit(lambda xs: loops.scan(step, jnp.float32(1.0), xs, False))(xs)
    got = jax.jit(lambda xs: loops.scan(step, jnp.float32(1.0), xs, True))(xs)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_unrolled_keeps_values_that_the_ordering_must_not_change():
    # The ordering adds -0.0 to every input: NaN, infinities and signed zeros pass unchanged, also
    # after an iteration whose output is NaN or infinite.
    xs = jnp.array([[jnp.nan, 1.0], [-0.0, jnp.inf], [0.0, -jnp.inf]], jnp.float32)
    _, ys = jax.jit(lambda xs: loops.scan(lambda c, x: (c, x * 1.0), None, xs, True))(xs)
    np.testing.assert_array_equal(ys, xs)
    np.testing.assert_array_equal(np.signbit(ys), np.signbit(xs))


@pytest.mark.parametrize("unroll", [False, True])
def test_independent_iterations_do_not_share_memory(unroll):
    # Without the ordering, XLA:CPU runs the 8 unrolled iterations side by side and the compiled
    # temporaries are 8x one iteration's (measured: 1024 vs 128 MiB at n = 4096).
    n, length = 512, 8
    xs = jnp.ones((length, n), jnp.float32)
    one = jax.jit(lambda x: _independent_step(None, x)[1]).lower(xs[0]).compile()
    loop = jax.jit(lambda xs: loops.scan(_independent_step, None, xs, unroll)[1]).lower(xs).compile()
    one_bytes = one.memory_analysis().temp_size_in_bytes
    loop_bytes = loop.memory_analysis().temp_size_in_bytes
    assert one_bytes >= n * n * 4  # the (n, n) temporary is really there
    assert loop_bytes < 2 * one_bytes, (loop_bytes, one_bytes)
