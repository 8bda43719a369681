"""Tests for bacon_jax.distill: the image optimizer (SPEC 5.7, A2), the model pool and its meters
(SPEC 5.2, 5.6, quirks 2 and 18), the real-image init (SPEC 4.1, 6) and determinism (SPEC A3).

Everything runs on a tiny problem: 4 classes of 8x8x1 random uint8 images with unequal class sizes
(so real batches are padded and masked), a width-8 ConvNet, ipc 2. Compiling `distill_step` is
the expensive part on CPU, so each distinct DistillSpec is compiled once per module (`_step`).
"""

import dataclasses
import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from bacon_jax import augment, config_lib, data, distill, losses, models

NUM_CLASSES = 4
CLASS_SIZES = (10, 12, 14, 9)
IMAGE_SHAPE = (8, 8, 1)
IPC = 2
MODEL = models.ConvNet(num_classes=NUM_CLASSES, width=8)
DATASET_SPEC = data.DatasetSpec("tiny", IMAGE_SHAPE, NUM_CLASSES, (0.5,), (0.25,), None)
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
# XLA:CPU spends most of this module's time compiling `distill_step` (threefry, unrolled loops);
# LLVM's backend optimisations are worth nothing for a few dozen tiny steps and cost ~2.5x in
# compile time. Per-computation, so other test modules are unaffected.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_real(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(CLASS_SIZES)])
    rng.shuffle(labels)
    images = rng.integers(0, 256, (len(labels),) + IMAGE_SHAPE, dtype=np.uint8)
    index, count = data.class_index(labels, NUM_CLASSES)
    return distill.RealData(
        images=jnp.asarray(images),
        labels=jnp.asarray(labels, jnp.int32),
        class_index=jnp.asarray(index),
        class_count=jnp.asarray(count),
        preprocessing=data.Preprocessing(mean=(0.5,), std=(0.25,)),
    )


REAL = make_real()


@functools.lru_cache(maxsize=None)
def make_spec(method="bacon", **fields):
    """A tiny DistillSpec built the way train.py builds it (config -> spec_from_config)."""
    config = config_lib.build(
        config_lib.load_base_config(str(CONFIG_DIR / "default.py")), {}, f"method={method}"
    )
    config.ipc = IPC
    # >= every class size: spec_from_config caps it at the largest class (14), and every real batch
    # is the whole class, padded and masked for the smaller ones (SPEC 1.3).
    config.batch_real = 16
    config.dsa_families = ("color", "crop", "flip")  # DSA on, with the cheaper families
    config.net_num = 6
    config.initial_nets = 3
    config.net_generate_interval = 3
    config.fetch_net_num = 2
    config.model_train_steps = 2
    config.trained_bs = 16
    config.eval.every = 2
    spec = distill.spec_from_config(config, DATASET_SPEC, max(CLASS_SIZES))
    return dataclasses.replace(spec, **fields)


@functools.lru_cache(maxsize=None)
def _step(spec):
    return jax.jit(
        functools.partial(distill.distill_step, model=MODEL, spec=spec),
        compiler_options=FAST_COMPILE,
    )


@functools.lru_cache(maxsize=None)
def _init(spec):
    return jax.jit(
        functools.partial(distill.init_state, model=MODEL, spec=spec),
        compiler_options=FAST_COMPILE,
    )


def init_state(spec, seed=0):
    # init_state depends on the method only through the pool and the init kind, so IDM reuses
    # BACON's compiled init.
    if spec.method == "idm":
        spec = dataclasses.replace(spec, method="bacon")
    return _init(spec)(jax.random.PRNGKey(seed), REAL)


def run_steps(spec, state, n):
    metrics = []
    for _ in range(n):
        state, m = _step(spec)(state, REAL)
        metrics.append(jax.device_get(m))
    return state, metrics


@functools.lru_cache(maxsize=None)
def _init_params_fn():
    return jax.jit(
        lambda key: models.init_model(MODEL, key, IMAGE_SHAPE)["params"],
        compiler_options=FAST_COMPILE,
    )


