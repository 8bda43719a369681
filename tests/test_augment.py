"""Tests for bacon_jax.augment: DSA (SPEC §3) and partition-and-expansion (SPEC §4).

The parameterised ops are checked against independent numpy implementations of the SPEC formulas,
and the random draws of `dsa` are checked by recovering their parameters from the outputs of
specially built images.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from bacon_jax import augment

# --------------------------------------------------------------------------------------------------
# Independent numpy references (float64, explicit loops).
# --------------------------------------------------------------------------------------------------


def np_shift(img, tx, ty):
    h, w, _ = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i + tx < h and 0 <= j + ty < w:
                out[i, j] = img[i + tx, j + ty]
    return out


def np_cutout(img, ox, oy):
    h, w, _ = img.shape
    sh, sw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    out = img.copy()
    r0, c0 = ox - sh // 2, oy - sw // 2
    out[max(r0, 0) : min(r0 + sh, h), max(c0, 0) : min(c0 + sw, w)] = 0.0
    return out


def np_grid_sample(img, theta):
    """torch affine_grid + grid_sample (align_corners=False, bilinear, zeros), from SPEC §3.3."""
    h, w, c = img.shape
    out = np.zeros((h, w, c), np.float64)
    for i in range(h):
        for j in range(w):
            xn = (2 * j + 1) / w - 1
            yn = (2 * i + 1) / h - 1
            xs = theta[0][0] * xn + theta[0][1] * yn + theta[0][2]
            ys = theta[1][0] * xn + theta[1][1] * yn + theta[1][2]
            px = ((xs + 1) * w - 1) / 2
            py = ((ys + 1) * h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[i, j] += wy * wx * img[yy, xx]
    return out


def np_color(img, ub, us, uc):
    x = img.astype(np.float64) + (ub - 0.5) * 1.0
    m = x.mean(axis=-1, keepdims=True)
    x = (x - m) * (us * 2.0) + m
    m = x.mean()
    return (x - m) * (uc + 0.5) + m


_affine_jit = jax.jit(augment._affine)


def _rotation(angle):
    return [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0]]


def rand_images(seed, shape):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def index_image(h, w):
    """Channel 0 = column coordinate, channel 1 = row coordinate, channel 2 = unique id + 1."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([cols, rows, rows * w + cols + 1], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Parameterised ops against numpy.
# --------------------------------------------------------------------------------------------------


class ParameterisedOpsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shift_all_offsets(self):
        shifts = [(tx, ty) for tx in range(-4, 5) for ty in range(-4, 5)]
        # + 5 so that the input has no zeros.
        x = np.repeat(rand_images(0, (1, 8, 8, 3)) + 5.0, len(shifts), axis=0)
        tx, ty = np.array(shifts).T
        out = np.asarray(self.variant(augment._shift)(x, tx, ty))
        chex.assert_shape(out, x.shape)
        for n, (a, b) in enumerate(shifts):
            np.testing.assert_array_equal(out[n], np_shift(x[n], a, b))

    def test_shift_per_sample_and_non_square(self):
        x = rand_images(1, (3, 6, 10, 2))
        tx, ty = np.array([-2, 0, 3]), np.array([4, -1, 0])
        out = np.asarray(augment._shift(x, tx, ty))
        for n in range(3):
            np.testing.assert_array_equal(out[n], np_shift(x[n], tx[n], ty[n]))

    def test_cutout_every_offset(self):
        cutout = jax.jit(augment._cutout)
        for h, size in ((28, 14), (32, 16), (64, 32)):
            self.assertEqual(augment._cutout_size(h), size)
            ox = np.arange(0, h + 1 - size % 2)
            oy = ox[::-1]  # columns get the mirrored offsets, so every value is used on both axes
            x = np.ones((len(ox), h, h, 2), np.float32)
            out = np.asarray(cutout(x, ox, oy))
            for n, o in enumerate(ox):
                np.testing.assert_array_equal(out[n], np_cutout(x[n], o, oy[n]))
                zero_rows = (out[n, :, :, 0] == 0).any(axis=1).sum()
                self.assertEqual(zero_rows, min(o - size // 2 + size, h) - max(o - size // 2, 0))

    def test_cutout_odd_size_and_per_sample(self):
        # H = 30 gives size 15 (odd), offsets {0..29}.
        self.assertEqual(augment._cutout_size(30), 15)
        x = rand_images(2, (4, 30, 30, 3))
        ox, oy = np.array([0, 7, 29, 15]), np.array([29, 0, 3, 15])
        out = np.asarray(augment._cutout(x, ox, oy))
        for n in range(4):
            np.testing.assert_array_equal(out[n], np_cutout(x[n], ox[n], oy[n]))

    def test_flip(self):
        x = rand_images(3, (2, 4, 6, 3))
        out = np.asarray(augment._flip(x, np.array([0.49, 0.5])))
        np.testing.assert_array_equal(out[0], x[0, :, ::-1, :])
        np.testing.assert_array_equal(out[1], x[1])
        # The flip is along width (axis 2), not height.
        self.assertFalse(np.array_equal(out[0], x[0, ::-1, :, :]))

    def test_affine_identity(self):
        x = rand_images(4, (2, 8, 8, 3))
        out = _affine_jit(x, np.array([[1.0, 0, 0], [0, 1.0, 0]]))
        np.testing.assert_allclose(np.asarray(out), x, atol=1e-5)

    def test_affine_negative_x_is_width_flip(self):
        x = rand_images(5, (1, 6, 10, 2))
        out = _affine_jit(x, np.array([[-1.0, 0, 0], [0, 1.0, 0]]))
        np.testing.assert_allclose(np.asarray(out), x[:, :, ::-1, :], atol=1e-5)

    @parameterized.parameters(
        dict(theta=[[1.2, 0, 0], [0, 0.85, 0]], h=8, w=8),  # zoom out along W, in along H
        dict(theta=[[0.9, 0, 0], [0, 1.15, 0]], h=6, w=10),  # non-square
        dict(theta=_rotation(0.2), h=8, w=8),
        dict(theta=_rotation(-0.25), h=10, w=6),
        dict(theta=[[0.7, 0.1, 0.3], [-0.2, 1.1, -0.15]], h=7, w=9),  # general, with translation
    )
    def test_affine_matches_numpy_grid_sample(self, theta, h, w):
        x = rand_images(6, (2, h, w, 3))
        out = np.asarray(_affine_jit(x, np.array(theta)))
        for n in range(2):
            ref = np_grid_sample(x[n].astype(np.float64), theta)
            np.testing.assert_allclose(out[n], ref, atol=1e-5)

    def test_affine_matches_map_coordinates(self):
        # Second independent check: the map_coordinates route of SPEC §3.4.
        h, w = 9, 7
        x = rand_images(7, (1, h, w, 2))
        a = 0.22
        theta = np.array(
            [[1.1 * math.cos(a), -math.sin(a), 0.05], [math.sin(a), 0.9 * math.cos(a), 0.0]]
        )
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        xn, yn = (2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1
        xs = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
        ys = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
        coords = [((ys + 1) * h - 1) / 2, ((xs + 1) * w - 1) / 2]
        sample = functools.partial(
            jax.scipy.ndimage.map_coordinates, order=1, mode="constant", cval=0.0
        )
        ref = np.stack([sample(x[0, :, :, c], coords) for c in range(2)], axis=-1)
        np.testing.assert_allclose(np.asarray(_affine_jit(x, theta))[0], ref, atol=1e-5)

    def test_affine_per_sample_theta(self):
        x = rand_images(8, (2, 8, 8, 1))
        thetas = np.array([[[1.1, 0, 0], [0, 0.9, 0]], [[0.95, 0, 0], [0, 1.2, 0]]])
        out = np.asarray(_affine_jit(x, thetas))
        for n in range(2):
            ref = np_grid_sample(x[n].astype(np.float64), thetas[n])
            np.testing.assert_allclose(out[n], ref, atol=1e-5)

    def test_color_matches_numpy(self):
        x = rand_images(9, (3, 5, 5, 3))
        ub, us, uc = np.array([0.1, 0.5, 0.99]), np.array([0.0, 0.3, 0.9]), np.array([0.2, 0.7, 0])
        out = np.asarray(augment._color(x, ub, us, uc))
        for n in range(3):
            np.testing.assert_allclose(out[n], np_color(x[n], ub[n], us[n], uc[n]), atol=1e-5)
        # Scalars are shared by the batch.
        out = np.asarray(augment._color(x, 0.3, 0.6, 0.4))
        for n in range(3):
            np.testing.assert_allclose(out[n], np_color(x[n], 0.3, 0.6, 0.4), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# dsa: call semantics and the distributions of the draws.
# --------------------------------------------------------------------------------------------------


def _dsa_fn(siamese, families=augment.DSA_FAMILIES):
    return functools.partial(augment.dsa, siamese=siamese, families=families)


@functools.lru_cache(maxsize=None)
def _per_family(siamese):
    """Jitted (x, key) -> [6, N, H, W, C]: dsa forced to each family in turn (one compile)."""

    def fn(x, key):
        return jnp.stack([_dsa_fn(siamese, (fam,))(x, key) for fam in augment.DSA_FAMILIES])

    return jax.jit(fn)


class DsaTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shape_dtype_determinism(self):
        x = rand_images(10, (4, 8, 8, 3))
        fn = self.variant(_dsa_fn(False, ("color", "flip")))
        out = fn(x, jax.random.PRNGKey(0))
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, jnp.float32)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(fn(x, jax.random.PRNGKey(0))))
        others = [np.asarray(fn(x, jax.random.PRNGKey(s))) for s in range(1, 4)]
        self.assertTrue(any(not np.array_equal(o, np.asarray(out)) for o in others))

    def test_siamese_shared_across_batch_sizes_every_family(self):
        x = rand_images(10, (16, 16, 16, 3))
        fn = _per_family(True)
        for seed in range(8):
            key = jax.random.PRNGKey(seed)
            big, small = np.asarray(fn(x, key)), np.asarray(fn(x[:3], key))
            chex.assert_shape(big, (6, 16, 16, 16, 3))
            chex.assert_shape(small, (6, 3, 16, 16, 3))
            np.testing.assert_allclose(big[:, :3], small, atol=1e-6)

    def test_siamese_shared_all_families_vmapped_over_classes(self):
        # Per-class Siamese use: the real and synthetic batches of a class share that class's key
        # (here 64 "classes", so every family is drawn several times).
        real = rand_images(11, (64, 6, 16, 16, 3))
        keys = jax.random.split(jax.random.PRNGKey(1), 64)

        def both(r, key):
            return _dsa_fn(True)(r, key), _dsa_fn(True)(r[:2], key)

        big, small = map(np.asarray, jax.jit(jax.vmap(both))(real, keys))
        np.testing.assert_allclose(big[:, :2], small, atol=1e-6)
        # The augmentation actually changes the images for most keys.
        changed = np.abs(small - real[:, :2]).max(axis=(1, 2, 3, 4)) > 1e-3
        self.assertGreater(changed.mean(), 0.7)

    def test_siamese_same_transform_for_identical_images(self):
        x = np.repeat(rand_images(12, (1, 16, 16, 3)), 16, axis=0)
        for seed in range(4):
            out = np.asarray(_per_family(True)(x, jax.random.PRNGKey(seed)))
            np.testing.assert_allclose(out, np.repeat(out[:, :1], 16, axis=1), atol=1e-6)

    def test_non_siamese_per_sample(self):
        x = np.repeat(rand_images(13, (1, 16, 16, 3)), 16, axis=0)
        out = np.asarray(_per_family(False)(x, jax.random.PRNGKey(3)))
        for f, fam in enumerate(augment.DSA_FAMILIES):
            distinct = {out[f, n].round(4).tobytes() for n in range(16)}
            self.assertGreater(len(distinct), 1 if fam == "flip" else 8, fam)

    def test_one_family_per_call_non_siamese(self):
        # flip never creates zeros, cutout always zeroes a non-empty box: a call is all one or all
        # the other.
        x = rand_images(14, (32, 16, 16, 3)) + 10.0
        fn = jax.jit(_dsa_fn(False, ("flip", "cutout")))
        out = np.stack([np.asarray(fn(x, k)) for k in jax.random.split(jax.random.PRNGKey(4), 100)])
        has_zero = (out == 0).any(axis=(2, 3, 4))  # [keys, N]
        self.assertTrue(np.all(has_zero.all(axis=1) | (~has_zero).all(axis=1)))
        frac_cutout = has_zero[:, 0].mean()
        self.assertGreater(frac_cutout, 0.3)
        self.assertLess(frac_cutout, 0.7)

    def test_family_subset_is_respected(self):
        x = rand_images(15, (4, 16, 16, 3))
        fn = jax.jit(_dsa_fn(True, ("flip",)))
        outs = [np.asarray(fn(x, jax.random.PRNGKey(s))) for s in range(12)]
        for o in outs:  # only identity or width flip
            self.assertTrue(np.array_equal(o, x) or np.array_equal(o, x[:, :, ::-1]))
        self.assertEqual(len({o.tobytes() for o in outs}), 2)

    def test_invalid_families(self):
        x = jnp.zeros((1, 8, 8, 3))
        key = jax.random.PRNGKey(0)
        with pytest.raises(ValueError):
            augment.dsa(x, key, siamese=True, families=("zoom",))
        with pytest.raises(ValueError):
            augment.dsa(x, key, siamese=True, families=())
        with pytest.raises(ValueError):
            augment.dsa(x, key, siamese=True, families=("crop", "crop"))

    def test_crop_draws(self):
        h = 32
        x = np.repeat(index_image(h, h)[None], 2000, axis=0)
        out = np.asarray(jax.jit(_dsa_fn(False, ("crop",)))(x, jax.random.PRNGKey(6)))
        v = out[:, 16, 16, 2].astype(np.int64) - 1  # centre pixel is always inside for |shift| <= 4
        tx, ty = v // h - 16, v % h - 16
        self.assertEqual((tx.min(), tx.max(), ty.min(), ty.max()), (-4, 4, -4, 4))
        self.assertEqual(len(set(zip(tx.tolist(), ty.tolist()))), 81)
        self.assertLess(abs(np.corrcoef(tx, ty)[0, 1]), 0.1)
        for n in range(5):
            np.testing.assert_array_equal(out[n], np_shift(x[n], tx[n], ty[n]))
        # 64 px: shift 8.
        x64 = np.repeat(index_image(64, 64)[None], 500, axis=0)
        out = np.asarray(jax.jit(_dsa_fn(False, ("crop",)))(x64, jax.random.PRNGKey(7)))
        v = out[:, 32, 32, 2].astype(np.int64) - 1
        self.assertEqual((v // 64 - 32).min(), -8)
        self.assertEqual((v // 64 - 32).max(), 8)

    @parameterized.parameters((28, 14), (32, 16), (30, 15))
    def test_cutout_draws(self, h, size):
        x = np.ones((1500, h, h, 1), np.float32)
        out = np.asarray(jax.jit(_dsa_fn(False, ("cutout",)))(x, jax.random.PRNGKey(8)))
        offsets = []
        for axis in (2, 1):  # zeroed rows -> ox, zeroed cols -> oy
            zero = (out[..., 0] == 0).any(axis=axis)  # [N, H]
            start = zero.argmax(axis=1)
            end = h - zero[:, ::-1].argmax(axis=1)
            o = np.where(start > 0, start + size // 2, end - size + size // 2)
            clipped = np.minimum(o - size // 2 + size, h) - np.maximum(o - size // 2, 0)
            np.testing.assert_array_equal(end - start, clipped)
            offsets.append(o)
            self.assertEqual(o.min(), 0)
            self.assertEqual(o.max(), h - size % 2)
            self.assertEqual(len(np.unique(o)), h - size % 2 + 1)
        self.assertLess(abs(np.corrcoef(*offsets)[0, 1]), 0.1)
        for n in range(5):
            np.testing.assert_array_equal(out[n], np_cutout(x[n], offsets[0][n], offsets[1][n]))

    def test_flip_draws(self):
        x = rand_images(16, (2000, 4, 4, 1))
        out = np.asarray(jax.jit(_dsa_fn(False, ("flip",)))(x, jax.random.PRNGKey(9)))
        flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
        same = np.all(out == x, axis=(1, 2, 3))
        self.assertTrue(np.all(flipped | same))
        self.assertGreater(flipped.mean(), 0.45)
        self.assertLess(flipped.mean(), 0.55)

    def test_scale_draws(self):
        w = 16
        x = np.repeat(index_image(w, w)[None], 1000, axis=0)
        out = np.asarray(jax.jit(_dsa_fn(False, ("scale",)))(x, jax.random.PRNGKey(10)))
        j = 12  # bilinear reproduces the linear index image where all neighbours are inside
        xn = (2 * j + 1) / w - 1
        sx = ((2 * out[:, j, j, 0] + 1) / w - 1) / xn  # channel 0 = column coordinate
        sy = ((2 * out[:, j, j, 1] + 1) / w - 1) / xn  # channel 1 = row coordinate
        for s in (sx, sy):
            self.assertGreaterEqual(s.min(), 1 / 1.2 - 1e-4)
            self.assertLess(s.max(), 1.2 + 1e-4)
            self.assertLess(s.min(), 1 / 1.2 + 0.02)
            self.assertGreater(s.max(), 1.2 - 0.02)
        self.assertLess(abs(np.corrcoef(sx, sy)[0, 1]), 0.1)
        for n in range(3):
            theta = [[sx[n], 0, 0], [0, sy[n], 0]]
            ref = np_grid_sample(x[n].astype(np.float64), theta)
            np.testing.assert_allclose(out[n], ref, atol=1e-3)

    def test_rotate_draws(self):
        w = 16
        x = np.repeat(index_image(w, w)[None], 1000, axis=0)
        out = np.asarray(jax.jit(_dsa_fn(False, ("rotate",)))(x, jax.random.PRNGKey(11)))
        i, j = 10, 9
        xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / w - 1
        xs = (2 * out[:, i, j, 0] + 1) / w - 1
        ys = (2 * out[:, i, j, 1] + 1) / w - 1
        angle = np.degrees(np.arctan2(ys, xs) - np.arctan2(yn, xn))
        self.assertGreaterEqual(angle.min(), -15.0 - 1e-2)
        self.assertLess(angle.max(), 15.0 + 1e-2)
        self.assertLess(angle.min(), -14.0)
        self.assertGreater(angle.max(), 14.0)
        # Pure rotation: the radius is preserved.
        np.testing.assert_allclose(np.hypot(xs, ys), np.hypot(xn, yn), atol=1e-4)

    def test_color_draws(self):
        # A: every pixel has channels (-1, 0, 1): out = x * fs * fc + b.
        # B: channel-constant pixels varying in space: saturation is a no-op,
        #    out = (x - mean) * fc + mean + b.
        a = np.broadcast_to(np.array([-1.0, 0.0, 1.0], np.float32), (8, 8, 3))
        ramp = np.arange(64, dtype=np.float32).reshape(8, 8, 1) / 64.0
        b = np.broadcast_to(ramp, (8, 8, 3))
        x = np.stack([a, b])
        keys = jax.random.split(jax.random.PRNGKey(12), 1000)
        out = np.asarray(jax.jit(jax.vmap(_dsa_fn(True, ("color",)), in_axes=(None, 0)))(x, keys))
        fc = (out[:, 1, 7, 7, 0] - out[:, 1, 0, 0, 0]) / (ramp[7, 7, 0] - ramp[0, 0, 0])
        bright = out[:, 1, 0, 0, 0] - (ramp[0, 0, 0] - ramp.mean()) * fc - ramp.mean()
        fs = (out[:, 0, 0, 0, 2] - out[:, 0, 0, 0, 0]) / 2.0 / fc
        for v, lo, hi in ((bright, -0.5, 0.5), (fs, 0.0, 2.0), (fc, 0.5, 1.5)):
            self.assertGreaterEqual(v.min(), lo - 1e-4)
            self.assertLess(v.max(), hi + 1e-4)
            self.assertLess(v.min(), lo + 0.05)
            self.assertGreater(v.max(), hi - 0.05)
        self.assertLess(abs(np.corrcoef(bright, fc)[0, 1]), 0.15)
        self.assertLess(abs(np.corrcoef(fs, fc)[0, 1]), 0.15)

    def test_gradients_flow_every_family(self):
        x = rand_images(17, (4, 16, 16, 3))
        wts = rand_images(18, (4, 16, 16, 3))

        def losses(im):
            per = [
                jnp.sum(_dsa_fn(siamese, (fam,))(im, jax.random.PRNGKey(0)) * wts)
                for siamese in (True, False)
                for fam in augment.DSA_FAMILIES
            ]
            return jnp.stack(per)

        grads = jax.jit(jax.jacrev(losses))(x)  # [12, N, H, W, C], one gradient per (mode, family)
        chex.assert_shape(grads, (12,) + x.shape)
        chex.assert_tree_all_finite(grads)
        self.assertTrue(np.all(np.abs(np.asarray(grads)).sum(axis=(1, 2, 3, 4)) > 0))


# --------------------------------------------------------------------------------------------------
# Partition-and-expansion.
# --------------------------------------------------------------------------------------------------


class ExpansionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_downscale2x_is_avg_pool(self):
        x = rand_images(20, (3, 8, 6, 2))
        out = np.asarray(self.variant(augment.downscale2x)(x))
        chex.assert_shape(out, (3, 4, 3, 2))
        ref = np.zeros((3, 4, 3, 2), np.float32)
        for i in range(4):
            for j in range(3):
                ref[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_upsample2x_hand_example(self):
        x = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32).reshape(1, 2, 2, 1)
        out = np.asarray(self.variant(augment.upsample2x)(x))
        chex.assert_shape(out, (1, 4, 4, 1))
        # Half-pixel source coordinates -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
        r = np.array([0.0, 0.25, 0.75, 1.0])
        np.testing.assert_allclose(out[0, :, :, 0], 2 * r[:, None] + r[None, :], atol=1e-6)

    def test_upsample2x_numpy(self):
        x = rand_images(21, (2, 3, 5, 2))
        out = np.asarray(augment.upsample2x(x))

        def src(o, n):
            s = min(max((o + 0.5) / 2 - 0.5, 0.0), n - 1)
            i0 = int(math.floor(s))
            i1 = min(i0 + 1, n - 1)
            return i0, i1, s - i0

        ref = np.zeros((2, 6, 10, 2))
        for i in range(6):
            r0, r1, fr = src(i, 3)
            for j in range(10):
                c0, c1, fc = src(j, 5)
                ref[:, i, j] = ((1 - fr) * ((1 - fc) * x[:, r0, c0] + fc * x[:, r0, c1])
                                + fr * ((1 - fc) * x[:, r1, c0] + fc * x[:, r1, c1]))
        np.testing.assert_allclose(out, ref, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_quadrant_init(self):
        draws = rand_images(22, (4, 3, 8, 8, 2))
        out = np.asarray(self.variant(augment.quadrant_init)(draws))
        chex.assert_shape(out, (3, 8, 8, 2))
        small = [np.asarray(augment.downscale2x(draws[k])) for k in range(4)]
        np.testing.assert_allclose(out[:, :4, :4], small[0], atol=1e-7)  # top-left
        np.testing.assert_allclose(out[:, 4:, :4], small[1], atol=1e-7)  # bottom-left
        np.testing.assert_allclose(out[:, :4, 4:], small[2], atol=1e-7)  # top-right
        np.testing.assert_allclose(out[:, 4:, 4:], small[3], atol=1e-7)  # bottom-right

    @chex.variants(with_jit=True, without_jit=True)
    def test_expand_quadrants_order_and_labels(self):
        k = 3
        # Each quadrant is a constant encoding (image, quadrant); upsampling keeps constants.
        imgs = np.zeros((k, 8, 8, 1), np.float32)
        for n in range(k):
            imgs[n, :4, :4] = 10 * n + 0
            imgs[n, 4:, :4] = 10 * n + 1
            imgs[n, :4, 4:] = 10 * n + 2
            imgs[n, 4:, 4:] = 10 * n + 3
        labels = np.array([7, 1, 4])
        out, out_labels = self.variant(augment.expand_quadrants)(imgs, labels)
        chex.assert_shape(out, (4 * k, 8, 8, 1))
        np.testing.assert_array_equal(np.asarray(out_labels), np.tile(labels, 4))
        for q in range(4):
            for n in range(k):
                np.testing.assert_allclose(np.asarray(out[q * k + n]), 10 * n + q, atol=1e-6)

    def test_expand_quadrants_equals_upsampled_crops(self):
        imgs = rand_images(23, (2, 8, 8, 3))
        out, _ = augment.expand_quadrants(imgs, np.arange(2))
        crops = [imgs[:, :4, :4], imgs[:, 4:, :4], imgs[:, :4, 4:], imgs[:, 4:, 4:]]
        ref = np.concatenate([np.asarray(augment.upsample2x(c)) for c in crops])
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)

    def test_init_then_expand_recovers_draw_blocks(self):
        draws = rand_images(24, (4, 2, 8, 8, 1))
        out, _ = augment.expand_quadrants(augment.quadrant_init(draws), np.zeros(2, np.int32))
        for q in range(4):
            ref = augment.upsample2x(augment.downscale2x(draws[q]))
            block = np.asarray(out[2 * q : 2 * q + 2])
            np.testing.assert_allclose(block, np.asarray(ref), atol=1e-6)

    def test_expand_gradients(self):
        imgs = rand_images(25, (2, 8, 8, 3))
        g = jax.grad(lambda x: jnp.sum(augment.expand_quadrants(x, jnp.arange(2))[0]))(imgs)
        # Each input pixel's bilinear x2 weights sum to 2 per axis (edge clamp included).
        np.testing.assert_allclose(np.asarray(g), 4.0, atol=1e-5)

        def loss(x):
            expanded, _ = augment.expand_quadrants(x, jnp.arange(2))
            return jnp.sum(augment.dsa(expanded, jax.random.PRNGKey(1), siamese=True) ** 2)

        g = jax.grad(loss)(imgs)
        chex.assert_tree_all_finite(g)
        self.assertGreater(float(jnp.abs(g).sum()), 0.0)
