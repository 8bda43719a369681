"""Tests of manifest.py: the config hash, the data fingerprint, the revision, the phase clock and
what manifest.json keeps across invocations."""

import json
import os
import shutil

import ml_collections
import numpy as np

from bacon_jax import config_lib, data, manifest

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def _config(arg="ipc10"):
    return config_lib.load_config_file(os.path.join(CONFIGS, "digits.py"), arg)


def test_config_hash_is_canonical_and_sees_every_field():
    assert manifest.config_hash(_config()) == manifest.config_hash(_config())
    assert manifest.config_hash(_config()) != manifest.config_hash(_config("ipc10,seed=1"))
    reordered = ml_collections.ConfigDict(dict(reversed(list(config_lib.to_dict(_config()).items()))))
    assert manifest.config_hash(reordered) == manifest.config_hash(_config())


def test_data_fingerprint_changes_with_any_image_or_label():
    dataset = data.load_dataset(_config().dataset)
    reference = manifest.data_fingerprint(dataset)
    assert len(reference) == 64 and reference == manifest.data_fingerprint(dataset)
    labels = dataset.y_train.copy()
    labels[0] = (labels[0] + 1) % 10
    images = dataset.x_train.copy()
    images[5, 3, 3, 0] ^= 1
    for changed in ({"y_train": labels}, {"x_train": images}):
        other = data.Dataset(**{**dataset.__dict__, **changed})
        assert manifest.data_fingerprint(other) != reference


def test_source_revision_of_a_checkout_and_of_a_copy(tmp_path):
    revision = manifest.source_revision()
    if revision["commit"] != "not a checkout":  # the tests run from a git checkout in CI
        assert len(revision["commit"]) == 40 and isinstance(revision["dirty"], bool)
    copy = tmp_path / "bacon_jax"
    shutil.copytree(os.path.dirname(manifest.__file__), copy)
    assert manifest.source_revision(str(copy)) == {"commit": "not a checkout"}


def test_manifest_keeps_earlier_invocations(tmp_path):
    config = _config()
    first = manifest.PhaseClock()
    first.lap("load")
    first.lap("distill", 0)
    first.lap("distill", 0)  # laps of one phase add up
    assert set(first.seconds) == {"load", "exp0"} and set(first.seconds["exp0"]) == {"distill"}
    manifest.write_manifest(str(tmp_path), config, "abc", first)
    manifest.write_manifest(str(tmp_path), config, "abc", first, finished=True)  # replaces itself
    second = manifest.PhaseClock()  # a resumed run
    written = manifest.write_manifest(str(tmp_path), config, "abc", second)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved == written
    assert [e["started"] for e in saved["invocations"]] == [first.started, second.started]
    assert saved["invocations"][0]["finished"] and saved["invocations"][1]["finished"] is None
    entry = saved["invocations"][1]
    assert set(entry["packages"]) == set(manifest.PACKAGES)
    assert entry["device_count"] >= 1 and entry["process_count"] == 1
    assert saved["config_hash"] == manifest.config_hash(config) and saved["seed"] == 0
    assert np.isfinite(saved["invocations"][0]["wall_time_s"]["exp0"]["distill"])