def init_params(seed):
    return _init_params_fn()(jax.random.PRNGKey(seed))


def preprocessed_real():
    return np.asarray(REAL.take(jnp.arange(REAL.images.shape[0])))


# --------------------------------------------------------------------------------------------------
# SPEC 5.7 / A2: the vectorised per-class update equals the reference's sequential loop.
# --------------------------------------------------------------------------------------------------


def np_class_grad(x, a):
    """d/dx of loss_c(x) = sum(a * sin(x)) + sum(x^2), elementwise."""
    return a * np.cos(x) + 2.0 * x


def literal_loop(x0, coeffs, lr, iterations, rows):
    """The reference: for each class in order, one torch SGD(momentum=0.5) step on the WHOLE tensor.

    Returns, per iteration, the tensor at the start of the iteration and, for every class, the
    slice at the moment its gradient was evaluated; and the final tensor.
    """
    x = x0.astype(np.float64).copy()
    buf = np.zeros_like(x)  # torch: buf = g on the first step, the same as starting from 0
    starts, evaluated_at = [], []
    for _ in range(iterations):
        starts.append(x.copy())
        at = np.empty_like(x)
        for c in range(len(coeffs)):
            sl = slice(c * rows, (c + 1) * rows)
            at[sl] = x[sl]
            g = np.zeros_like(x)
            g[sl] = np_class_grad(x[sl], coeffs[c])
            buf = 0.5 * buf + g
            x = x - lr * buf
        evaluated_at.append(at)
    return starts, evaluated_at, x


def per_class_grads(x, coeffs, rows):
    """Class c's rows hold d loss_c / d x_c, each loss touching only its own slice."""

    def total(x):
        a = jnp.repeat(coeffs, rows, axis=0)
        return jnp.sum(a * jnp.sin(x)) + jnp.sum(jnp.square(x))

    return jax.grad(total)(x)


class ImageUpdateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(3, 4, 5)
    def test_per_class_update_equals_sequential_loop(self, num_classes):
        lr, iterations, rows = 0.2, 6, IPC
        rng = np.random.default_rng(num_classes)
        x0 = rng.normal(size=(num_classes * rows, 3, 3, 1)).astype(np.float32)
        coeffs = rng.uniform(-1.5, 1.5, (num_classes, 3, 3, 1)).astype(np.float32)
        starts, evaluated_at, final = literal_loop(x0, coeffs, lr, iterations, rows)

        update = self.variant(
            functools.partial(distill.per_class_image_update, lr=lr, steps_between=num_classes)
        )
        snapshot = self.variant(
            functools.partial(
                distill.snapshot_images, lr=lr, num_classes=num_classes, steps_between=num_classes
            )
        )
        x, buf = jnp.asarray(x0), jnp.zeros_like(x0)
        largest_correction = 0.0
        for it in range(iterations):
            # What the reference holds at the start of the iteration ...
            snap = snapshot(x, buf)
            chex.assert_trees_all_close(snap, starts[it], atol=1e-5, rtol=1e-5)
            # ... and where it evaluates each class's gradient: the positions x~.
            chex.assert_trees_all_close(x, evaluated_at[it], atol=1e-5, rtol=1e-5)
            largest_correction = max(largest_correction, float(jnp.max(jnp.abs(snap - x))))
            x, buf = update(x, buf, per_class_grads(x, coeffs, rows))
        chex.assert_shape(x, x0.shape)
        chex.assert_trees_all_close(snapshot(x, buf), final, atol=1e-5, rtol=1e-5)
        # Not vacuous: the snapshot correction is far above the tolerance.
        self.assertGreater(largest_correction, 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_joint_update_is_plain_momentum_sgd(self):
        lr, rows, num_classes = 0.7, IPC, 3
        rng = np.random.default_rng(0)
        x0 = rng.normal(size=(num_classes * rows, 3, 3, 1)).astype(np.float32)
        coeffs = rng.uniform(-1.5, 1.5, (num_classes, 3, 3, 1)).astype(np.float32)
        update = self.variant(
            functools.partial(distill.per_class_image_update, lr=lr, steps_between=1)
        )
        snapshot = self.variant(
            functools.partial(distill.snapshot_images, lr=lr, num_classes=num_classes,
                              steps_between=1)
        )
        x_ref, buf_ref = x0.astype(np.float64), np.zeros(x0.shape)
        a = np.repeat(coeffs, rows, axis=0)
        x, buf = jnp.asarray(x0), jnp.zeros_like(x0)
        for _ in range(5):
            chex.assert_trees_all_close(x, x_ref, atol=1e-5, rtol=1e-5)
            chex.assert_trees_all_equal(snapshot(x, buf), x)  # no correction for one step
            buf_ref = 0.5 * buf_ref + np_class_grad(x_ref, a)  # one step on the summed loss
            x_ref = x_ref - lr * buf_ref
            x, buf = update(x, buf, per_class_grads(x, coeffs, rows))
        chex.assert_trees_all_close(x, x_ref, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(buf, buf_ref, atol=1e-5, rtol=1e-5)

    def test_synthetic_set_is_the_snapshot(self):
        spec = make_spec("bacon")
        state, _ = run_steps(spec, init_state(spec), 2)
        images, labels = distill.synthetic_set(state, spec)
        expected = distill.snapshot_images(
            state.images, state.momentum, spec.lr_img, NUM_CLASSES, NUM_CLASSES
        )
        chex.assert_trees_all_close(images, expected, atol=1e-7)
        chex.assert_trees_all_equal(labels, state.labels)
        # The correction is really applied (momentum is non-zero after two steps).
        self.assertGreater(float(jnp.max(jnp.abs(images - state.images))), 1e-6)
        # DM's joint step has no correction.
        dm = make_spec("dm")
        dm_state, _ = run_steps(dm, init_state(dm), 1)
        chex.assert_trees_all_equal(distill.synthetic_set(dm_state, dm)[0], dm_state.images)


# --------------------------------------------------------------------------------------------------
# Real-image initialisation (SPEC 4.1, 6).
# --------------------------------------------------------------------------------------------------


def _nearest(candidates, target):
    distances = np.abs(candidates - target[None]).reshape(len(candidates), -1).max(axis=1)
    return int(np.argmin(distances)), float(np.min(distances))


def test_quadrant_init_uses_downscaled_real_images_of_the_class():
    spec = make_spec("bacon", ipc=3)
    images, labels = jax.jit(
        functools.partial(distill.init_synthetic_images, spec=spec), compiler_options=FAST_COMPILE
    )(jax.random.PRNGKey(3), REAL)
    chex.assert_shape(images, (NUM_CLASSES * 3,) + IMAGE_SHAPE)
    chex.assert_trees_all_equal(labels, jnp.repeat(jnp.arange(NUM_CLASSES, dtype=jnp.int32), 3))
    images = np.asarray(images)
    real = preprocessed_real()
    small = np.asarray(augment.downscale2x(jnp.asarray(real)))  # [N, 4, 4, 1]
    own_labels = np.asarray(REAL.labels)
    quadrants = {0: (slice(0, 4), slice(0, 4)), 1: (slice(4, 8), slice(0, 4)),
                 2: (slice(0, 4), slice(4, 8)), 3: (slice(4, 8), slice(4, 8))}
    for c in range(NUM_CLASSES):
        sources = np.zeros((4, 3), int)
        for j in range(3):
            stored = images[c * 3 + j]
            for k, (rows, cols) in quadrants.items():
                index, distance = _nearest(small, stored[rows, cols])
                assert distance < 1e-5, (c, j, k, distance)
                assert own_labels[index] == c
                sources[k, j] = index
        # Each quadrant is one draw without replacement: distinct images within a draw.
        for k in range(4):
            assert len(set(sources[k])) == 3
        # The four draws are independent (for this key no two coincide; a coincidence would have
        # probability about 1/500 per pair).
        assert len({tuple(s) for s in sources}) == 4


def test_plain_init_uses_real_images_of_the_class():
    spec = make_spec("dm", ipc=3)
    assert not spec.expand
    images, labels = jax.jit(
        functools.partial(distill.init_synthetic_images, spec=spec), compiler_options=FAST_COMPILE
    )(jax.random.PRNGKey(4), REAL)
    chex.assert_shape(images, (NUM_CLASSES * 3,) + IMAGE_SHAPE)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(NUM_CLASSES), 3))
    real = preprocessed_real()
    own_labels = np.asarray(REAL.labels)
    for c in range(NUM_CLASSES):
        chosen = []
        for j in range(3):
            index, distance = _nearest(real, np.asarray(images[c * 3 + j]))
            assert distance < 1e-6
            assert own_labels[index] == c
            chosen.append(index)
        assert len(set(chosen)) == 3  # without replacement


