"""Device parallelism: one code path for 1 or N devices, `jax.shard_map` under `jax.jit`.

JAX recommends `shard_map` (since 0.10 `pmap` is implemented on top of it and is in maintenance
mode), so the step functions are written per device with named-axis collectives over `AXIS` and
mapped over a 1-D mesh of every device:

- distillation: classes (their synthetic images, keys and real-data lookups) are split across
  devices, padded with dummy classes when C is not a multiple of the device count; the dummies'
  results are dropped. The model pool is replicated; its training is data-parallel (each device
  takes its slice of one globally drawn batch, gradients are averaged with `pmean`).
- evaluation: the `num_eval` networks are split across devices (padded, extras dropped), each
  device training its networks side by side with vmap. This keeps BatchNorm statistics exact.

Every random draw is keyed by global indices (class id, network id, iteration), so results do not
depend on the device count (SPEC A3). The canonical DistillState is unpadded and unsharded, so a
checkpoint written on 8 devices resumes on 1 or 4.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXIS = "devices"


def make_mesh(devices=None):
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def resolve(mesh: Optional[Mesh]):
    """`mesh`, or the mesh over all devices when None."""
    return make_mesh() if mesh is None else mesh


def replicate(tree, mesh):
    """`tree` placed whole on every device of `mesh` (None: all devices), inside or outside jit.

    This is the placement `distill_step`'s outputs have (it ends in a shard_map with replicated
    outputs), so a state built this way and the state a step returns have the same type and a
    jitted step compiles once, not again at its second call.
    """
    return jax.lax.with_sharding_constraint(
        tree, jax.sharding.NamedSharding(resolve(mesh), replicated))


def padded(count, mesh):
    """`count` rounded up to a multiple of the mesh size."""
    size = mesh.size
    return -(-count // size) * size


def fitted(mesh, count):
    """The fewest leading devices of `mesh` that keep the per-device load of splitting `count`.

    Splitting 5 networks over 8 devices puts at most one on each, which 5 devices do as fast with
    nothing padded; 10 classes over 8 devices need 2 per device, which 5 devices also give.
    """
    per_device = -(-count // mesh.size)
    needed = -(-count // per_device)
    # Across processes the inputs live on the whole mesh; a sub-mesh would need cross-host
    # resharding, which multi-controller JAX only supports between equal device sets.
    if needed == mesh.size or jax.process_count() > 1:
        return mesh
    return Mesh(np.asarray(mesh.devices.reshape(-1)[:needed]), (AXIS,))


def gather(x):
    """A (possibly multi-process) global array as a host numpy array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name):
    """Waits until every process has reached the barrier `name` (nothing to wait for with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(name)


def shard(fn, mesh, in_specs, out_specs):
    """`jax.shard_map(fn)` over `mesh`; specs use `split` (leading axis over AXIS) or `replicated`."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


split = PartitionSpec(AXIS)
replicated = PartitionSpec()


def local_slice(x, total):
    """This device's contiguous share of the leading axis of a replicated array of size `total`."""
    size = jax.lax.axis_size(AXIS)
    if total % size:
        raise ValueError(f"{total} does not split evenly over {size} devices.")
    per = total // size
    start = jax.lax.axis_index(AXIS) * per
    return jax.lax.dynamic_slice_in_dim(x, start, per, axis=0)
