"""Image augmentations: Differentiable Siamese Augmentation and partition-and-expansion.

Two groups of functions live here:

* DSA (SPEC §3): `dsa` draws one augmentation family per call (mode 'S', SPEC §3.2) and applies
  it with either one parameter value shared by the whole batch (Siamese, used during distillation
  so that the real and the synthetic batch of a class see the same transform) or independent
  per-sample values (used per minibatch while training evaluation networks).
* IDM's partition-and-expansion (SPEC §4): `quadrant_init` builds stored images from four downscaled
  real draws, and `expand_quadrants` turns K stored images into 4K upsampled quadrants.

Images are NHWC float32 in normalized space, so the zero used for padding, shifting and cutout is
the dataset mean colour (quirk 6). Every function is pure, jit- and vmap-compatible and
differentiable with respect to the images.
"""

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

# The order defines the family index drawn in mode 'S' (SPEC §3.1, §3.4).
DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

# ParamDiffAug constants (SPEC §3.1).
_BRIGHTNESS = 1.0
_SATURATION = 2.0
_CONTRAST = 0.5
_CROP_RATIO = 0.125
_CUTOUT_RATIO = 0.5
_SCALE_RATIO = 1.2
_ROTATE_DEGREES = 15.0
_FLIP_PROB = 0.5


def _per_sample(value, n):
    """Broadcasts a scalar or [N] parameter to shape [N]."""
    return jnp.broadcast_to(jnp.asarray(value), (n,))


def _crop_shift(size):
    # int(H * 0.125 + 0.5): 4 for 28 and 32 pixels, 8 for 64 (SPEC §3.3).
    return int(size * _CROP_RATIO + 0.5)


def _cutout_size(size):
    # int(H * 0.5 + 0.5): 14 / 16 / 32 for 28 / 32 / 64 pixels (SPEC §3.3).
    return int(size * _CUTOUT_RATIO + 0.5)


# --------------------------------------------------------------------------------------------------
# Parameterised ops. Parameters are scalars (shared by the batch) or [N] arrays (one per image).
# --------------------------------------------------------------------------------------------------


def _color(x, u_bright, u_sat, u_contrast):
    """Brightness, then saturation, then contrast, with u's in [0, 1) (SPEC §3.3)."""
    n = x.shape[0]
    u_bright = _per_sample(u_bright, n)[:, None, None, None]
    u_sat = _per_sample(u_sat, n)[:, None, None, None]
    u_contrast = _per_sample(u_contrast, n)[:, None, None, None]
    x = x + (u_bright - 0.5) * _BRIGHTNESS
    # Saturation uses the per-pixel mean over channels, taken after brightness.
    m = jnp.mean(x, axis=3, keepdims=True)
    x = (x - m) * (u_sat * _SATURATION) + m
    # Contrast uses the per-image mean over (H, W, C).
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - m) * (u_contrast + _CONTRAST) + m


def _shift_one(img, tx, ty):
    h, w = img.shape[0], img.shape[1]
    rows = jnp.arange(h) + tx
    cols = jnp.arange(w) + ty
    valid = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    src = img[jnp.clip(rows, 0, h - 1)][:, jnp.clip(cols, 0, w - 1)]
    return jnp.where(valid[:, :, None], src, jnp.zeros_like(src))


def _shift(x, tx, ty):
    """Zero-filled integer shift: out[i, j] = x[i + tx, j + ty] if inside, else 0.

    The reference pads one zero pixel and gathers at clamped indices, which is exactly this
    zero-filled shift (SPEC §3.3, quirk 6). tx acts on rows (H), ty on columns (W).
    """
    n = x.shape[0]
    tx = _per_sample(tx, n).astype(jnp.int32)
    ty = _per_sample(ty, n).astype(jnp.int32)
    return jax.vmap(_shift_one)(x, tx, ty)


def _cutout(x, ox, oy):
    """Zeroes rows [ox - s//2, ox - s//2 + s) and cols [oy - s//2, ...), clipped (SPEC §3.3)."""
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    sh, sw = _cutout_size(h), _cutout_size(w)
    ox = _per_sample(ox, n).astype(jnp.int32)[:, None]
    oy = _per_sample(oy, n).astype(jnp.int32)[:, None]
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    r0 = ox - sh // 2
    c0 = oy - sw // 2
    in_rows = (rows >= r0) & (rows < r0 + sh)  # [N, H]
    in_cols = (cols >= c0) & (cols < c0 + sw)  # [N, W]
    cut = in_rows[:, :, None] & in_cols[:, None, :]  # [N, H, W]
    # A multiplicative mask keeps the op differentiable (gradient 0 inside the box), as in the
    # reference.
    return x * (1.0 - cut.astype(x.dtype))[..., None]