# --------------------------------------------------------------------------------------------------
# Model pool (SPEC 5.1, 5.2, 5.6, 5.8).
# --------------------------------------------------------------------------------------------------


def _net(pool, slot):
    return jax.tree.map(lambda stack: stack[slot], pool.params)


def test_init_pool():
    spec = make_spec("bacon")
    pool = init_state(spec).pool
    assert int(pool.size) == 3
    assert int(pool.next_slot) == 3
    chex.assert_trees_all_equal(pool.seen, jnp.zeros(6, jnp.int32))
    chex.assert_trees_all_equal(pool.correct, jnp.zeros(6, jnp.int32))
    kernels = [np.asarray(_net(pool, j)["classifier"]["kernel"]) for j in range(6)]
    for j in range(3):
        assert np.abs(kernels[j]).max() > 0
        for i in range(j):
            assert not np.allclose(kernels[i], kernels[j])  # independent inits
    for j in range(3, 6):
        chex.assert_trees_all_equal(_net(pool, j), jax.tree.map(jnp.zeros_like, _net(pool, 0)))
    chex.assert_trees_all_equal(pool.momentum, jax.tree.map(jnp.zeros_like, pool.params))
    # Each slot is a net of the right shapes.
    reference = jax.eval_shape(
        lambda k: models.init_model(MODEL, k, IMAGE_SHAPE)["params"], jax.random.PRNGKey(0)
    )
    chex.assert_trees_all_equal_shapes(_net(pool, 0), reference)


def test_add_net_fills_then_replaces_oldest_first():
    spec = make_spec("bacon")
    pool = init_state(spec).pool
    net_num = spec.net_num
    # Give every existing net a non-empty meter and non-zero momentum.
    pool = pool.replace(
        seen=jnp.full((net_num,), 10, jnp.int32),
        correct=jnp.full((net_num,), 4, jnp.int32),
        momentum=jax.tree.map(jnp.ones_like, pool.momentum),
    )
    template = _net(pool, 0)
    add = jax.jit(distill.add_net)
    marker = lambda value: jax.tree.map(lambda a: jnp.full_like(a, value), template)
    sizes, slots = [], []
    for n in range(1, 6):
        slots.append(int(pool.next_slot))
        pool = add(pool, marker(100.0 + n))
        sizes.append(int(pool.size))
    assert sizes == [4, 5, 6, 6, 6]  # saturates at net_num
    assert slots == [3, 4, 5, 0, 1]  # FIFO: after filling, the oldest slots in order
    assert int(pool.next_slot) == 2
    expected_marker = {3: 101.0, 4: 102.0, 5: 103.0, 0: 104.0, 1: 105.0}
    for slot, value in expected_marker.items():
        chex.assert_trees_all_equal(_net(pool, slot), marker(value))
        # A fresh net: zero momentum and an empty meter.
        chex.assert_trees_all_equal(
            jax.tree.map(lambda m: m[slot], pool.momentum), jax.tree.map(jnp.zeros_like, template)
        )
        assert int(pool.seen[slot]) == 0 and int(pool.correct[slot]) == 0
    # Slot 2 (the oldest survivor) is untouched.
    assert int(pool.seen[2]) == 10 and int(pool.correct[2]) == 4
    assert float(jax.tree.leaves(jax.tree.map(lambda m: m[2], pool.momentum))[0].min()) == 1.0
    assert not np.allclose(
        np.asarray(_net(pool, 2)["classifier"]["kernel"]), 105.0
    )


