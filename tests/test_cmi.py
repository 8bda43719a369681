"""Tests of the CMI regularizer: `losses.cmi_loss` and the teachers of `bacon_jax.teacher`."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import config_lib, errors, losses, models, teacher

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _digits_config(arg):
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), arg)


def _numpy_cmi(embeddings, num_classes, ipc):
    """mean_i KL(p_i || q_{y_i}), written out with explicit loops in float64."""
    e = np.asarray(embeddings, np.float64)
    p = np.exp(e - e.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    total = 0.0
    for c in range(num_classes):
        rows = p[c * ipc:(c + 1) * ipc]
        q = rows.mean(axis=0)
        for row in rows:
            total += np.sum(row * (np.log(row) - np.log(q)))
    return total / (num_classes * ipc)


def _numpy_cmi_grad_detached(embeddings, num_classes, ipc):
    """Analytic d/df_i with the centroid held fixed: p_i * (g_i - <p_i, g_i>) / N, g = log p - log q."""
    e = np.asarray(embeddings, np.float64)
    p = np.exp(e - e.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    q = np.repeat(p.reshape(num_classes, ipc, -1).mean(axis=1), ipc, axis=0)
    g = np.log(p) - np.log(q)
    return p * (g - np.sum(p * g, axis=1, keepdims=True)) / e.shape[0]


def test_cmi_loss_matches_hand_computed_kl():
    embeddings = jax.random.normal(jax.random.PRNGKey(0), (3 * 4, 7)) * 2.0
    got = losses.cmi_loss(embeddings, num_classes=3, ipc=4)
    assert float(got) > 0.0
    np.testing.assert_allclose(got, _numpy_cmi(embeddings, 3, 4), rtol=1e-5)
    # A single class block (the per-class IDM/BACON use, A8).
    np.testing.assert_allclose(losses.cmi_loss(embeddings[:5], 1, 5),
                               _numpy_cmi(embeddings[:5], 1, 5), rtol=1e-5)


def test_cmi_loss_zero_for_identical_class_samples_and_for_ipc1():
    per_class = jax.random.normal(jax.random.PRNGKey(1), (4, 1, 9))
    identical = jnp.broadcast_to(per_class, (4, 3, 9)).reshape(12, 9)
    assert abs(float(losses.cmi_loss(identical, 4, 3))) < 1e-6
    # ipc = 1 (DM at IPC 1): q_c = p_i, so the term is exactly 0 whatever the inputs.
    varied = jax.random.normal(jax.random.PRNGKey(2), (10, 9)) * 5.0
    assert float(losses.cmi_loss(varied, 10, 1)) == 0.0
    assert float(jnp.max(jnp.abs(jax.grad(losses.cmi_loss)(varied, 10, 1)))) == 0.0


def test_cmi_loss_finite_when_probabilities_underflow():
    embeddings = jnp.array([[0.0, 200.0], [200.0, 0.0]])  # p_ik = exp(-200) underflows in float32
    value = losses.cmi_loss(embeddings, 1, 2)
    np.testing.assert_allclose(value, np.log(2.0), rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(losses.cmi_loss)(embeddings, 1, 2)))


def test_cmi_gradient_is_analytic_and_centroid_path_is_zero():
    """SPEC A8: gradients flow through p_i and q_c, but the q_c path contributes exactly zero."""
    num_classes, ipc, dim = 3, 4, 6
    embeddings = jax.random.normal(jax.random.PRNGKey(3), (num_classes * ipc, dim)) * 1.5
    grad = jax.grad(losses.cmi_loss)(embeddings, num_classes, ipc)
    np.testing.assert_allclose(grad, _numpy_cmi_grad_detached(embeddings, num_classes, ipc),
                               rtol=1e-4, atol=1e-7)

    def split_loss(e_p, e_q):
        # p from the first argument, the centroid from the second: its gradient is the q path.
        log_p = jax.nn.log_softmax(e_p.reshape(num_classes, ipc, dim), axis=-1)
        p_q = jax.nn.softmax(e_q.reshape(num_classes, ipc, dim), axis=-1)
        log_q = jnp.log(jnp.mean(p_q, axis=1, keepdims=True))
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / (num_classes * ipc)

    through_p, through_q = jax.grad(split_loss, argnums=(0, 1))(embeddings, embeddings)
    assert float(jnp.max(jnp.abs(through_q))) < 1e-7
    np.testing.assert_allclose(through_p + through_q, grad, rtol=1e-5, atol=1e-8)


def test_cmi_config_fields_and_overrides():
    config = _digits_config("ipc10,cmi.weight=8000,cmi.teacher_dir=/x,cmi.teacher_model=ConvNetW8")
    assert config.cmi.weight == 8000.0 and isinstance(config.cmi.weight, float)
    assert config.cmi.teacher_dir == "/x"
    assert config.cmi.teacher_model == "ConvNetW8"
    default = _digits_config("ipc10")
    assert default.cmi.weight == 0.0 and default.cmi.num_teachers == 1
    assert (default.cmi.epochs, default.cmi.lr, default.cmi.momentum) == (40, 0.01, 0.9)
    assert (default.cmi.weight_decay, default.cmi.batch_size) == (1e-3, 256)
    assert teacher.load_teachers_from_config(default, None) is None  # weight 0: CMI off


@pytest.fixture(scope="module")
def digits_teachers(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teachers"))
    config = _digits_config("ipc10,cmi.teacher_model=ConvNetW8,cmi.epochs=1,cmi.num_teachers=2")
    written = teacher.pretrain_teachers(config, workdir)
    return config, workdir, written


def test_pretrain_save_load_round_trip(digits_teachers):
    config, workdir, written = digits_teachers
    assert [m["index"] for m in written] == [0, 1]
    for meta in written:
        assert meta["dataset"] == "digits" and meta["image_shape"] == [8, 8, 1]
        assert meta["model"] == "ConvNetW8" and meta["epochs"] == 1
        assert 0.0 <= meta["test_accuracy"] <= 1.0
    model, variables = teacher.load_teachers(workdir, "digits", (8, 8, 1), 10)
    assert teacher.num_teachers(variables) == 2
    images = jax.random.normal(jax.random.PRNGKey(4), (10 * 3, 8, 8, 1))
    first = jax.tree.map(lambda leaf: leaf[0], variables)
    assert teacher.teacher_embed(model, first, images).shape == (30, 8)  # ConvNetW8: D = 8
    # The two teachers have different keys, hence different weights.
    kernels = jax.tree.leaves(variables["params"])
    assert not np.allclose(kernels[0][0], kernels[0][1])
    # A rerun finds both teachers and trains nothing.
    again = teacher.pretrain_teachers(config, workdir)
    assert [m["test_accuracy"] for m in again] == [m["test_accuracy"] for m in written]
    # A rerun with other settings is refused.
    other = _digits_config("ipc10,cmi.teacher_model=ConvNetW8,cmi.epochs=2")
    with pytest.raises(ValueError, match="other settings"):
        teacher.pretrain_teachers(other, workdir)


def test_cmi_term_samples_a_teacher_inside_jit(digits_teachers):
    _, workdir, _ = digits_teachers
    model, variables = teacher.load_teachers(workdir, "digits", (8, 8, 1), 10)
    images = jax.random.normal(jax.random.PRNGKey(5), (10 * 2, 8, 8, 1))
    term = jax.jit(teacher.cmi_term, static_argnums=(0, 4, 5))
    embed_loss = jax.jit(lambda v, x: losses.cmi_loss(teacher.teacher_embed(model, v, x), 10, 2))
    for seed in range(4):
        key = jax.random.PRNGKey(seed)
        index = int(jax.random.randint(key, (), 0, 2))
        chosen = jax.tree.map(lambda leaf: leaf[index], variables)
        expected = embed_loss(chosen, images)
        np.testing.assert_allclose(term(model, variables, key, images, 10, 2), expected,
                                   rtol=1e-5)
    grad = jax.jit(jax.grad(lambda x: teacher.cmi_term(model, variables, key, x, 10, 2)))(images)
    assert grad.shape == images.shape and np.all(np.isfinite(grad))
    assert float(jnp.max(jnp.abs(grad))) > 0.0


def test_load_teachers_errors(tmp_path, digits_teachers):
    missing = tmp_path / "nowhere"
    with pytest.raises(errors.UserError, match="nowhere.*experiments/pretrain.py"):
        teacher.load_teachers(str(missing), "digits", (8, 8, 1), 10)
    with pytest.raises(errors.UserError, match="cmi.teacher_dir is empty"):
        teacher.load_teachers("", "digits", (8, 8, 1), 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.UserError, match="holds no teacher"):
        teacher.load_teachers(str(empty), "digits", (8, 8, 1), 10)
    # The digits teachers, asked for by an MNIST run: both datasets are named.
    _, workdir, _ = digits_teachers
    with pytest.raises(ValueError, match="'digits'.*'mnist'"):
        teacher.load_teachers(workdir, "mnist", (28, 28, 1), 10)
    # A teacher written for MNIST, found by a digits run.
    foreign = tmp_path / "foreign"
    net = models.get_model("ConvNetW8", 10, (28, 28, 1))
    teacher.save_teacher(
        str(foreign / "teacher_0"), models.init_model(net, jax.random.PRNGKey(0), (28, 28, 1)),
        {"dataset": "mnist", "image_shape": [28, 28, 1], "num_classes": 10, "zca": False,
         "model": "ConvNetW8"},
    )
    with pytest.raises(ValueError, match="'mnist'.*'digits'"):
        teacher.load_teachers(str(foreign), "digits", (8, 8, 1), 10)
    # The same through the config helper a cmi.weight > 0 run uses.
    config = _digits_config(f"ipc10,cmi.weight=1.0,cmi.teacher_dir={foreign}")
    from bacon_jax import data
    with pytest.raises(ValueError, match="'mnist'"):
        teacher.load_teachers_from_config(config, data.DATASETS["digits"])


class _ConstantEmbedding(nn.Module):
    """Stands in for ResNet18 (instance norm) on 8x8 digits, whose 1x1 last-stage map normalises
    to exactly 0 whatever the input (checked by hand; too slow to build in this test)."""

    @nn.compact
    def embed(self, x, train=False):
        del train
        return jnp.zeros((x.shape[0], 4)) * nn.Dense(1)(x.reshape(x.shape[0], -1))


def test_teacher_with_constant_embedding_is_refused():
    from bacon_jax import data
    net = _ConstantEmbedding()
    images = jnp.ones((3, 8, 8, 1))
    variables = net.init(jax.random.PRNGKey(0), images, method="embed")
    with pytest.raises(ValueError, match="same embedding"):
        teacher._check_embedding_varies(net, variables, images, "ResNet18",
                                        data.DATASETS["digits"])
    # A ConvNet teacher's embedding varies, so it passes.
    convnet = models.get_model("ConvNetW8", 10, (8, 8, 1))
    varied = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    teacher._check_embedding_varies(convnet, models.init_model(convnet, jax.random.PRNGKey(0),
                                                               (8, 8, 1)),
                                    varied, "ConvNetW8", data.DATASETS["digits"])
