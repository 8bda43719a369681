"""ConvNet blocks with hand-written gradients: conv -> instance norm -> ReLU -> 2x2 average pool.

The reference ConvNet (SPEC 2.1) is a stack of such blocks. Written op by op, XLA:CPU spends most of
a training step outside the convolutions: it materialises every full-resolution intermediate of the
norm and its gradient (each 33 MB for a batch of 256 at 32x32x32), runs one pass per reduction, and
computes the first conv's weight gradient (one input channel) with a slow convolution emitter. The
two blocks here compute the same functions with fewer passes over memory:

* `conv_norm_relu_pool`: any block. The conv stays an XLA convolution; the norm, ReLU and pool
  are one custom-VJP function whose backward pass reads its input twice (the two per-image
  reductions in one variadic reduce) and writes the input gradient once.
* the first block (few input channels, `tap_count(...) <= MAX_TAPS`): the conv is a sum of
  K = 9 x C_in shifted copies of the input ("taps"), linear in them. Its per-image mean follows
  from the taps' means; neither pass stores the full-resolution conv output (XLA recomputes it
  from the taps inside the reductions and the pooling). The backward gets the norm's reductions
  and the weight gradient from one batched product of the centred taps with the masked gradient
  and the taps' covariance (`_tap_block_bwd`).

The maths is the reference's: forward values and gradients equal the op-by-op form up to float
round-off (tests compare both forms). One exact identity is used: instance norm subtracts each
channel's mean, so the conv bias before it changes nothing and its gradient is identically zero;
these blocks skip adding it and return an exact zero where autodiff returns round-off.

Shapes are NHWC; `kernel` is HWIO (3x3), as in `models.Conv2d`.
"""

import functools

import jax
import jax.numpy as jnp

# PyTorch's norm epsilon (SPEC 2.2).
NORM_EPS = 1e-5

# The first block recomputes its conv as K = 9 x C_in fused multiply-adds per output in every
# pass; beyond this many taps the conv runs as an XLA convolution.
MAX_TAPS = 27



def tap_count(kernel_shape):
    """K = kh * kw * C_in: the number of shifted input copies a conv with this kernel sums."""
    kh, kw, cin, _ = kernel_shape
    return kh * kw * cin


def supports(input_shape, kernel_shape, padding):
    """Whether `conv_norm_relu_pool` can run this block (stride-1 conv, even output for the pool)."""
    h, w = input_shape[-3] + 2 * padding - kernel_shape[0] + 1, input_shape[-2] + 2 * padding - \
        kernel_shape[1] + 1
    return h > 0 and w > 0 and h % 2 == 0 and w % 2 == 0


def _conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pool(x):
    """Exact 2x2 stride-2 average pooling of even-sized maps.

    Written as four strided slices: XLA:CPU fuses it with its producers into one vectorised loop
    (as a reduction over a reshaped window it emits a ~3x slower loop).
    """
    return 0.25 * ((x[:, 0::2, 0::2] + x[:, 1::2, 0::2]) + (x[:, 0::2, 1::2] + x[:, 1::2, 1::2]))


def _unpool(g, shape):
    """The gradient of `_pool`: each pooled gradient spread over its 2x2 window, times 1/4."""
    b, h, w, c = shape
    g = jnp.broadcast_to(0.25 * g[:, :, None, :, None, :], (b, h // 2, 2, w // 2, 2, c))
    return g.reshape(shape)


def _sum_pair(a, b, axes):
    """(sum of a, sum of b) over `axes` in one variadic reduce: one pass over the inputs."""
    zero = jnp.zeros((), a.dtype)
    return jax.lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]), axes)


def _materialized(x):
    """`x`, computed once into memory: the product with an identity matrix (exact for finite x).

    XLA:CPU fuses a cheap elementwise computation into every consumer, so a block's output (or
    its gradient) is recomputed inside the transposes XLA adds for the next conv's weight
    gradient, in transposed order and at a fraction of the speed (15 ms per such copy vs 2 ms for
    a transpose of the stored array; batch 256 at 16x16x32). Nothing fuses into a matrix product,
    and x @ I = x exactly (x * 1 plus exact zeros; non-finite values only occur when training
    has already diverged). `lax.optimization_barrier` does not stop this fusion on XLA:CPU.
    """
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.einsum("...c,cd->...d", x, eye, precision=jax.lax.Precision.HIGHEST)


def _spatial(v):
    """[B, C] per-image statistics broadcastable against [B, H, W, C] maps."""
    return v[:, None, None, :]


# ------------------------------------------------------------------------------------------------
# Any block: XLA conv, then norm -> ReLU -> pool with a two-pass backward.


