"""`lax.scan`, or the same loop unrolled at trace time.

XLA:CPU runs convolutions inside while-loop bodies about 20x slower than the same ops outside one
(jax-ml/jax#12868), and `lax.scan(..., unroll=True)` still emits a while loop. On CPU the short
inner loops of this library (pool-training steps, minibatches of one epoch, class chunks, test
chunks) are therefore unrolled in Python; accelerators keep the compact scan.

An unrolled loop keeps the scan's order: each iteration's inputs are made to depend on the
previous iteration's outputs (an exact `+ (-0.0)`), so XLA cannot run iterations side by side.
Without it, iterations that share no carry (class chunks, test chunks) are independent, and
XLA:CPU interleaves them and keeps all their temporaries alive at once: chunking the classes then
bounds nothing (MNIST IPC 1, batch_real 5000, 10 classes: the same ~50 GiB compiled peak for chunks
of 2 as for all 10). `lax.optimization_barrier` does not order them on XLA:CPU (jax 0.10).
"""

import jax
import jax.numpy as jnp


def scan(fn, carry, xs, unroll):
    """`jax.lax.scan(fn, carry, xs)`, unrolled at trace time when `unroll` is True.

    Args:
        fn: (carry, x) -> (carry, y).
        carry: initial carry.
        xs: pytree with a common leading axis.
        unroll: trace a Python loop instead of emitting a while loop.

    Returns:
        (final carry, stacked ys), as lax.scan.
    """
    if not unroll:
        return jax.lax.scan(fn, carry, xs)
    length = jax.tree.leaves(xs)[0].shape[0]
    ys = []
    for i in range(length):
        x = jax.tree.map(lambda a: a[i], xs)
        if ys:  # start iteration i only once iteration i - 1 is done (peak memory of one)
            x = _after(x, ys[-1])
        carry, y = fn(carry, x)
        ys.append(y)
    if not ys or jax.tree.leaves(ys[0]) == []:
        return carry, ys[0] if ys else None
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def _after(x, y):
    """`x`, unchanged, but computed from every array in `y` so XLA must finish `y` first.

    Adds a runtime -0.0 (exact for every value, signed zeros and NaN included) built from a finite
    reduction of each of y's arrays; XLA cannot fold it away because it cannot know it is zero.
    """
    sums = [jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(y)]
    if not sums:
        return x
    total = sum(jnp.where(jnp.isfinite(t), t, 0.0) for t in sums)
    minus_zero = -(jnp.abs(total) * 0.0)

    def depend(leaf):  # integers get 0; other dtypes (bool, PRNG keys) stay as they are
        if jnp.issubdtype(leaf.dtype, jnp.floating) or jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf + minus_zero.astype(leaf.dtype)
        return leaf

    return jax.tree.map(depend, x)