def test_reset_meters_and_accuracy_percent():
    spec = make_spec("bacon")
    pool = init_state(spec).pool.replace(
        seen=jnp.array([0, 64, 256, 3, 0, 0], jnp.int32),
        correct=jnp.array([0, 16, 200, 3, 0, 0], jnp.int32),
    )
    percent = [float(distill.meter_accuracy_percent(pool, j)) for j in range(4)]
    assert percent == pytest.approx([0.0, 25.0, 78.125, 100.0])
    reset = distill.reset_meters(pool)
    chex.assert_trees_all_equal(reset.seen, jnp.zeros(6, jnp.int32))
    chex.assert_trees_all_equal(reset.correct, jnp.zeros(6, jnp.int32))
    chex.assert_trees_all_equal(reset.params, pool.params)  # only the meters
    assert int(reset.size) == int(pool.size)
    for j in range(4):
        assert float(distill.meter_accuracy_percent(reset, j)) == 0.0


# --------------------------------------------------------------------------------------------------
# distill_step: pool growth, meter resets, CE multiplier (SPEC 5.2, 5.6, quirks 2 and 18).
# --------------------------------------------------------------------------------------------------


def test_pool_growth_and_meter_resets_follow_the_schedule():
    spec = make_spec("bacon")  # reset every 2 iterations, a new net every 3, 2 nets trained
    per_training = spec.model_train_steps * spec.trained_bs
    state = init_state(spec)
    # Non-empty meters before iteration 0: they must survive it (no reset at it = 0).
    state = state.replace(pool=state.pool.replace(
        seen=jnp.array([7, 9, 11, 0, 0, 0], jnp.int32),
        correct=jnp.array([1, 2, 3, 0, 0, 0], jnp.int32),
    ))
    sizes = []
    for it in range(7):
        before = jax.device_get(state.pool)
        state, metrics = _step(spec)(state, REAL)
        after = jax.device_get(state.pool)
        sizes.append(int(after.size))
        assert float(metrics["pool_size"]) == sizes[-1]

        base = np.asarray(before.seen).copy()
        if it > 0 and it % spec.meter_reset_every == 0:
            base[:] = 0
        new_slot = None
        if it % spec.net_generate_interval == 0:
            new_slot = int(before.next_slot)
            base[new_slot] = 0
        increment = np.asarray(after.seen) - base
        trained = np.flatnonzero(increment)
        assert len(trained) == spec.fetch_net_num, (it, increment)
        assert set(increment[trained].tolist()) == {per_training}, (it, increment)
        assert np.all(trained < sizes[-1])
        assert np.all(np.asarray(after.correct) <= np.asarray(after.seen))
        # Nets neither trained nor newly added keep their parameters.
        for j in range(spec.net_num):
            if j not in trained and j != new_slot:
                chex.assert_trees_all_equal(_net(after, j), _net(before, j))
        assert int(state.step) == it + 1
    # 3 nets, + 1 at it = 0 (quirk 18: generation precedes selection), + 1 at it = 3 and 6.
    assert sizes == [4, 4, 4, 5, 5, 5, 6]


def _chosen_slot(spec, state, size):
    """Identifies the matching net: the slot whose params, copied into every slot, give the same
    updated images (sampling and DSA keys do not depend on the params)."""
    actual, metrics = _step(spec)(state, REAL)
    matches = []
    for j in range(size):
        only_j = jax.tree.map(
            lambda stack: jnp.broadcast_to(stack[j], stack.shape), state.pool.params
        )
        variant, _ = _step(spec)(state.replace(pool=state.pool.replace(params=only_j)), REAL)
        if np.allclose(variant.images, actual.images, rtol=0, atol=1e-6):
            matches.append(j)
    assert len(matches) == 1, matches
    return matches[0], float(metrics["ce_multiplier"])


