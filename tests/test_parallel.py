"""1 device vs N devices: same numbers (SPEC A3), padded classes never leak, resume across counts."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import checkpointing, config_lib, data, distill, evaluation, models, parallel, train

NUM_CLASSES = 3  # not a multiple of 8 (or 4): exercises the dummy-class padding


def _real(num_per_class=10):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), num_per_class).astype(np.int32)
    images = rng.integers(0, 256, (labels.size, 8, 8, 1), dtype=np.uint8)
    images[labels == 1] //= 2  # make the classes differ
    index, count = data.class_index(labels, NUM_CLASSES)
    return distill.RealData(
        images=jnp.asarray(images), labels=jnp.asarray(labels), class_index=jnp.asarray(index),
        class_count=jnp.asarray(count), preprocessing=data.Preprocessing(mean=(0.5,), std=(0.25,)),
    )


def _spec(method, mesh):
    return distill.DistillSpec(
        method=method, num_classes=NUM_CLASSES, ipc=2, image_shape=(8, 8, 1),
        model_name="ConvNetW8", lr_img=1.0 if method == "dm" else 0.2, batch_real=8,
        expand=method != "dm", dsa_families=("color", "crop", "cutout", "flip", "scale", "rotate"),
        image_update="joint" if method == "dm" else "per_class", classes_per_chunk=0,
        syn_ce=method != "dm", ce_weight=0.5, net_num=4, initial_nets=3, net_generate_interval=1,
        fetch_net_num=2, model_train_steps=2, trained_bs=16, lr_net=0.01, net_momentum=0.9,
        net_weight_decay=5e-4, meter_reset_every=2, unroll_loops=True, mesh=mesh,
    )


def _run(method, devices, steps=2):
    model = models.get_model("ConvNetW8", NUM_CLASSES, (8, 8, 1))
    spec = _spec(method, parallel.make_mesh(devices))
    real = _real()
    state = jax.jit(functools.partial(distill.init_state, model=model, spec=spec))(
        jax.random.PRNGKey(0), real)
    step = jax.jit(functools.partial(distill.distill_step, model=model, spec=spec))
    for _ in range(steps):
        state, metrics = step(state, real)
    return state, metrics


@pytest.mark.parametrize("method", ["dm", "idm", "bacon"])
def test_distill_steps_match_across_device_counts(method):
    one, metrics_one = _run(method, jax.devices()[:1])
    eight, metrics_eight = _run(method, jax.devices()[:8])
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    np.testing.assert_allclose(one.images, eight.images, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one.momentum, eight.momentum, rtol=1e-4, atol=1e-5)
    for name in metrics_one:
        np.testing.assert_allclose(metrics_one[name], metrics_eight[name], rtol=1e-4, atol=1e-5)
    if one.pool is not None:
        np.testing.assert_array_equal(one.pool.correct, eight.pool.correct)
        for a, b in zip(jax.tree.leaves(one.pool.params), jax.tree.leaves(eight.pool.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_padding_classes_do_not_leak():
    # On 8 devices 5 dummy classes are computed. Their gradients must not reach the 3 real classes,
    # and the per-class results equal those of a 1-device run where no padding exists.
    model = models.get_model("ConvNetW8", NUM_CLASSES, (8, 8, 1))
    real = _real()
    grads = {}
    for count in (1, 2, 8):
        spec = _spec("bacon", parallel.make_mesh(jax.devices()[:count]))
        state = distill.init_state(jax.random.PRNGKey(0), real, model, spec)
        params = jax.tree.map(lambda s: s[0], state.pool.params)
        grads[count], metrics = jax.jit(functools.partial(
            distill._all_class_gradients, real=real, model=model, spec=spec))(
                state.images, jax.random.PRNGKey(3), params, jnp.float32(10.0))
        assert grads[count].shape == state.images.shape
        assert metrics["loss"].shape == (NUM_CLASSES,)
    np.testing.assert_allclose(grads[1], grads[8], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], grads[2], rtol=1e-4, atol=1e-6)


def test_evaluation_matches_across_device_counts():
    real = _real()
    images = real.preprocessing.preprocess(real.images[::2])
    labels = real.labels[::2]
    results = []
    for count in (1, 8):
        spec = evaluation.EvalSpec(
            model_name="ConvNetW8", num_classes=NUM_CLASSES, image_shape=(8, 8, 1), epochs=3,
            batch_size=8, lr=0.01, momentum=0.9, weight_decay=5e-4, dsa_families=("crop",),
            test_batch_size=7, fuse_epochs=False, unroll_loops=True,
            mesh=parallel.make_mesh(jax.devices()[:count]))
        results.append(evaluation.evaluate_synthetic(
            jax.random.PRNGKey(1), images, labels, real.images, real.labels, real.preprocessing,
            3, spec))
    np.testing.assert_allclose(results[0], results[1], atol=1e-12)


def _digits_config(arg):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "digits.py")
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=1,eval.num_eval=1,num_exp=1,"
            "checkpoint_every=2,batch_real=8,net_num=4,trained_bs=16,model_train_steps=1,"
            "eval.every=2,eval.intermediate=False,net_generate_interval=2")
    return config_lib.load_config_file(path, f"{arg},{tiny}")


def test_save_on_8_devices_resume_on_1(tmp_path):
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(_digits_config("ipc1,method=bacon,iterations=4,num_devices=8"), straight)
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(_digits_config("ipc1,method=bacon,iterations=2,num_devices=8"), resumed)
    train.train_and_evaluate(_digits_config("ipc1,method=bacon,iterations=4,num_devices=1"), resumed)
    load = lambda d: np.asarray(checkpointing.load_pytree(os.path.join(d, "exp0", "synthetic"))
                                ["images"])
    np.testing.assert_allclose(load(straight), load(resumed), rtol=1e-4, atol=1e-5)