def _flip(x, u):
    """Flips along the width axis where u < 0.5 (SPEC §3.3)."""
    n = x.shape[0]
    do_flip = _per_sample(u, n) < _FLIP_PROB
    return jnp.where(do_flip[:, None, None, None], x[:, :, ::-1, :], x)


def _affine_one(img, theta):
    h, w = img.shape[0], img.shape[1]
    # affine_grid with align_corners=False: pixel centres in normalized coordinates (SPEC §3.3).
    xn = (2.0 * jnp.arange(w, dtype=img.dtype) + 1.0) / w - 1.0  # columns
    yn = (2.0 * jnp.arange(h, dtype=img.dtype) + 1.0) / h - 1.0  # rows
    xn, yn = jnp.meshgrid(xn, yn, indexing="xy")  # both [H, W]
    xs = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
    ys = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
    # grid_sample unnormalization with align_corners=False.
    col = ((xs + 1.0) * w - 1.0) / 2.0
    row = ((ys + 1.0) * h - 1.0) / 2.0
    c0 = jnp.floor(col)
    r0 = jnp.floor(row)
    wc1 = col - c0
    wr1 = row - r0
    c0 = c0.astype(jnp.int32)
    r0 = r0.astype(jnp.int32)

    out = jnp.zeros_like(img)
    for dr, wr in ((0, 1.0 - wr1), (1, wr1)):
        for dc, wc in ((0, 1.0 - wc1), (1, wc1)):
            r = r0 + dr
            c = c0 + dc
            # padding_mode='zeros': each out-of-range neighbour contributes 0.
            valid = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            val = img[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]  # [H, W, C]
            weight = jnp.where(valid, wr * wc, 0.0)
            out = out + weight[:, :, None] * val
    return out


def _affine(x, theta):
    """torch affine_grid + grid_sample with defaults (align_corners=False, bilinear, zeros).

    Args:
      x: [N, H, W, C] images.
      theta: [2, 3] matrix shared by the batch, or [N, 2, 3] per image. Row 0 maps to the width
        (x) coordinate, row 1 to the height (y) coordinate, as in torch.

    Returns:
      [N, H, W, C] resampled images.
    """
    n = x.shape[0]
    theta = jnp.broadcast_to(jnp.asarray(theta, x.dtype), (n, 2, 3))
    return jax.vmap(_affine_one)(x, theta)


def _scale_matrix(sx, sy):
    zero = jnp.zeros_like(sx)
    return jnp.stack(
        [jnp.stack([sx, zero, zero], axis=-1), jnp.stack([zero, sy, zero], axis=-1)], axis=-2
    )


def _rotate_matrix(angle):
    cos, sin, zero = jnp.cos(angle), jnp.sin(angle), jnp.zeros_like(angle)
    return jnp.stack(
        [jnp.stack([cos, -sin, zero], axis=-1), jnp.stack([sin, cos, zero], axis=-1)], axis=-2
    )


# --------------------------------------------------------------------------------------------------
# DSA entry point.
# --------------------------------------------------------------------------------------------------


