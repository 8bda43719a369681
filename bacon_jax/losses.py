"""Matching losses of DM/IDM (MMD of means) and BACON, and the synthetic cross-entropy.

Every matching loss takes the features of ONE class: `syn_features` [N_s, D] (differentiable) and
`real_features` [N_r, D] (treated as constants), and returns a scalar. `real_mask` [N_r] marks the
valid rows of a padded real batch (classes smaller than `batch_real`, SPEC 1.3); `None` means all rows
are valid. Researchers can call these directly on their own features.

A loss needs at least one valid real row (`bacon_loss` two: the unbiased standard deviation of one
row is NaN, as torch.std's is in the reference); with fewer the result is NaN. Features of the wrong
rank or width raise a ValueError naming the shapes.
"""

import math

import jax
import jax.numpy as jnp
import optax


def _masked_mean(features, mask):
    if mask is None:
        return jnp.mean(features, axis=0)
    weights = mask.astype(features.dtype)
    return jnp.sum(features * weights[:, None], axis=0) / jnp.sum(weights)


def _masked_unbiased_std(features, mask):
    """Per-dimension standard deviation with the (N - 1) denominator, as torch.std."""
    if mask is None:
        return jnp.std(features, axis=0, ddof=1)
    weights = mask.astype(features.dtype)
    count = jnp.sum(weights)
    mean = jnp.sum(features * weights[:, None], axis=0) / count
    squares = jnp.sum(jnp.square(features - mean) * weights[:, None], axis=0)
    return jnp.sqrt(squares / (count - 1.0))


def _check_features(syn_features, real_features, real_mask=None):
    """Raises ValueError unless the features are [N_s, D] and [N_r, D] and the mask is [N_r]."""
    syn_shape, real_shape = tuple(jnp.shape(syn_features)), tuple(jnp.shape(real_features))
    if len(syn_shape) != 2 or len(real_shape) != 2 or syn_shape[1] != real_shape[1]:
        raise ValueError(
            f"Matching losses take [N_s, D] synthetic and [N_r, D] real features of one class; got "
            f"{syn_shape} and {real_shape}."
        )
    if real_mask is not None and tuple(jnp.shape(real_mask)) != real_shape[:1]:
        raise ValueError(
            f"real_mask must have shape ({real_shape[0]},) (one entry per real row); got "
            f"{tuple(jnp.shape(real_mask))}."
        )


def mmd_loss(syn_features, real_features, real_mask=None):
    """DM/IDM matching loss: squared distance between the mean features (SPEC 5.4, 6).

    Args:
        syn_features: [N_s, D] features of the synthetic images of one class.
        real_features: [N_r, D] features of the real images of the same class (no gradient).
        real_mask: optional [N_r] bool, valid rows of `real_features`.

    Returns:
        Scalar sum_d (mean_real_d - mean_syn_d)^2.
    """
    _check_features(syn_features, real_features, real_mask)
    real_mean = jax.lax.stop_gradient(_masked_mean(real_features, real_mask))
    syn_mean = jnp.mean(syn_features, axis=0)
    return jnp.sum(jnp.square(real_mean - syn_mean))


def gaussian_nll(syn_mean, real_mean, real_std):
    """-sum_d log N(syn_mean_d; real_mean_d, sigma_d^2) with sigma_d = exp(real_std_d) (SPEC 5.5).

    The reference evaluates log(pdf) literally, which underflows for |delta/sigma| > ~13; the analytic
    form below has the same value and gradient wherever the literal one is finite.
    """
    log_sigma = real_std
    delta = syn_mean - real_mean
    return jnp.sum(
        0.5 * math.log(2.0 * math.pi) + log_sigma + 0.5 * jnp.square(delta * jnp.exp(-log_sigma))
    )


def mean_feature_l1(syn_mean, real_mean):
    """BACON's "total variation": half the L1 distance between raw mean features (SPEC 5.5)."""
    return 0.5 * jnp.sum(jnp.abs(syn_mean - real_mean))


