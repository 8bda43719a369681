"""`lax.scan`, or the same loop unrolled at trace time.

XLA:CPU runs convolutions inside while-loop bodies about 20x slower than the same ops outside one
(jax-ml/jax#12868), and `lax.scan(..., unroll=True)` still emits a while loop. On CPU the short
inner loops of this library (pool-training steps, minibatches of one epoch, class chunks, test
chunks) are therefore unrolled in Python; accelerators keep the compact scan.
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
        carry, y = fn(carry, jax.tree.map(lambda x: x[i], xs))
        ys.append(y)
    if not ys or jax.tree.leaves(ys[0]) == []:
        return carry, ys[0] if ys else None
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
