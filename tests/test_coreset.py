"""Tests of coreset.py (herding and k-center on hand-made features) and of one coreset run on digits
with a validation split: the selection, the val-selected report, the exports and the manifest."""

import json
import os

import numpy as np
import pytest

from bacon_jax import checkpointing, config_lib, coreset, data, export, manifest, train, validation

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def test_herding_picks_the_points_that_keep_the_running_mean_on_the_class_mean():
    # Class mean (1, 0). Pick 1: point 2 sits on it. Pick 2: with (1, 0) picked, the running
    # means are (2, 0), (0.5, 0.25), (1, -0.25), (0.5, 0) for points 0, 1, 3, 4: point 3 is
    # nearest (0.25). Pick 3: (5/3, -1/6), (2/3, 0), (2/3, -1/6) for points 0, 1, 4: point 1.
    features = np.array([[3.0, 0.0], [0.0, 0.5], [1.0, 0.0], [1.0, -0.5], [0.0, 0.0]])
    assert coreset.herding(features, 3).tolist() == [2, 3, 1]


def test_k_center_starts_nearest_the_mean_and_takes_the_farthest_points():
    # Mean 1.6: nearest is 1.0 (point 1). Farthest from it: 10 (point 3). Farthest from its
    # nearest of {1, 10}: -6 (point 4, at 7). Then 2.5 (at 1.5) before 0.5 (at 0.5).
    features = np.array([[0.5], [1.0], [2.5], [10.0], [-6.0]])
    assert coreset.k_center(features, 4).tolist() == [1, 3, 4, 2]


def test_selectors_are_deterministic_and_break_ties_by_index():
    duplicates = np.ones((4, 3))  # every point is the mean and every distance 0
    assert coreset.herding(duplicates, 3).tolist() == [0, 1, 2]
    assert coreset.k_center(duplicates, 3).tolist() == [0, 1, 2]
    features = np.random.RandomState(0).randn(50, 8)
    for select in (coreset.herding, coreset.k_center):
        np.testing.assert_array_equal(select(features, 10), select(features, 10))
        assert len(set(select(features, 10).tolist())) == 10


def _config(arg):
    tiny = ("model=ConvNetW8,eval.models=ConvNetW8,eval.epochs=2,eval.num_eval=2,num_exp=1,"
            "coreset.epochs=1,dataset.validation_size=3")
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), f"{arg},{tiny}")


def test_kcenter_run_with_a_validation_split(tmp_path):
    config = _config("ipc1,method=kcenter")
    results = train.train_and_evaluate(config, str(tmp_path))
    exp_dir = tmp_path / "exp0"
    selection = json.loads((exp_dir / coreset.SELECTION_NAME).read_text())
    dataset = data.hold_out_validation(data.load_dataset(config.dataset), 3, config.seed)
    indices = np.asarray(selection["train_indices"])
    np.testing.assert_array_equal(dataset.y_train[indices], np.arange(10))  # class-major
    saved = checkpointing.load_pytree(str(exp_dir / "synthetic"))
    np.testing.assert_allclose(np.asarray(saved["images"]),
                               dataset.preprocessing.preprocess(dataset.x_train[indices]),
                               atol=1e-6)
    assert len(selection["feature_test_accuracy_per_epoch"]) == 1
    # Reported: the final set's accuracies, and (one evaluation point here) the same as selected.
    assert results["results"]["ConvNetW8"]["num_runs"] == 2
    assert results["validation_selected"]["iterations"] == [0]
    assert results["validation_selected"]["results"]["ConvNetW8"]["accuracies"] == pytest.approx(
        results["results"]["ConvNetW8"]["accuracies"])
    record = validation.load_record(str(exp_dir))
    assert record["validation_size"] == 3 and len(record["history"]) == 1
    # What a finished run holds for other code: exports and the manifest.
    card = json.loads((exp_dir / export.CARD_NAME).read_text())
    assert card["method"] == "kcenter" and card["expansion_factor"] == 1
    assert card["config_hash"] == manifest.config_hash(config)
    assert sorted(os.listdir(exp_dir / export.FOLDER_NAME)) == [f"{c:03d}" for c in range(10)]
    run_manifest = json.loads((tmp_path / manifest.MANIFEST_NAME).read_text())
    (invocation,) = run_manifest["invocations"]
    assert invocation["finished"] is not None
    assert set(invocation["wall_time_s"]["exp0"]) == {"init", "distill", "export", "evaluate"}
    assert run_manifest["train_data_sha256"] == manifest.data_fingerprint(
        data.load_dataset(config.dataset))
    # The split is part of what a rerun must agree on.
    other = _config("ipc1,method=kcenter")
    other.dataset.validation_size = 0
    with pytest.raises(ValueError, match="dataset.validation_size: run 3, this config 0"):
        train.train_and_evaluate(other, str(tmp_path))