def _norm_stats(y):
    """Per-image per-channel mean and 1/sqrt(biased variance + eps), two-pass as the reference."""
    n = y.shape[1] * y.shape[2]
    mean = jnp.sum(y, axis=(1, 2)) / n
    centred = y - _spatial(mean)
    var = jnp.sum(centred * centred, axis=(1, 2)) / n
    return mean, jax.lax.rsqrt(var + NORM_EPS)


def _normalized(y, mean, rstd, scale, bias):
    """z = (y - mean) * rstd * scale + bias, as y * a + c (the form both passes use)."""
    a = rstd * scale
    return y * _spatial(a) + _spatial(bias - mean * a)


@jax.custom_vjp
def _norm_relu_pool(y, conv_bias, scale, bias):
    del conv_bias  # cancels in the norm (module docstring)
    return _materialized(_pool(jax.nn.relu(_normalized(y, *_norm_stats(y), scale, bias))))


def _norm_relu_pool_fwd(y, conv_bias, scale, bias):
    mean, rstd = _norm_stats(y)
    out = _materialized(_pool(jax.nn.relu(_normalized(y, mean, rstd, scale, bias))))
    return out, (y, conv_bias, scale, bias, mean, rstd)


def _norm_relu_pool_grad(z, xhat, rstd, scale, g):
    """Gradients of pool(relu(z)), z = xhat * scale + bias, w.r.t. the norm's input, scale, bias.

    `z` must be computed exactly as in the forward pass, so the ReLU mask is the forward's. With gz
    the gradient at z (unpooled, masked), per image and channel s1 = sum gz and s2 = sum gz * xhat
    (one variadic reduce), and the usual norm backward gy = rstd * scale * (gz - (s1 + xhat * s2)
    / n).
    """
    n = xhat.shape[1] * xhat.shape[2]
    gz = jnp.where(z > 0, _unpool(g, z.shape), 0.0)
    s1, s2 = _sum_pair(gz, gz * xhat, (1, 2))
    gy = _spatial(rstd * scale) * (gz - (_spatial(s1) + xhat * _spatial(s2)) / n)
    return _materialized(gy), jnp.sum(s2, axis=0), jnp.sum(s1, axis=0)


def _norm_relu_pool_bwd(residuals, g):
    y, conv_bias, scale, bias, mean, rstd = residuals
    z = _normalized(y, mean, rstd, scale, bias)
    xhat = (y - _spatial(mean)) * _spatial(rstd)
    gy, d_scale, d_bias = _norm_relu_pool_grad(z, xhat, rstd, scale, g)
    return gy, jnp.zeros_like(conv_bias), d_scale, d_bias


_norm_relu_pool.defvjp(_norm_relu_pool_fwd, _norm_relu_pool_bwd)


# ------------------------------------------------------------------------------------------------
# The first block: the conv as a sum of K taps.


def _tap_list(x, padding, kh, kw):
    """The K shifted views x_k [B, H', W'] of the padded input, k = (i, j, c) in HWIO order."""
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return [xp[:, i:i + h, j:j + w, c]
            for i in range(kh) for j in range(kw) for c in range(x.shape[-1])]


def _weighted_taps(taps, weights, offset):
    """sum_k taps[k][..., None] * weights[:, k, :] + offset: the conv, fused by XLA into its users.

    weights: [B, K, C] (per image) and offset: [B, C].
    """
    out = _spatial(offset)
    for k, tap in enumerate(taps):
        out = out + tap[..., None] * _spatial(weights[:, k, :])
    return out


def _tap_stats(x, kernel, padding):
    """The taps, their means [B, K], the kernel as [K, C], the conv's mean and 1/std [B, C].

    The mean is linear in the taps' means; the variance is two-pass, the conv recomputed from the
    taps inside the reduction.
    """
    kh, kw, _, cout = kernel.shape
    taps = _tap_list(x, padding, kh, kw)
    n = taps[0].shape[1] * taps[0].shape[2]
    tap_mean = jnp.stack([jnp.sum(t, axis=(1, 2)) / n for t in taps], axis=1)  # [B, K]
    w = kernel.reshape(-1, cout)  # [K, C], rows in tap order
    mean = tap_mean @ w  # mean of the conv output (without its bias) per image and channel
    # Two-pass variance of the conv output, recomputed from the taps inside the reduction.
    batch = x.shape[0]
    centred = _weighted_taps(taps, jnp.broadcast_to(w, (batch,) + w.shape), -mean)
    var = jnp.sum(centred * centred, axis=(1, 2)) / n
    return taps, tap_mean, w, mean, jax.lax.rsqrt(var + NORM_EPS)