def bacon_clip_term(syn_mean, real_mean):
    """BACON's clip term on softmaxes of the mean features, as the reference defines it (SPEC 5.5).

    x = (mean(p_syn) - mean(p_real)) / std(p_real) is a scalar that is 0 up to rounding because both
    softmaxes sum to one; the term (x - clip(x, 0, 1))^2 is therefore ~1e-20 with ~0 gradient. It is
    kept (SPEC A5) so the loss reads as the reference's.
    """
    p_syn = jax.nn.softmax(syn_mean)
    p_real = jax.nn.softmax(real_mean)
    x = (jnp.mean(p_syn) - jnp.mean(p_real)) / jnp.std(p_real, ddof=1)
    return jnp.square(x - jnp.clip(x, 0.0, 1.0))


def bacon_loss(syn_features, real_features, real_mask=None, tv_weight=0.8, clip_weight=0.2):
    """BACON matching loss: Gaussian NLL + 0.8 * TV + 0.2 * clip (SPEC 5.5).

    sigma_d = exp(s_d) where s_d is the unbiased standard deviation of real feature d. Only the NLL's
    quadratic term and the TV term carry gradient: d/d(syn_mean_d) = delta_d * exp(-2 s_d)
    + 0.4 * sign(delta_d).

    Args:
        syn_features: [N_s, D] features of the synthetic images of one class.
        real_features: [N_r, D] features of the real images of the same class (no gradient).
        real_mask: optional [N_r] bool, valid rows of `real_features`.
        tv_weight: weight of the mean-feature L1 ("total variation") term.
        clip_weight: weight of the clip term.

    Returns:
        Scalar loss, including the data-independent constant sum_d (s_d + log(2 pi) / 2).
    """
    _check_features(syn_features, real_features, real_mask)
    real_features = jax.lax.stop_gradient(real_features)
    real_mean = _masked_mean(real_features, real_mask)
    real_std = _masked_unbiased_std(real_features, real_mask)
    syn_mean = jnp.mean(syn_features, axis=0)
    return (
        gaussian_nll(syn_mean, real_mean, real_std)
        + tv_weight * mean_feature_l1(syn_mean, real_mean)
        + clip_weight * bacon_clip_term(syn_mean, real_mean)
    )


def cross_entropy(logits, labels, mask=None):
    """Mean softmax cross-entropy over the valid rows (torch's CrossEntropyLoss 'mean')."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return jnp.mean(losses)
    weights = mask.astype(losses.dtype)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


MATCHING_LOSSES = {"mmd": mmd_loss, "bacon": bacon_loss}


def cmi_loss(embeddings, num_classes, ipc):
    """Class-aware CMI of a synthetic set in a teacher's feature space (SPEC 7.2, A8).

    p_i = softmax(f_i) over the D feature dimensions (not over classes); q_c = mean of the p_i of
    class c; the loss is the mean over rows of KL(p_i || q_{y_i}), i.e. torch's
    `kl_div(log q, log p, log_target=True, reduction='batchmean')` over C * ipc rows. Rows must be
    class-major: rows c * ipc .. (c + 1) * ipc - 1 belong to class c.

    Gradients flow through both p_i and q_c, as in the reference. The centroid path contributes
    exactly zero: d/dq_c of -sum_i p_i . log q_c is -ipc * 1 (a constant vector, since q_c is the
    mean of the p_i), and the softmax Jacobian annihilates constant vectors. So the gradient equals
    the one with q_c detached (tests/test_cmi.py checks this). With ipc == 1, q_c = p_i and the loss
    is identically 0 (SPEC 7.2; CMI has no effect on DM at IPC 1).

    log q_c is computed as logsumexp_i(log p_i) - log(ipc), which equals log(mean p_i) but stays
    finite when some p_ik underflow.

    Args:
        embeddings: [num_classes * ipc, D] teacher embeddings, class-major.
        num_classes: C (static). Pass 1 for the loss of a single class's samples.
        ipc: samples per class (static).

    Returns:
        Scalar mean KL(p_i || q_{y_i}).
    """
    rows, dim = embeddings.shape
    if rows != num_classes * ipc:
        raise ValueError(
            f"cmi_loss: {rows} embeddings do not match num_classes * ipc = {num_classes} * {ipc}."
        )
    log_p = jax.nn.log_softmax(embeddings.reshape(num_classes, ipc, dim), axis=-1)
    log_q = jax.nn.logsumexp(log_p, axis=1, keepdims=True) - math.log(ipc)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(kl) / rows
