"""Orbax checkpoints of the distillation state, refusing those written by another config.

Each checkpoint holds two items: `state` (the DistillState pytree, StandardSave) and `meta` (JSON: the
fields that fix the state's shapes and meaning). Orbax writes atomically (a temporary directory renamed
on completion), so an interrupted save never leaves a checkpoint that restores half-written.
"""

import os

import jax
import orbax.checkpoint as ocp


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


def make_manager(directory, max_to_keep=2):
    """A CheckpointManager over `directory` (created if missing) with `state` and `meta` items."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"),
    )


def save(manager, step, state, metadata):
    """Saves `state` at `step` (blocking until written, so a crash right after loses nothing)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)
        ),
        force=True,
    )
    manager.wait_until_finished()


def check_resumable(manager, metadata, max_step):
    """Checks that `manager`'s latest checkpoint can be resumed by a config; returns its step.

    Args:
        manager: from `make_manager`.
        metadata: `state_metadata` of the current config.
        max_step: the config's iteration count; a checkpoint beyond it belongs to a longer run.

    Returns:
        The latest step, or None when the directory holds no checkpoint.

    Raises:
        ValueError: the checkpoint was written by a config with different shapes or semantics, or
            is past `max_step`.
    """
    step = manager.latest_step()
    if step is None:
        return None
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    mismatched = {
        key: (saved.get(key, _ADDED_LATER.get(key)), value) for key, value in metadata.items()
        if saved.get(key, _ADDED_LATER.get(key)) != value
    }
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"Checkpoint at {manager.directory} (step {step}) was written by a different config "
            f"({details}). Use a new --workdir or the config that wrote it."
        )
    if step > max_step:
        raise ValueError(
            f"Checkpoint at {manager.directory} is at iteration {step}, past this config's "
            f"iterations={max_step}. Use iterations >= {step} to resume it, or a new --workdir."
        )
    return step


def restore_latest(manager, template_state, metadata, max_step):
    """Restores the latest checkpoint into the structure of `template_state`, or returns None.

    Args:
        manager: from `make_manager`.
        template_state: a state (or jax.eval_shape of one) with the expected structure and shapes.
        metadata: `state_metadata` of the current config.
        max_step: the config's iteration count (see `check_resumable`).

    Returns:
        The restored state, or None when the directory holds no checkpoint.

    Raises:
        ValueError: see `check_resumable`.
    """
    step = check_resumable(manager, metadata, max_step)
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored["state"]


def save_pytree(path, tree):
    """Writes a standalone pytree (e.g. the final synthetic set) with Orbax, replacing any old one."""
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()


def load_pytree(path):
    """Reads a pytree written by `save_pytree`."""
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))
