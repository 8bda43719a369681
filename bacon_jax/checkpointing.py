"""Orbax checkpoints of the distillation state: verified on restore, refused for another config.

Each checkpoint holds two items: `state` (the DistillState pytree, StandardSave) and `meta` (JSON: the
fields that fix the state's shapes and meaning, and `state_sha256`, a checksum of the state's bytes).
Orbax writes atomically (a temporary directory renamed on completion), so an interrupted save never
leaves a checkpoint that restores half-written. Damage after the write is another matter: a flipped
bit restores silently as other numbers, a truncated or deleted file as an error. `restore_latest`
recomputes the checksum, and on a mismatch or any error reading a checkpoint it warns and falls back
to the previous one. The newest `MAX_TO_KEEP` (3) checkpoints are kept, so there is one to fall back
to; a damaged checkpoint is moved aside (`<step>.damaged`), never deleted.
"""

import contextlib
import gc
import hashlib
import os
import sys

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from bacon_jax import errors, parallel

MAX_TO_KEEP = 3
DAMAGED_SUFFIX = ".damaged"
_CHECKSUM_KEY = "state_sha256"


def state_metadata(config, dataset_spec):
    """The fields a checkpoint must agree on to be resumed by `config`."""
    return {
        "dataset": config.dataset.name,
        "image_shape": list(dataset_spec.image_shape),
        "num_classes": int(dataset_spec.num_classes),
        "method": config.method,
        "ipc": int(config.ipc),
        "model": config.model,
        "expand": bool(config.expand),
        "net_num": int(config.net_num),
        "seed": int(config.seed),
        "validation_size": int(config.dataset.get("validation_size", 0)),
    }


# Fields added to `state_metadata` after checkpoints were first written, with the value a
# checkpoint without them was written under (so those still resume).
_ADDED_LATER = {"validation_size": 0}


def make_manager(directory, max_to_keep=MAX_TO_KEEP):
    """A CheckpointManager over `directory` (created if missing) with `state` and `meta` items."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"),
    )


def state_checksum(state):
    """sha256 (hex) over the dtype, shape and bytes of every leaf of `state`, in tree order.

    Computed on the host from each leaf's global value: a leaf spread over several processes is
    gathered (a collective; every process saves and restores, so every process calls this).
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            value = parallel.gather(leaf)
        else:
            value = jax.device_get(leaf)
        value = np.ascontiguousarray(value)
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save(manager, step, state, metadata):
    """Saves `state` at `step` with its checksum (blocking until written: a crash loses nothing)."""
    meta = dict(metadata, **{_CHECKSUM_KEY: state_checksum(state)})
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def _step_path(manager, step):
    return os.path.join(str(manager.directory), str(step))


def _read_meta(manager, step):
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_same_config(saved, metadata, path):
    saved = {key: saved.get(key, _ADDED_LATER.get(key)) for key in metadata}
    mismatched = {
        key: (saved[key], value) for key, value in metadata.items() if saved[key] != value
    }
    if mismatched:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
        raise errors.UserError(
            f"Checkpoint {path} was written by a different config ({details}). Use a new "
            f"--workdir or the config that wrote it."
        )