def test_ce_multiplier_is_ce_weight_times_chosen_nets_accuracy_percent():
    spec = make_spec("bacon", ce_weight=0.5)
    state, _ = run_steps(spec, init_state(spec), 1)  # it = 0 added slot 3; state.step == 1
    assert int(state.pool.size) == 4
    seen = jnp.array([40, 50, 64, 0, 0, 0], jnp.int32)  # slot 3, the newest net, is empty
    correct = jnp.array([10, 35, 48, 0, 0, 0], jnp.int32)  # 25 %, 70 %, 75 %
    state = state.replace(pool=state.pool.replace(seen=seen, correct=correct))
    percent = {0: 25.0, 1: 70.0, 2: 75.0, 3: 0.0}
    chosen = set()
    for seed in range(12):
        keyed = state.replace(key=jax.random.PRNGKey(100 + seed))
        slot, multiplier = _chosen_slot(spec, keyed, 4)
        assert multiplier == pytest.approx(spec.ce_weight * percent[slot], rel=1e-6), slot
        chosen.add(slot)
        if len(chosen) == 4:
            break
    assert 3 in chosen and len(chosen) >= 3, chosen  # empty meters (0) and non-empty ones seen


def test_newest_net_can_match_at_iteration_zero():
    """Quirk 18: the net added at it = 0 is in the pool before the matching net is drawn."""
    spec = make_spec("bacon", ce_weight=0.5)
    state = init_state(spec)
    state = state.replace(pool=state.pool.replace(
        seen=jnp.array([40, 50, 64, 0, 0, 0], jnp.int32),
        correct=jnp.array([10, 35, 48, 0, 0, 0], jnp.int32),
    ))
    multipliers = set()
    for seed in range(30):
        _, metrics = _step(spec)(state.replace(key=jax.random.PRNGKey(200 + seed)), REAL)
        multipliers.add(round(float(metrics["ce_multiplier"]), 4))
    # 0 only when the new (empty-meter) net is chosen; otherwise ce_weight x 25/70/75 %.
    assert multipliers <= {0.0, 12.5, 35.0, 37.5}
    assert 0.0 in multipliers and len(multipliers) >= 3


def test_ce_multiplier_is_zero_with_fresh_meters_and_for_dm():
    spec = make_spec("bacon")
    _, metrics = run_steps(spec, init_state(spec), 1)
    assert float(metrics[0]["ce_multiplier"]) == 0.0  # every meter empty at it = 0
    dm = make_spec("dm")
    _, metrics = run_steps(dm, init_state(dm), 1)
    assert float(metrics[0]["ce_multiplier"]) == 0.0
    assert "pool_size" not in metrics[0]