def dsa(images, key, *, siamese, families: Sequence[str] = DSA_FAMILIES):
    """Differentiable Siamese Augmentation, mode 'S' (SPEC §3.2-3.4).

    One family is drawn uniformly from `families` per call, and only that family is applied.

    Args:
      images: [N, H, W, C] float images in normalized space.
      key: PRNG key. In Siamese mode, calling with the same key on the real and the synthetic batch
        of a class gives both the same family and the same parameter values.
      siamese: static bool. True draws one value per random quantity and shares it across the
        whole batch (the draw does not depend on N); False draws one value per image.
      families: static tuple of family names, a subset of `DSA_FAMILIES`; the family index is drawn
        uniformly over this tuple in the given order (e.g. digits may drop "flip", quirk 20).

    Returns:
      The augmented images, same shape and dtype as `images`.
    """
    families = tuple(families)
    if not families:
        raise ValueError("families must name at least one DSA family")
    unknown = [f for f in families if f not in DSA_FAMILIES]
    if unknown or len(set(families)) != len(families):
        raise ValueError(f"families must be distinct names from {DSA_FAMILIES}, got {families}")

    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    # Siamese: one scalar per quantity, so the draw is independent of the batch size (quirk 5).
    shape = () if siamese else (n,)
    # One sub-key per purpose (SPEC §3.4); each random quantity gets its own key, so paired
    # quantities (tx/ty, sx/sy, ...) are independent draws.
    k_family, k1, k2, k3 = jax.random.split(key, 4)

    def uniform(k):
        return jax.random.uniform(k, shape, dtype=jnp.float32)

    def color(x):
        return _color(x, uniform(k1), uniform(k2), uniform(k3))

    def crop(x):
        sh, sw = _crop_shift(h), _crop_shift(w)
        tx = jax.random.randint(k1, shape, -sh, sh + 1)
        ty = jax.random.randint(k2, shape, -sw, sw + 1)
        return _shift(x, tx, ty)

    def cutout(x):
        sh, sw = _cutout_size(h), _cutout_size(w)
        # Offsets in {0, ..., H - (s mod 2)} inclusive (SPEC §3.3).
        ox = jax.random.randint(k1, shape, 0, h + 1 - sh % 2)
        oy = jax.random.randint(k2, shape, 0, w + 1 - sw % 2)
        return _cutout(x, ox, oy)

    def flip(x):
        return _flip(x, uniform(k1))

    def scale(x):
        lo = 1.0 / _SCALE_RATIO
        sx = lo + uniform(k1) * (_SCALE_RATIO - lo)
        sy = lo + uniform(k2) * (_SCALE_RATIO - lo)
        return _affine(x, _scale_matrix(sx, sy))

    def rotate(x):
        angle = (uniform(k1) - 0.5) * 2.0 * _ROTATE_DEGREES * math.pi / 180.0
        return _affine(x, _rotate_matrix(angle))

    ops = {
        "color": color,
        "crop": crop,
        "cutout": cutout,
        "flip": flip,
        "scale": scale,
        "rotate": rotate,
    }
    branches = [ops[name] for name in families]
    # One family per call, in both modes (SPEC §3.2).
    index = jax.random.randint(k_family, (), 0, len(branches))
    return jax.lax.switch(index, branches, images)


# --------------------------------------------------------------------------------------------------
# Partition-and-expansion (SPEC §4).
# --------------------------------------------------------------------------------------------------


def downscale2x(images):
    """Halves the resolution by exact 2x2 average pooling.

    torch's bilinear x0.5 with align_corners=False equals 2x2 average pooling exactly; the default
    antialiased `jax.image.resize` does not (SPEC §4.1, quirk 24).

    Args:
      images: [N, H, W, C] with even H and W.

    Returns:
      [N, H // 2, W // 2, C] images.
    """
    n, h, w, c = images.shape
    if h % 2 or w % 2:
        raise ValueError(f"downscale2x needs even H and W, got {(h, w)}")
    return images.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample2x(images):
    """Doubles the resolution with bilinear interpolation, align_corners=False (SPEC §4.2).

    Half-pixel centres with edge clamping, which `jax.image.resize(method='linear')` reproduces for
    upsampling (Appendix A: 3.6e-7 from torch).

    Args:
      images: [N, H, W, C] images.

    Returns:
      [N, 2H, 2W, C] images.
    """
    n, h, w, c = images.shape
    return jax.image.resize(images, (n, 2 * h, 2 * w, c), method="linear")


def quadrant_init(draws):
    """Builds stored images from four independent real draws (SPEC §4.1).

    Args:
      draws: [4, K, H, W, C]; draw k of stored image j lands in quadrant k of image j, with
        k = 0 top-left, 1 bottom-left, 2 top-right, 3 bottom-right (rows are the first spatial
        axis).

    Returns:
      [K, H, W, C] images whose quadrants are the 2x2-average-pooled draws.
    """
    if draws.shape[0] != 4:
        raise ValueError(f"quadrant_init needs 4 draws on axis 0, got shape {draws.shape}")
    small = [downscale2x(draws[k]) for k in range(4)]
    left = jnp.concatenate([small[0], small[1]], axis=1)
    right = jnp.concatenate([small[2], small[3]], axis=1)
    return jnp.concatenate([left, right], axis=2)


def expand_quadrants(images, labels) -> Tuple[jax.Array, jax.Array]:
    """IDM's `number_sign_augment`: K stored images to 4K upsampled quadrants (SPEC §4.2).

    Args:
      images: [K, H, W, C] stored images with even H and W.
      labels: [K] labels (or any array whose leading axis is K).

    Returns:
      (images, labels): [4K, H, W, C] images ordered [all top-left; all bottom-left; all top-right;
      all bottom-right], and the labels repeated in the same block order.
    """
    h, w = images.shape[1] // 2, images.shape[2] // 2
    a = images[:, :h, :w]
    b = images[:, h:, :w]
    c = images[:, :h, w:]
    d = images[:, h:, w:]
    quadrants = jnp.concatenate([a, b, c, d], axis=0)
    labels = jnp.asarray(labels)
    reps = (4,) + (1,) * (labels.ndim - 1)
    return upsample2x(quadrants), jnp.tile(labels, reps)
