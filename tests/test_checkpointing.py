"""Tests for bacon_jax.checkpointing: checksums, falling back past damaged checkpoints, refusals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bacon_jax import checkpointing, errors

META = {"dataset": "digits", "method": "dm", "seed": 0}


def _state(step):
    # Smooth values, as images are: zstd compresses them, so a flipped byte decodes silently.
    return {"images": jnp.arange(640, dtype=jnp.float32).reshape(10, 8, 8, 1) / 7 + step,
            "step": jnp.int32(step), "key": jnp.array([0, step], jnp.uint32)}


def _manager(directory):
    return checkpointing.make_manager(str(directory))


def _saved(directory, steps=(2, 4)):
    manager = _manager(directory)
    for step in steps:
        checkpointing.save(manager, step, _state(step), META)
    return manager


def _restore(manager):
    return checkpointing.restore_latest(manager, _state(0), META, max_step=10)


def _largest_data_file(checkpoint_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(checkpoint_dir / "state")
             for name in names]
    return max(files, key=os.path.getsize)


def _assert_same(tree, want):
    for got, expected in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_save_records_the_checksum_and_keeps_three(tmp_path):
    manager = _saved(tmp_path, steps=(2, 4, 6, 8))
    assert manager.all_steps() == [4, 6, 8]
    meta = manager.restore(8, args=checkpointing.ocp.args.Composite(
        meta=checkpointing.ocp.args.JsonRestore()))["meta"]
    assert meta == {**META, "state_sha256": checkpointing.state_checksum(_state(8))}
    assert checkpointing.state_checksum(_state(8)) != checkpointing.state_checksum(_state(6))
    _assert_same(_restore(manager), _state(8))


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    manager = _saved(tmp_path)
    path = _largest_data_file(tmp_path / "4")
    damaged = bytearray(open(path, "rb").read())
    damaged[len(damaged) // 2] ^= 0x01
    open(path, "wb").write(bytes(damaged))
    manager = _manager(tmp_path)  # a new process opens the directory
    _assert_same(_restore(manager), _state(2))
    assert f"Checkpoint {tmp_path}/4 is damaged (ValueError: the state's checksum differs" \
        in caplog.text
    # Kept, not deleted, and out of the way of the step that will be saved again.
    aside = path.replace(f"{tmp_path}/4/", f"{tmp_path}/4.damaged/")
    assert open(aside, "rb").read() == bytes(damaged)
    assert manager.all_steps() == [2]
    checkpointing.save(manager, 4, _state(4), META)
    _assert_same(_restore(_manager(tmp_path)), _state(4))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_truncated_or_deleted_file_falls_back(tmp_path, caplog, damage):
    manager = _saved(tmp_path)
    path = _largest_data_file(tmp_path / "4")
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(path)
    _assert_same(_restore(_manager(tmp_path)), _state(2))
    assert f"Checkpoint {tmp_path}/4 is damaged" in caplog.text
    assert os.path.isdir(tmp_path / "4.damaged") and manager.directory.exists()


def test_no_usable_checkpoint_is_refused_and_nothing_moved(tmp_path):
    _saved(tmp_path)
    for step in (2, 4):
        os.remove(_largest_data_file(tmp_path / str(step)))
    with pytest.raises(errors.UserError, match=f"No usable checkpoint in {tmp_path} .step 4: "):
        _restore(_manager(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


def test_a_checkpoint_of_another_config_is_refused_not_skipped(tmp_path):
    manager = _saved(tmp_path)
    with pytest.raises(errors.UserError, match="seed: checkpoint 0 vs config 1"):
        checkpointing.restore_latest(manager, _state(0), {**META, "seed": 1}, max_step=10)
    with pytest.raises(errors.UserError, match="at iteration 4, past this config's iterations=3"):
        checkpointing.restore_latest(manager, _state(0), META, max_step=3)