def check_resumable(manager, metadata, max_step):
    """Checks that `manager`'s checkpoints can be resumed by a config; returns the latest step.

    Reads only the small `meta` items: the latest readable one must agree with `metadata` (a damaged
    one is left to `restore_latest`, which says so and falls back).

    Args:
        manager: from `make_manager`.
        metadata: `state_metadata` of the current config.
        max_step: the config's iteration count; a checkpoint beyond it belongs to a longer run.

    Returns:
        The latest step, or None when the directory holds no checkpoint.

    Raises:
        errors.UserError: the checkpoint was written by a config with different shapes or
            semantics, or is past `max_step`.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    if steps[0] > max_step:
        raise errors.UserError(
            f"Checkpoint at {manager.directory} is at iteration {steps[0]}, past this config's "
            f"iterations={max_step}. Use iterations >= {steps[0]} to resume it, or a new --workdir."
        )
    for step in steps:
        try:
            saved = _read_meta(manager, step)
        except Exception:  # pylint: disable=broad-except  # damaged: restore_latest reports it
            continue
        _check_same_config(saved, metadata, _step_path(manager, step))
        break
    return steps[0]


def _describe(error):
    """A one-line reason from an exception (TensorStore's messages run over dozens of lines)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def _restore_verified(manager, step, abstract_state, metadata):
    """The state of checkpoint `step`; raises if it cannot be read or its checksum differs."""
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    _check_same_config(restored["meta"], metadata, _step_path(manager, step))
    expected = restored["meta"].get(_CHECKSUM_KEY)
    if expected is None:
        logging.info("Checkpoint %s predates state checksums: restored unverified.",
                     _step_path(manager, step))
    elif state_checksum(restored["state"]) != expected:
        raise ValueError("the state's checksum differs from the one recorded when it was saved")
    return restored["state"]


@contextlib.contextmanager
def _unraisable_dropped():
    """Drops "Exception ignored in <coroutine ...>" reports of the block's garbage.

    When Orbax fails to read a damaged file it leaves the reads of the other arrays unawaited;
    Python reports each as it is collected, with a TensorStore spec of ~60 lines. The warning of
    `restore_latest` already says which checkpoint is damaged and why.
    """
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()  # the abandoned reads are collected here, not after the hook is back
        sys.unraisablehook = previous


def _move_aside(manager, steps):
    """Renames damaged step directories to `<step>.damaged[.n]`; Orbax then no longer lists them."""
    if jax.process_index() == 0:
        for step in steps:
            path = _step_path(manager, step)
            target, count = path + DAMAGED_SUFFIX, 1
            while os.path.exists(target):
                target, count = f"{path}{DAMAGED_SUFFIX}.{count}", count + 1
            os.rename(path, target)
            logging.warning("Kept the damaged checkpoint as %s (not deleted).", target)
    parallel.barrier("bacon_jax: damaged checkpoints moved aside")
    manager.reload()


def _newest_intact(manager, abstract_state, metadata):
    """(step, state, damaged) of the newest checkpoint that restores and verifies.

    step and state are None when none does; damaged lists (step, reason) of the newer ones.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, _restore_verified(manager, step, abstract_state, metadata), damaged
        except errors.UserError:
            raise
        except Exception as error:  # pylint: disable=broad-except  # any damage: try the previous
            reason = _describe(error)
            logging.warning("Checkpoint %s is damaged (%s); trying the one before it.",
                            _step_path(manager, step), reason)
            damaged.append((step, reason))
    return None, None, damaged


def restore_latest(manager, template_state, metadata, max_step):
    """Restores the newest intact checkpoint into the structure of `template_state`, or returns None.

    A checkpoint that cannot be read or whose state does not match its recorded checksum is
    reported with a warning and moved aside (see the module docstring); the one before it is tried.

    Args:
        manager: from `make_manager`.
        template_state: a state (or jax.eval_shape of one) with the expected structure and shapes.
        metadata: `state_metadata` of the current config.
        max_step: the config's iteration count (see `check_resumable`).

    Returns:
        The restored state, or None when the directory holds no checkpoint.

    Raises:
        errors.UserError: see `check_resumable`; or every checkpoint is damaged.
    """
    check_resumable(manager, metadata, max_step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
    with _unraisable_dropped():
        step, state, damaged = _newest_intact(manager, abstract, metadata)
    if damaged and step is None:
        details = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
        raise errors.UserError(
            f"No usable checkpoint in {manager.directory} ({details}). Nothing was changed: "
            f"restore the directory from a backup, or move it aside to start this experiment over."
        )
    if damaged:
        _move_aside(manager, [s for s, _ in damaged])
        logging.warning("Resuming from checkpoint %s instead.", _step_path(manager, step))
    return state


def save_pytree(path, tree):
    """Writes a standalone pytree (e.g. the final synthetic set) with Orbax, replacing any old one."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()


def load_pytree(path):
    """Reads a pytree written by `save_pytree`."""
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))