def _tap_block_out(taps, w, mean, rstd, scale, bias):
    """z = (conv - mean) * rstd * scale + bias as per-image tap weights: weights, offset."""
    a = rstd * scale  # [B, C]
    return w[None] * a[:, None, :], bias - mean * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tap_block(x, kernel, conv_bias, scale, bias, padding):
    return _tap_block_fwd(x, kernel, conv_bias, scale, bias, padding)[0]


def _tap_block_fwd(x, kernel, conv_bias, scale, bias, padding):
    taps, tap_mean, w, mean, rstd = _tap_stats(x, kernel, padding)
    weights, offset = _tap_block_out(taps, w, mean, rstd, scale, bias)
    out = _materialized(_pool(jax.nn.relu(_weighted_taps(taps, weights, offset))))
    return out, (x, kernel, conv_bias, scale, bias, tap_mean, mean, rstd)


def _tap_block_bwd(padding, residuals, g):
    """Gradients from one batched product of the centred taps with the ReLU-masked gradient.

    With P_k the taps, m_k their means, Pc_k = P_k - m_k, y = sum_k P_k W_k the conv,
    xhat = (y - mean) * rstd and gz the gradient at the norm's output (ReLU mask and unpooling
    applied), per image and channel:
      S1 = sum_p gz,  Tc_k = sum_p Pc_k gz  (one [B, K + 1, n] x [B, n, C] product),
      S2 = sum_p gz xhat = rstd * sum_k W_k Tc_k,
      gy = rstd * scale * (gz - (S1 + xhat * S2) / n)          (the norm's backward),
      dW_k = sum_b rstd * scale * (Tc_k - S2 * rstd * (Cov W)_k),  Cov = (1/n) sum_p Pc Pc^T,
    because sum_p P_k gy = rstd * scale * (sum_p P_k gz - m_k S1 - S2 * rstd * (Cov W)_k) and
    sum_p P_k gz = Tc_k + m_k S1. So the full-resolution gy is only formed for the input
    gradient (needed for synthetic images only: the transposed conv of gy).
    """
    x, kernel, conv_bias, scale, bias, tap_mean, mean, rstd = residuals
    kh, kw, _, cout = kernel.shape
    taps = _tap_list(x, padding, kh, kw)
    w = kernel.reshape(-1, cout)
    batch, h, wd = taps[0].shape
    n = h * wd
    z = _weighted_taps(taps, *_tap_block_out(taps, w, mean, rstd, scale, bias))  # as forward
    gz = jnp.where(z > 0, _unpool(g, z.shape), 0.0)
    rows = [t - tap_mean[:, k, None, None] for k, t in enumerate(taps)] + [jnp.ones_like(taps[0])]
    centred = jnp.stack(rows, axis=1).reshape(batch, len(rows), n)  # [B, K + 1, n]
    products = jnp.einsum("bkp,bpc->bkc", centred, gz.reshape(batch, n, cout))
    tc, s1 = products[:, :-1], products[:, -1]
    s2 = rstd * jnp.einsum("kc,bkc->bc", w, tc)
    # Over all K + 1 rows (no sliced copy of the big matrix); the ones row is dropped after.
    cov = jnp.einsum("bkp,blp->bkl", centred, centred)[:, :-1, :-1] / n
    a = rstd * scale
    d_w = jnp.einsum("bc,bkc->kc", a, tc - (s2 * rstd)[:, None, :] * (cov @ w))
    xhat = _weighted_taps(taps, jnp.broadcast_to(w, (batch,) + w.shape), -mean) * _spatial(rstd)
    gy = _materialized(_spatial(a) * (gz - (_spatial(s1) + xhat * _spatial(s2)) / n))
    d_x = jax.vjp(lambda x: _conv(x, kernel, padding), x)[1](gy)[0]
    return (d_x, d_w.reshape(kernel.shape), jnp.zeros_like(conv_bias), jnp.sum(s2, axis=0),
            jnp.sum(s1, axis=0))


_tap_block.defvjp(_tap_block_fwd, _tap_block_bwd)


def conv_norm_relu_pool(x, kernel, conv_bias, scale, bias, padding):
    """avgpool2(relu(instance_norm(conv(x, kernel) + conv_bias) * scale + bias)), fused.

    Args:
        x: [B, H, W, C_in] input.
        kernel: [kh, kw, C_in, C] conv kernel (stride 1, zero padding `padding` on every side).
        conv_bias: [C] conv bias (cancels in the norm; its gradient is exactly zero).
        scale, bias: [C] the norm's affine parameters.
        padding: static int.

    Returns:
        [B, H'/2, W'/2, C], H' and W' the conv's (even) output size.
    """
    if tap_count(kernel.shape) <= MAX_TAPS:
        return _tap_block(x, kernel, conv_bias, scale, bias, padding)
    return _norm_relu_pool(_conv(x, kernel, padding), conv_bias, scale, bias)