# --------------------------------------------------------------------------------------------------
# class_objective (SPEC 5.3-5.6).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["idm", "bacon"])
def test_class_objective_matches_direct_computation(method):
    """Without DSA, and with batch_real >= every class size, the real batch is the whole class (in
    random order, padded and masked), so the loss is a deterministic function of the inputs."""
    spec = make_spec(method, dsa_families=None)
    assert spec.batch_real >= max(CLASS_SIZES) and spec.expand and spec.syn_ce
    objective = jax.jit(
        functools.partial(distill.class_objective, real=REAL, model=MODEL, spec=spec),
        compiler_options=FAST_COMPILE,
    )
    match_fn = losses.bacon_loss if method == "bacon" else losses.mmd_loss
    real_images = preprocessed_real()
    real_labels = np.asarray(REAL.labels)
    params = init_params(5)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def direct(class_images, class_real, class_id, multiplier):
        def total(images):
            expanded, labels = augment.expand_quadrants(
                images, jnp.full((images.shape[0],), class_id)
            )
            features = MODEL.apply({"params": params}, expanded, method=MODEL.embed)
            real_features = MODEL.apply({"params": params}, class_real, method=MODEL.embed)
            logits = MODEL.apply({"params": params}, features, method=MODEL.classify)
            match = match_fn(features, real_features)
            ce = losses.cross_entropy(logits, labels)
            return match + multiplier * ce, (match, ce)

        return jax.value_and_grad(total, has_aux=True)(class_images)

    rng = np.random.default_rng(6)
    for class_id in (1, 3):  # 12 and 9 images: padded to 14 rows
        class_images = jnp.asarray(rng.normal(size=(IPC,) + IMAGE_SHAPE), jnp.float32)
        class_real = jnp.asarray(real_images[real_labels == class_id])
        results = {}
        for multiplier in (0.0, 1.0, 37.5):
            grad, metrics = objective(
                class_images, jnp.int32(class_id), jax.random.PRNGKey(7), params,
                jnp.float32(multiplier),
            )
            (loss, (match, ce)), expected_grad = direct(
                class_images, class_real, class_id, multiplier
            )
            chex.assert_shape(grad, class_images.shape)
            np.testing.assert_allclose(metrics["match_loss"], match, rtol=1e-4)
            np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-4)
            np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4)
            np.testing.assert_allclose(grad, expected_grad, rtol=1e-3, atol=1e-5)
            results[multiplier] = grad
        # The CE term really is weighted by the multiplier.
        assert not np.allclose(results[0.0], results[37.5], atol=1e-4)


def test_class_objective_without_synthetic_ce_ignores_the_multiplier():
    spec = make_spec("dm", dsa_families=None)
    assert not spec.syn_ce
    objective = jax.jit(
        functools.partial(distill.class_objective, real=REAL, model=MODEL, spec=spec),
        compiler_options=FAST_COMPILE,
    )
    params = init_params(8)
    images = jnp.asarray(np.random.default_rng(9).normal(size=(IPC,) + IMAGE_SHAPE), jnp.float32)
    outputs = [
        objective(images, jnp.int32(3), jax.random.PRNGKey(1), params, jnp.float32(m))
        for m in (0.0, 50.0)
    ]
    chex.assert_trees_all_equal(outputs[0], outputs[1])
    assert float(outputs[0][1]["ce_loss"]) == 0.0
    # DM: MMD of the un-expanded images against the whole class.
    class_real = preprocessed_real()[np.asarray(REAL.labels) == 3]  # 9 images, padded
    embed = lambda x: MODEL.apply({"params": params}, x, method=MODEL.embed)
    expected = jax.jit(lambda a, b: losses.mmd_loss(embed(a), embed(b)))(images, class_real)
    np.testing.assert_allclose(outputs[0][1]["match_loss"], expected, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Determinism (SPEC A3) and chunking.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dm", "idm", "bacon"])
def test_steps_are_a_function_of_the_key(method):
    spec = make_spec(method)
    start = init_state(spec, seed=0)
    first, _ = run_steps(spec, start, 3)
    again, _ = run_steps(spec, start, 3)
    chex.assert_trees_all_equal(first, again)
    assert int(first.step) == 3
    chex.assert_tree_all_finite(first.images)
    # The images moved.
    assert not np.allclose(first.images, start.images)
    # Another distillation key (same initial images): another trajectory.
    other, _ = run_steps(spec, start.replace(key=jax.random.PRNGKey(12345)), 3)
    assert not np.allclose(other.images, first.images)
    # Another experiment seed: another initialisation.
    assert not np.allclose(init_state(spec, seed=1).images, start.images)


def test_initial_state_has_the_type_of_a_step_output():
    # Same shapes, dtypes and placement (mesh and partition in the type): a jitted distill_step
    # fed init_state's output compiles once, not again for the state it returns.
    spec = make_spec("bacon")
    start = init_state(spec)
    after, _ = run_steps(spec, start, 1)
    for before, stepped in zip(jax.tree.leaves(start), jax.tree.leaves(after)):
        assert jax.typeof(before) == jax.typeof(stepped), (jax.typeof(before), jax.typeof(stepped))
        assert before.sharding.is_equivalent_to(stepped.sharding, before.ndim)


def test_idm_and_bacon_differ_only_by_the_loss():
    idm, bacon = make_spec("idm"), make_spec("bacon")
    assert dataclasses.replace(idm, method="bacon") == bacon
    start = init_state(bacon)
    a, _ = run_steps(idm, start, 1)
    b, _ = run_steps(bacon, start, 1)
    assert not np.allclose(a.images, b.images)
    # Same net choices and pool training: the pools are identical.
    chex.assert_trees_all_equal(a.pool, b.pool)


@pytest.mark.parametrize("method", ["dm", "bacon"])
def test_result_does_not_depend_on_classes_per_chunk(method):
    # Also a second, independent compilation of the step: randomness drawn at trace time (numpy,
    # python or clock seeds, SPEC A3) would make the two programs disagree.
    start = init_state(make_spec(method))
    results = []
    for chunk in (0, 1):
        spec = make_spec(method, classes_per_chunk=chunk)
        state, metrics = run_steps(spec, start, 2)
        results.append((state.images, state.momentum, metrics))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_result_does_not_depend_on_the_cpu_loop_structure():
    # Unrolled inner loops with the pool nets trained one after another (the CPU form at real
    # batch sizes) vs scans with vmapped nets (the accelerator form). Same maths, same result.
    start = init_state(make_spec("bacon"))
    results = []
    for cpu_form in (True, False):
        spec = make_spec("bacon", unroll_loops=cpu_form, pool_nets_one_by_one=cpu_form)
        state, metrics = run_steps(spec, start, 2)
        results.append((state.images, state.pool.params, state.pool.correct, metrics))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field, value, allowed", [
    ("method", "BACON", "random, dm, idm, bacon"),  # would otherwise run as DM without a word
    ("image_update", "per-class", "per_class, joint"),
])
def test_spec_refuses_unknown_method_and_image_update(field, value, allowed):
    with pytest.raises(ValueError, match=f"Unknown {field} '{value}'; allowed: {allowed}"):
        dataclasses.replace(make_spec("bacon"), **{field: value})


