"""Tests of experiments/gradient_similarity.py's pieces on the tiny problem of test_distill."""

import dataclasses
import importlib.util
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import distill
from tests.test_distill import MODEL, REAL, make_spec

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _script():
    """The script as a module. Its absl flags are removed again: the pieces tested need none, and
    other tests in this process define flags of the same names (experiments/evaluate.py's)."""
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(
        "gradient_similarity", os.path.join(ROOT, "experiments", "gradient_similarity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    return module


SCRIPT = _script()
SPEC = make_spec("bacon")


@pytest.fixture(scope="module")
def state():
    return distill.init_state(jax.random.PRNGKey(0), REAL, MODEL, SPEC)


def test_train_fresh_net_trains_slot_zero_only(state):
    pool = SCRIPT.train_fresh_net(state.pool, jax.random.PRNGKey(1), 3, REAL, MODEL, SPEC)
    # The meter counts every pre-update prediction of the 3 rounds, and nothing else moved.
    assert int(pool.seen[0]) == 3 * SPEC.model_train_steps * SPEC.trained_bs
    assert np.all(np.asarray(pool.seen[1:]) == 0)
    assert int(pool.size) == int(state.pool.size)
    changed = lambda a, b: bool(jnp.any(a != b))
    for new, old in zip(jax.tree.leaves(pool.params), jax.tree.leaves(state.pool.params)):
        assert changed(new[0], old[0])
        np.testing.assert_array_equal(new[1:], old[1:])


def test_term_gradients_add_up_to_the_engine_gradient(state):
    images, _ = distill.synthetic_set(state, SPEC)
    class_images = images[SPEC.ipc:2 * SPEC.ipc]
    params = jax.tree.map(lambda stack: stack[0], state.pool.params)
    key = jax.random.PRNGKey(3)
    # The spec's syn_ce does not matter: the CE term is always measured.
    match, ce = SCRIPT.term_gradients(class_images, 1, key, params, REAL, MODEL,
                                      dataclasses.replace(SPEC, syn_ce=False))
    multiplier = 7.5
    engine = distill.class_objective(class_images, jnp.int32(1), key, params,
                                     jnp.float32(multiplier), REAL, MODEL, SPEC)[0]
    np.testing.assert_allclose(match + multiplier * ce, engine, rtol=1e-4, atol=1e-7)
    without_ce = distill.class_objective(class_images, jnp.int32(1), key, params,
                                         jnp.float32(multiplier), REAL, MODEL,
                                         dataclasses.replace(SPEC, syn_ce=False))[0]
    np.testing.assert_allclose(match, without_ce, rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(ce).max()) > 0


def test_report_ratio_is_multiplier_times_ce_over_match(state, capsys):
    pool = SCRIPT.train_fresh_net(state.pool, jax.random.PRNGKey(1), 1, REAL, MODEL, SPEC)
    images, _ = distill.synthetic_set(state, SPEC)
    ratios = SCRIPT.report("x", 0, images, pool, [0, 2], REAL, MODEL, SPEC)
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [row[:2] for row in rows] == [["x", "0"], ["x", "2"]]
    multiplier = SPEC.ce_weight * 100 * int(pool.correct[0]) / int(pool.seen[0])
    for row, ratio in zip(rows, ratios):
        match_rms, ce_rms, printed_multiplier, printed_ratio = map(float, row[4:])
        assert printed_multiplier == pytest.approx(multiplier, abs=0.05)
        assert ratio == pytest.approx(multiplier * ce_rms / match_rms, rel=1e-3)
        assert printed_ratio == pytest.approx(ratio, rel=1e-2)
    # An empty meter (a net never trained) switches the CE term off.
    assert SCRIPT.report("y", 1, images, pool, [0], REAL, MODEL, SPEC) == [0.0]
