"""Tests of the evaluation protocol (SPEC 8, A10): schedule, step semantics, batching, test pass."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import data, evaluation, models, parallel

IMAGE_SHAPE = (8, 8, 1)
PREP = data.Preprocessing(mean=(0.5,), std=(0.25,))


def _spec(**overrides):
    fields = dict(
        model_name="ConvNetW8", num_classes=3, image_shape=IMAGE_SHAPE, epochs=4, batch_size=4,
        lr=0.01, momentum=0.9, weight_decay=5e-4, dsa_families=None, test_batch_size=5,
        fuse_epochs=False, unroll_loops=True,
    )
    fields.update(overrides)
    return evaluation.EvalSpec(**fields)


def test_lr_schedule_matches_reference():
    # 1001 epochs: 0..501 at lr, 502..1000 at lr / 10 (SPEC 8).
    assert evaluation.lr_phases(1000) == [(502, 1.0), (499, 0.1)]
    assert evaluation.eval_lr(501, 1000, 0.01) == 0.01
    assert evaluation.eval_lr(502, 1000, 0.01) == pytest.approx(0.001)
    assert evaluation.eval_lr(0, 1000, 0.01) == 0.01
    assert sum(n for n, _ in evaluation.lr_phases(1000)) == 1001
    assert evaluation.lr_phases(0) == [(1, 1.0), (0, 0.1)]


def test_eval_train_step_is_torch_sgd():
    spec = _spec()
    model = models.get_model("ConvNetW8", 3, IMAGE_SHAPE)
    state = evaluation.init_eval_state(jax.random.PRNGKey(0), model, spec)
    state = state.replace(momentum=jax.tree.map(jnp.ones_like, state.params))
    images = jax.random.normal(jax.random.PRNGKey(1), (6,) + IMAGE_SHAPE)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    mask = jnp.array([True, True, True, True, False, False])
    batch = {"images": images, "labels": labels, "mask": mask}
    step = jax.jit(functools.partial(evaluation.eval_train_step, model=model, spec=spec))
    new, metrics = step(state, batch, jax.random.PRNGKey(2), 0.1)

    def loss(p):  # mean CE over the valid rows only
        logits = model.apply({"params": p}, images[:4], train=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels[:4]])

    grads = jax.jit(jax.grad(loss))(state.params)
    expected_m = jax.tree.map(lambda g, w: 0.9 * 1.0 + g + 5e-4 * w, grads, state.params)
    expected_p = jax.tree.map(lambda w, m: w - 0.1 * m, state.params, expected_m)
    chex.assert_trees_all_close(new.momentum, expected_m, atol=1e-6)
    chex.assert_trees_all_close(new.params, expected_p, atol=1e-6)
    assert int(metrics["count"]) == 4


def test_mask_is_refused_for_batchnorm_networks():
    """Padded rows would enter BatchNorm's batch statistics; without BatchNorm a mask is exact."""
    spec = dataclasses.replace(_spec(), model_name="ConvNetBN")
    model = models.get_model("ConvNetBN", 3, IMAGE_SHAPE)
    state = evaluation.init_eval_state(jax.random.PRNGKey(0), model, spec)
    batch = {"images": jnp.zeros((4,) + IMAGE_SHAPE), "labels": jnp.zeros((4,), jnp.int32),
             "mask": jnp.array([True, True, True, False])}
    with pytest.raises(ValueError, match="'mask' with ConvNetBN, a BatchNorm network"):
        evaluation.eval_train_step(state, batch, jax.random.PRNGKey(1), 0.1, model=model,
                                   spec=spec)


def test_count_correct_counts_every_test_image():
    spec = _spec(test_batch_size=4)
    model = models.get_model("ConvNetW8", 3, IMAGE_SHAPE)
    state = evaluation.init_eval_state(jax.random.PRNGKey(0), model, spec)
    test_images = jax.random.randint(jax.random.PRNGKey(3), (11,) + IMAGE_SHAPE, 0, 256
                                     ).astype(jnp.uint8)
    logits = model.apply({"params": state.params}, PREP.preprocess(test_images))
    predicted = np.asarray(jnp.argmax(logits, -1))
    # Labels equal to the predictions: 11 of 11 correct, so the padded 12th slot is not counted
    # and no tail image is dropped.
    count = jax.jit(functools.partial(evaluation.count_correct, model=model, spec=spec))
    assert int(count(state, test_images, jnp.asarray(predicted), PREP)) == 11
    wrong = (predicted + 1) % 3
    wrong[:5] = predicted[:5]
    assert int(count(state, test_images, jnp.asarray(wrong), PREP)) == 5