def test_random_has_no_distillation_step():
    """A `method=random` spec would otherwise be optimised as DM (no pool, the mmd loss)."""
    spec = make_spec("random")
    state = jax.eval_shape(functools.partial(distill.init_state, model=MODEL, spec=spec),
                           jax.random.PRNGKey(0), REAL)
    with pytest.raises(ValueError, match="method 'random' has no distillation step"):
        jax.eval_shape(functools.partial(distill.distill_step, model=MODEL, spec=spec), state,
                       REAL)


def test_host_dataset_where_real_data_is_expected_is_refused():
    """Without the check a host data.Dataset fails deep inside (AttributeError) or in jit's pytree
    flattening; the error must name the type and the conversion."""
    spec = make_spec("bacon")
    dataset = data.Dataset(DATASET_SPEC, np.zeros((4,) + IMAGE_SHAPE, np.uint8),
                           np.arange(4, dtype=np.int32), np.zeros((4,) + IMAGE_SHAPE, np.uint8),
                           np.arange(4, dtype=np.int32))
    state = jax.eval_shape(functools.partial(distill.init_state, model=MODEL, spec=spec),
                           jax.random.PRNGKey(0), REAL)
    hint = r"got Dataset\. Convert a data\.Dataset with distill\.real_data_from_dataset"
    with pytest.raises(TypeError, match=hint):
        distill.init_state(jax.random.PRNGKey(0), dataset, MODEL, spec)
    with pytest.raises(TypeError, match=hint):
        distill.distill_step(state, dataset, model=MODEL, spec=spec)
    with pytest.raises(TypeError, match=hint):
        distill.train_pool(state.pool, jax.random.PRNGKey(0), dataset, MODEL, spec)
    with pytest.raises(TypeError, match=r"real must be distill\.RealData, got dict\.$"):
        distill.class_objective(jnp.zeros((IPC,) + IMAGE_SHAPE), 0, jax.random.PRNGKey(0), None, 0.0,
                                {"images": None}, MODEL, spec)
