"""Tests of the validation split (data.hold_out_validation) and validation.py's best-by-validation
bookkeeping (a run with a split: tests/test_coreset.py)."""

import os

import numpy as np
import pytest

import bacon_jax
from bacon_jax import config_lib, data, validation

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _config(arg="ipc1,method=dm"):
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=1,eval.num_eval=1,num_exp=1,"
            "log_every=1,batch_real=16,checkpoint_every=1,eval.every=1,eval.intermediate=True,"
            "dataset.validation_size=3")
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), f"{arg},{tiny}")


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(_config().dataset)


def test_hold_out_is_stratified_disjoint_and_fixed_by_the_seed(digits):
    split = data.hold_out_validation(digits, 3, seed=0)
    np.testing.assert_array_equal(np.bincount(split.y_val, minlength=10), np.full(10, 3))
    assert split.num_train == digits.num_train - 30
    # Every training image lands in exactly one split: the two together are the original set.
    rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None]], 1)))
    assert rows(np.concatenate([split.x_train, split.x_val]),
                np.concatenate([split.y_train, split.y_val])) == rows(digits.x_train,
                                                                      digits.y_train)
    again = data.hold_out_validation(digits, 3, seed=0)
    np.testing.assert_array_equal(again.x_val, split.x_val)
    other = data.hold_out_validation(digits, 3, seed=1)
    assert not np.array_equal(other.x_val, split.x_val)
    assert data.hold_out_validation(digits, 0, seed=0) is digits


def test_hold_out_refuses_sizes_that_leave_a_class_empty(digits):
    smallest = int(np.bincount(digits.y_train).min())
    with pytest.raises(ValueError, match=f"leaves no training image in classes .* use at most "
                                         f"{smallest - 1}"):
        data.hold_out_validation(digits, smallest, seed=0)
    with pytest.raises(ValueError, match="validation_size must be >= 0"):
        data.hold_out_validation(digits, -1, seed=0)
    config = _config()
    config.dataset.validation_size = -2
    with pytest.raises(ValueError, match="dataset.validation_size must be >= 0"):
        config_lib.validate(config)


def _scores(validation_mean, test_mean):
    """Scores (percent) of two networks from mean accuracies given as fractions."""
    return validation.Scores(
        test={"ConvNetW8": 100 * np.array([test_mean - 0.01, test_mean + 0.01])},
        validation={"ConvNetW8": 100 * np.array([validation_mean] * 2)})


def test_best_snapshot_is_chosen_by_validation_with_ties_to_the_later(tmp_path, digits):
    config = _config()
    prep = digits.preprocessing
    labels = np.arange(10)
    sets = {it: np.full((10, 8, 8, 1), it, np.float32) for it in (1, 2, 3, 4)}
    # Validation 0.5, 0.7, 0.7, 0.6; test is best at iteration 1, and never selects.
    for it, (val, test) in zip(sets, [(0.5, 0.9), (0.7, 0.6), (0.7, 0.5), (0.6, 0.8)]):
        validation.record(str(tmp_path), it, _scores(val, test), sets[it], labels, prep, config)
    saved = validation.load_record(str(tmp_path))
    assert [e["iteration"] for e in saved["history"]] == [1, 2, 3, 4]
    assert saved["best"]["iteration"] == 3
    assert saved["best"]["test"]["ConvNetW8"]["mean"] == pytest.approx(50.0)
    best = bacon_jax.load_synthetic(str(tmp_path / validation.SET_NAME))
    np.testing.assert_array_equal(best.images, sets[3])
    # Evaluated again after a resume: the new numbers replace the old entry, also as the best.
    validation.record(str(tmp_path), 3, _scores(0.55, 0.5), sets[3], labels, prep, config)
    saved = validation.load_record(str(tmp_path))
    assert [e["iteration"] for e in saved["history"]] == [1, 2, 3, 4]
    assert saved["best"]["iteration"] == 3 and saved["best"]["validation"]["ConvNetW8"][
        "mean"] == pytest.approx(55.0)
    # Without a split nothing is recorded.
    no_split = validation.Scores(test={"ConvNetW8": np.array([0.5])}, validation={})
    assert validation.record(str(tmp_path / "none"), 1, no_split, sets[1], labels, prep,
                             config) is None
    assert not (tmp_path / "none").exists()