def _toy_problem():
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (10,) + IMAGE_SHAPE)
    labels = jnp.arange(10) % 3
    test_images = jax.random.randint(key, (7,) + IMAGE_SHAPE, 0, 256).astype(jnp.uint8)
    test_labels = jnp.arange(7) % 3
    return images, labels, test_images, test_labels


def test_fused_and_stepwise_loops_agree():
    images, labels, test_images, test_labels = _toy_problem()
    spec = _spec(dsa_families=("crop", "flip"))
    run = lambda spec: evaluation.evaluate_synthetic(
        jax.random.PRNGKey(5), images, labels, test_images, test_labels, PREP, 2, spec)
    fused = run(dataclasses.replace(spec, fuse_epochs=True, unroll_loops=False))
    stepwise = run(dataclasses.replace(spec, fuse_epochs=False))
    np.testing.assert_array_equal(fused, stepwise)


def test_progress_counts_every_network_epoch():
    images, labels, test_images, test_labels = _toy_problem()
    for fuse in (True, False):
        reported = []
        spec = _spec(epochs=2, fuse_epochs=fuse, unroll_loops=not fuse, networks_per_call=1)
        trained = evaluation.train_networks(jax.random.PRNGKey(0), images, labels, 3, spec,
                                            progress=reported.append)
        assert sum(reported) == 3 * 3, (fuse, reported)
        accuracies = evaluation.accuracy(trained, test_images, test_labels, PREP)
        assert accuracies.shape == (3,)


def test_epoch_inputs_keep_one_placement():
    # The states the epoch loop starts from (after the momentum reset) and the ones an epoch
    # returns have the same types and placement, so the jitted epoch compiles once per evaluation.
    images, labels, _, _ = _toy_problem()
    model = models.get_model("ConvNetW8", 3, IMAGE_SHAPE)
    spec = _spec(mesh=parallel.make_mesh(jax.devices()[:2]))
    on_mesh = lambda tree, partition: jax.device_put(
        tree, jax.sharding.NamedSharding(spec.mesh, partition))
    images, labels = on_mesh((images, labels), parallel.replicated)
    keys = on_mesh(jax.random.split(jax.random.PRNGKey(0), 2), parallel.split)
    states = evaluation._reset_all_momenta(evaluation._init_many(keys, model, spec), spec)
    placed = [(jax.typeof(leaf), leaf.sharding) for leaf in jax.tree.leaves(states)]
    after = evaluation._epoch_many(states, keys, 0, jnp.float32(0.01), images, labels, model,
                                   spec)
    for (kind, sharding), leaf in zip(placed, jax.tree.leaves(after)):
        assert kind == jax.typeof(leaf), (kind, jax.typeof(leaf))
        assert sharding.is_equivalent_to(leaf.sharding, leaf.ndim), (sharding, leaf.sharding)


def test_networks_are_independent_and_deterministic():
    images, labels, test_images, test_labels = _toy_problem()
    spec = _spec(epochs=2)
    run = lambda key, n: evaluation.evaluate_synthetic(
        key, images, labels, test_images, test_labels, PREP, n, spec)
    first = run(jax.random.PRNGKey(1), 3)
    np.testing.assert_array_equal(first, run(jax.random.PRNGKey(1), 3))
    # Network j depends only on fold_in(key, j): the first two of three equal a run of two.
    np.testing.assert_array_equal(first[:2], run(jax.random.PRNGKey(1), 2))
    assert first.shape == (3,) and np.all((first >= 0) & (first <= 1))
    # Side by side (vmap) or one network per call: the same accuracies.
    for per_call in (1, 2):
        one_by_one = evaluation.evaluate_synthetic(
            jax.random.PRNGKey(1), images, labels, test_images, test_labels, PREP, 3,
            dataclasses.replace(spec, networks_per_call=per_call))
        np.testing.assert_array_equal(one_by_one, first)


def test_training_learns_a_separable_problem():
    key = jax.random.PRNGKey(0)
    labels = jnp.arange(30) % 3
    # Class c is a bright c-th band of rows: trivially separable.
    base = jnp.zeros((30,) + IMAGE_SHAPE)
    images = base.at[jnp.arange(30), labels * 2, :, 0].set(3.0)
    test_labels = jnp.arange(12) % 3
    test = jnp.zeros((12,) + IMAGE_SHAPE, jnp.uint8)
    test = test.at[jnp.arange(12), test_labels * 2, :, 0].set(255)
    spec = _spec(epochs=30, lr=0.05, batch_size=8)
    accuracy = evaluation.evaluate_synthetic(key, images, labels, test, test_labels,
                                             data.Preprocessing(mean=(0.0,), std=(1 / 3,)), 2,
                                             spec)
    assert np.all(accuracy == 1.0), accuracy
