"""PyTorch-semantics SGD with momentum and coupled weight decay, on pytrees.

torch.optim.SGD(lr, momentum, weight_decay): g' = g + wd * w; buf = momentum * buf + g' (buf = g' on
the first step, which a zero-initialised buffer reproduces); w = w - lr * buf. Weight decay applies to
every parameter, biases and norm affines included (SPEC 5.8, 8). The learning rate is an argument so
one compiled loop can change it (the evaluation's x0.1 drop, SPEC 8).
"""

import jax
import jax.numpy as jnp


def init_momentum(params):
    """A zero momentum buffer shaped like `params`."""
    return jax.tree.map(jnp.zeros_like, params)


def sgd_step(params, momentum, grads, lr, *, beta, weight_decay):
    """One torch-style SGD step; returns (new_params, new_momentum)."""
    momentum = jax.tree.map(
        lambda m, g, w: beta * m + g + weight_decay * w, momentum, grads, params
    )
    params = jax.tree.map(lambda w, m: w - lr * m, params, momentum)
    return params, momentum
