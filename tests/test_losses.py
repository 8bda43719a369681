"""Tests for bacon_jax.losses: DM/IDM and BACON matching losses, synthetic CE (SPEC 5.4-5.6).

Values are checked against float64 numpy implementations written from the SPEC formulas; the BACON
NLL is evaluated literally as -log(pdf), as the reference does, so the analytic form in the library
is checked against an independent expression. Gradients are checked against the closed forms of
SPEC 5.5.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import losses

# --------------------------------------------------------------------------------------------------
# Independent numpy references (float64).
# --------------------------------------------------------------------------------------------------


def np_mmd(syn, real):
    return np.sum(np.square(real.mean(axis=0) - syn.mean(axis=0)))


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_bacon(syn, real, tv_weight=0.8, clip_weight=0.2):
    """SPEC 5.5 as the reference computes it: -log of the Gaussian pdf, L1 'TV', literal clip."""
    mu_s, mu_r = syn.mean(axis=0), real.mean(axis=0)
    sigma = np.exp(real.std(axis=0, ddof=1))
    pdf = np.exp(-0.5 * np.square((mu_s - mu_r) / sigma)) / (math.sqrt(2.0 * math.pi) * sigma)
    nll = -np.sum(np.log(pdf))
    tv = 0.5 * np.sum(np.abs(mu_s - mu_r))
    p_s, p_r = np_softmax(mu_s), np_softmax(mu_r)
    x = (p_s.mean() - p_r.mean()) / p_r.std(ddof=1)
    clip = (x - np.clip(x, 0.0, 1.0)) ** 2
    return nll + tv_weight * tv + clip_weight * clip


def np_cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def features(seed, n, d, scale=1.0):
    """Non-negative O(1) features, like the ReLU + average-pool ConvNet embedding."""
    rng = np.random.default_rng(seed)
    return (scale * rng.uniform(0.0, 2.0, (n, d))).astype(np.float32)


# Padded real batch: 9 valid rows scattered among 13, padded rows full of garbage that would
# dominate both the mean and the std if they leaked in.
MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1], bool)


def padded_real(seed, d):
    real = features(seed, len(MASK), d)
    real[~MASK] = 50.0 + 10.0 * np.arange((~MASK).sum())[:, None]
    return real


# --------------------------------------------------------------------------------------------------
# Values.
# --------------------------------------------------------------------------------------------------


class LossValuesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mmd_matches_numpy(self):
        syn, real = features(0, 8, 16), features(1, 12, 16, scale=1.3)
        value = self.variant(losses.mmd_loss)(syn, real)
        chex.assert_shape(value, ())
        np.testing.assert_allclose(value, np_mmd(syn.astype(np.float64), real), rtol=1e-5)
        # A value that is not trivially tiny: the real set is shifted, so the means differ.
        self.assertGreater(float(value), 0.1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mmd_masked_ignores_padded_rows(self):
        syn, real = features(2, 8, 16), padded_real(3, 16)
        value = self.variant(losses.mmd_loss)(syn, real, jnp.asarray(MASK))
        np.testing.assert_allclose(value, np_mmd(syn.astype(np.float64), real[MASK]), rtol=1e-5)
        # All-valid mask equals no mask.
        full = self.variant(losses.mmd_loss)(syn, real, jnp.ones(len(MASK), bool))
        np.testing.assert_allclose(full, np_mmd(syn.astype(np.float64), real), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bacon_matches_numpy(self):
        syn, real = features(4, 8, 16), features(5, 12, 16, scale=1.2)
        value = self.variant(losses.bacon_loss)(syn, real)
        chex.assert_shape(value, ())
        np.testing.assert_allclose(value, np_bacon(syn.astype(np.float64), real), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bacon_masked_uses_valid_rows_and_unbiased_std(self):
        syn, real = features(6, 8, 16), padded_real(7, 16)
        value = self.variant(losses.bacon_loss)(syn, real, jnp.asarray(MASK))
        expected = np_bacon(syn.astype(np.float64), real[MASK].astype(np.float64))
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        # The biased std (ddof 0) over the valid rows gives a measurably different value, so the
        # check above pins the (count - 1) denominator.
        valid = real[MASK].astype(np.float64)
        s_biased = valid.std(axis=0, ddof=0)
        s_unbiased = valid.std(axis=0, ddof=1)
        self.assertGreater(np.abs(s_unbiased - s_biased).sum(), 0.05)

    def test_bacon_weights(self):
        syn, real = features(8, 8, 16), features(9, 12, 16, scale=1.4)
        mu_s, mu_r = syn.mean(0), real.mean(0)
        s = real.std(0, ddof=1)
        nll_only = losses.bacon_loss(syn, real, tv_weight=0.0, clip_weight=0.0)
        np.testing.assert_allclose(nll_only, losses.gaussian_nll(mu_s, mu_r, s), rtol=1e-6)
        np.testing.assert_allclose(
            nll_only,
            np.sum(0.5 * math.log(2 * math.pi) + s + 0.5 * ((mu_s - mu_r) * np.exp(-s)) ** 2),
            rtol=1e-5,
        )
        tv = losses.bacon_loss(syn, real, tv_weight=1.0, clip_weight=0.0) - nll_only
        np.testing.assert_allclose(tv, 0.5 * np.abs(mu_s - mu_r).sum(), rtol=1e-4)
        np.testing.assert_allclose(losses.mean_feature_l1(mu_s, mu_r), tv, rtol=1e-4)

    def test_analytic_nll_is_finite_where_literal_pdf_underflows(self):
        # |delta / sigma| = 40: the literal log(pdf) is log(0) = -inf in float32 (SPEC 5.5).
        value = losses.gaussian_nll(jnp.array([40.0]), jnp.array([0.0]), jnp.array([0.0]))
        np.testing.assert_allclose(value, 0.5 * math.log(2 * math.pi) + 0.5 * 40.0**2, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_bacon_gradient_is_analytic(masked):
    """d loss / d syn_i = (delta * exp(-2 s) + 0.4 sign(delta)) / N_s for every synthetic row i."""
    n_s, d = 8, 32
    syn = features(10, n_s, d)
    real = padded_real(11, d) if masked else features(11, 13, d, scale=1.3)
    mask = jnp.asarray(MASK) if masked else None
    valid = real[MASK] if masked else real
    grad = jax.jit(jax.grad(losses.bacon_loss))(syn, real, mask)
    chex.assert_shape(grad, syn.shape)

    delta = syn.astype(np.float64).mean(0) - valid.mean(0)
    s = valid.std(0, ddof=1)
    assert np.abs(delta).min() > 1e-3  # away from the kink of |delta|
    per_mean = delta * np.exp(-2.0 * s) + 0.4 * np.sign(delta)
    expected = np.broadcast_to(per_mean / n_s, syn.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    # The quadratic part alone (without TV): pins exp(-2 s), not exp(-s) or 2 * delta.
    grad_nll = jax.jit(jax.grad(losses.bacon_loss))(syn, real, mask, 0.0, 0.0)
    np.testing.assert_allclose(
        grad_nll, np.broadcast_to(delta * np.exp(-2.0 * s) / n_s, syn.shape), rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("loss_name", sorted(losses.MATCHING_LOSSES))
def test_real_features_are_constants(loss_name):
    loss = losses.MATCHING_LOSSES[loss_name]
    syn, real = features(12, 6, 16), features(13, 10, 16, scale=1.3)
    grad_real = jax.grad(loss, argnums=1)(syn, real)
    chex.assert_trees_all_equal(grad_real, jnp.zeros_like(real))


@pytest.mark.parametrize("loss_name", sorted(losses.MATCHING_LOSSES))
@pytest.mark.parametrize("syn_shape, real_shape, mask_shape, named", [
    ((6, 16), (10, 32), None, r"\(6, 16\) and \(10, 32\)"),  # different feature widths
    ((16,), (10, 16), None, r"\(16,\) and \(10, 16\)"),  # one image's features, not a batch
    ((6, 16), (10, 16), (9,), r"real_mask must have shape \(10,\).*\(9,\)"),
])
def test_bad_feature_shapes_are_named(loss_name, syn_shape, real_shape, mask_shape, named):
    loss = losses.MATCHING_LOSSES[loss_name]
    mask = None if mask_shape is None else jnp.ones(mask_shape, bool)
    with pytest.raises(ValueError, match=named):
        loss(jnp.ones(syn_shape), jnp.ones(real_shape), mask)


def test_bacon_loss_of_one_real_row_is_nan_as_documented():
    """The unbiased std of one row is NaN (torch.std's too); the module docstring says so."""
    assert np.isnan(losses.bacon_loss(features(1, 4, 8), features(2, 1, 8)))
    assert np.isfinite(losses.bacon_loss(features(1, 4, 8), features(2, 2, 8)))


def test_mmd_gradient():
    syn, real = features(14, 6, 16), features(15, 10, 16, scale=1.3)
    grad = jax.grad(losses.mmd_loss)(syn, real)
    delta = syn.mean(0) - real.mean(0)
    np.testing.assert_allclose(grad, np.broadcast_to(2.0 * delta / 6, syn.shape), rtol=1e-5)


@pytest.mark.parametrize("d", [2048, 8192])
def test_clip_term_is_zero_with_zero_gradient(d):
    """SPEC 5.5, quirk 3, A5: both softmax means are 1/D: the clip term and its gradient are ~0."""
    trials = 64
    rng = np.random.default_rng(d)
    # Mean features of a ReLU net: non-negative, O(1), with a wide spread across dimensions.
    syn_means = np.abs(rng.normal(size=(trials, d))).astype(np.float32) * 2.0
    real_means = np.abs(rng.normal(size=(trials, d))).astype(np.float32) * 2.0
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(losses.bacon_clip_term)))(
        syn_means, real_means
    )
    chex.assert_shape(values, (trials,))
    chex.assert_shape(grads, (trials, d))
    assert float(jnp.max(jnp.abs(values))) < 1e-9
    assert float(jnp.max(jnp.abs(grads))) < 1e-9
    # The same term inside the loss: dropping it changes neither value nor gradient measurably.
    syn = features(16, 8, d)
    real = features(17, 12, d, scale=1.2)
    with_clip = jax.jit(jax.value_and_grad(losses.bacon_loss))(syn, real)
    without = jax.jit(jax.value_and_grad(lambda a, b: losses.bacon_loss(a, b, clip_weight=0.0)))(
        syn, real
    )
    chex.assert_trees_all_close(with_clip, without, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Cross-entropy.
# --------------------------------------------------------------------------------------------------


class CrossEntropyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_with_and_without_mask(self):
        rng = np.random.default_rng(19)
        logits = rng.normal(0, 2, (7, 5)).astype(np.float32)
        labels = rng.integers(0, 5, 7)
        mask = np.array([1, 0, 1, 1, 0, 0, 1], bool)
        per_row = np_cross_entropy(logits.astype(np.float64), labels)
        ce = self.variant(losses.cross_entropy)
        np.testing.assert_allclose(ce(logits, labels), per_row.mean(), rtol=1e-5)
        np.testing.assert_allclose(ce(logits, labels, mask), per_row[mask].mean(), rtol=1e-5)
        # The masked rows really are ignored: changing them does not change the loss.
        logits_changed = logits.copy()
        logits_changed[~mask] = 100.0 * rng.normal(size=logits_changed[~mask].shape)
        np.testing.assert_allclose(
            ce(logits_changed, labels, mask), ce(logits, labels, mask), rtol=1e-6
        )

    def test_all_masked_is_zero_not_nan(self):
        logits = jnp.ones((3, 4))
        value = losses.cross_entropy(logits, jnp.array([0, 1, 2]), jnp.zeros(3, bool))
        assert float(value) == 0.0

    def test_gradient_only_on_valid_rows(self):
        logits = jnp.asarray(np.random.default_rng(20).normal(size=(4, 3)), jnp.float32)
        labels = jnp.array([0, 2, 1, 1])
        mask = jnp.array([True, False, True, False])
        grad = np.asarray(jax.jit(jax.grad(losses.cross_entropy))(logits, labels, mask))
        valid = np.asarray(mask)
        np.testing.assert_array_equal(grad[~valid], np.zeros((2, 3)))
        # Valid rows: (softmax - onehot) / number of valid rows.
        z = np.asarray(logits, np.float64)[valid]
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        onehot = np.eye(3)[np.asarray(labels)[valid]]
        np.testing.assert_allclose(grad[valid], (p - onehot) / 2, rtol=1e-5, atol=1e-7)
