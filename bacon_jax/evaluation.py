"""The field's evaluation protocol: train fresh networks on a synthetic set, test on the real test set.

SPEC 8 / A10: `epochs + 1` epochs (1001 for the reference's 1000) of minibatch SGD (lr 0.01, momentum
0.9, weight decay 5e-4, batch 256, reshuffled every epoch, the partial last batch kept), the learning
rate divided by 10 after epoch `epochs // 2 + 1` with a fresh momentum buffer, non-Siamese DSA on every
minibatch, then one pass over the full test set. The `num_eval` networks train side by side (vmap)
inside one compiled function.

The partial last batch is kept exactly: the training-set size is static, so every epoch is a scan over
the full batches plus one step on a batch of the remainder's exact size. Nothing is padded, so
BatchNorm statistics see exactly the reference's batches. `eval_train_step` still accepts a mask for
callers that pad, for networks without BatchNorm (padded rows would enter the batch statistics).
"""

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bacon_jax import augment, loops, losses, models, parallel, sgd
from bacon_jax import distill as distill_lib


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Static settings of one evaluation (hashable, bound with functools.partial)."""

    model_name: str
    num_classes: int
    image_shape: tuple
    epochs: int  # the reference's epoch_eval_train; epochs + 1 passes are run
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    dsa_families: Optional[tuple]
    test_batch_size: int
    # Loop structure only (same maths): XLA:CPU runs convolutions inside while loops ~20x slower
    # (jax-ml/jax#12868), so on CPU the epoch loop runs from Python and inner loops are unrolled.
    fuse_epochs: bool = True
    unroll_loops: bool = False
    # Networks per device trained side by side (vmap) in one call; 0 = all of them. XLA:CPU turns
    # vmapped convolutions with per-network weights into grouped convolutions, ~2x slower per
    # network than running them one after another, so on CPU each device trains one at a time.
    # Results are the same either way (network j is keyed by fold_in(key, j)).
    networks_per_call: int = 0
    # Devices the networks are split over (parallel.py); None = all devices.
    mesh: Optional[Any] = None


def spec_from_config(config, model_name, dataset_spec, mesh=None):
    """EvalSpec for `model_name` from `config.eval` and a data.DatasetSpec."""
    return EvalSpec(
        model_name=model_name,
        num_classes=dataset_spec.num_classes,
        image_shape=tuple(dataset_spec.image_shape),
        epochs=int(config.eval.epochs),
        batch_size=int(config.eval.batch_size),
        lr=float(config.eval.lr),
        momentum=float(config.eval.momentum),
        weight_decay=float(config.eval.weight_decay),
        dsa_families=tuple(config.dsa_families) if config.eval.dsa else None,
        test_batch_size=int(config.eval.test_batch_size),
        fuse_epochs=not distill_lib.unroll_loops(config),
        unroll_loops=distill_lib.unroll_loops(config),
        networks_per_call=1 if distill_lib.unroll_loops(config) else 0,
        mesh=mesh,
    )


def lr_phases(epochs):
    """[(num_epochs, lr_factor)] of the schedule: epochs 0..epochs//2+1 at 1, the rest at 0.1."""
    total = epochs + 1
    first = min(epochs // 2 + 2, total)
    return [(first, 1.0), (total - first, 0.1)]


def eval_lr(epoch, epochs, lr):
    """The learning rate used during `epoch` (0-based) of the reference schedule (SPEC 8)."""
    return lr if epoch <= epochs // 2 + 1 else lr * 0.1


@flax.struct.dataclass
class EvalState:
    """One evaluation network: parameters, BatchNorm statistics (empty if none), SGD momentum."""

    params: Any
    batch_stats: Any
    momentum: Any


def init_eval_state(key, model, spec):
    """A fresh evaluation network (the model's default init from `key`) with zero momentum."""
    variables = models.init_model(model, key, spec.image_shape)
    params = variables["params"]
    return EvalState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        momentum=sgd.init_momentum(params),
    )


def _variables(state):
    if state.batch_stats:
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def eval_train_step(state, batch, key, lr, *, model, spec):
    """One SGD step of an evaluation network on one minibatch, pure and jittable.

    Args:
        state: EvalState.
        batch: dict with 'images' [B, H, W, C] (model input space), 'labels' [B] int32 and optional
            'mask' [B] bool (valid rows; the loss is the mean over valid rows). A mask is refused
            for BatchNorm networks, whose batch statistics would include the padded rows.
        key: the minibatch's DSA key (non-Siamese: per-sample parameters, one family).
        lr: learning rate (a traced scalar, so one compiled loop covers both phases).
        model: flax Module (static).
        spec: EvalSpec (static).

    Returns:
        (new_state, metrics) with the minibatch's 'loss', 'correct' and 'count'.
    """
    images, labels = batch["images"], batch["labels"]
    mask = batch.get("mask")
    if mask is not None and state.batch_stats:
        raise ValueError(
            f"A batch 'mask' with {spec.model_name}, a BatchNorm network: the padded rows would "
            "enter its batch statistics. Pass exact-size batches instead."
        )
    if spec.dsa_families:
        images = augment.dsa(images, key, siamese=False, families=spec.dsa_families)

    def loss_fn(params):
        variables = {**_variables(state), "params": params}
        if state.batch_stats:
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits, batch_stats = model.apply(variables, images, train=True), state.batch_stats
        return losses.cross_entropy(logits, labels, mask), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, momentum = sgd.sgd_step(
        state.params, state.momentum, grads, lr, beta=spec.momentum,
        weight_decay=spec.weight_decay,
    )
    hits = jnp.argmax(logits, -1) == labels
    valid = jnp.ones_like(hits) if mask is None else mask
    metrics = {
        "loss": loss,
        "correct": jnp.sum(hits & valid).astype(jnp.int32),
        "count": jnp.sum(valid).astype(jnp.int32),
    }
    return EvalState(params=params, batch_stats=batch_stats, momentum=momentum), metrics


def _train_epoch(state, epoch_key, lr, images, labels, *, model, spec):
    """One epoch: a fresh permutation, the full batches, then the exact-size remainder batch."""
    num = images.shape[0]
    full, remainder = divmod(num, spec.batch_size)
    perm_key, dsa_key = jax.random.split(epoch_key)
    order = jax.random.permutation(perm_key, num)
    step = functools.partial(eval_train_step, model=model, spec=spec)

    def run(state, batch_index, indices):
        batch = {"images": images[indices], "labels": labels[indices]}
        state, _ = step(state, batch, jax.random.fold_in(dsa_key, batch_index), lr)
        return state

    if full:
        batches = order[: full * spec.batch_size].reshape(full, spec.batch_size)
        state, _ = loops.scan(
            lambda s, xs: (run(s, xs[0], xs[1]), None), state, (jnp.arange(full), batches),
            spec.unroll_loops,
        )
    if remainder:
        state = run(state, full, order[full * spec.batch_size:])
    return state


def count_correct(state, test_images, test_labels, preprocessing, *, model, spec):
    """Number of correct predictions on the whole test set (uint8 in, preprocessed per chunk).

    Every test image counts once (the last chunk is padded, its padding never counts). Divide by
    the number of test images for the accuracy.
    """
    num = test_images.shape[0]
    chunk = min(spec.test_batch_size, num)
    chunks = -(-num // chunk)
    pad = chunks * chunk - num
    images = jnp.concatenate([test_images, jnp.zeros((pad,) + test_images.shape[1:],
                                                     test_images.dtype)])
    labels = jnp.concatenate([test_labels, jnp.full((pad,), -1, test_labels.dtype)])
    images = images.reshape((chunks, chunk) + test_images.shape[1:])
    labels = labels.reshape(chunks, chunk)

    def count(total, xs):
        batch_images, batch_labels = xs
        logits = model.apply(_variables(state), preprocessing.preprocess(batch_images), train=False)
        return total + jnp.sum(jnp.argmax(logits, -1) == batch_labels), None

    correct, _ = loops.scan(count, jnp.zeros((), jnp.int32), (images, labels), spec.unroll_loops)
    return correct


def _reset_momentum(state):
    # A fresh optimizer at the learning-rate drop (SPEC 8, quirk 13).
    return state.replace(momentum=sgd.init_momentum(state.params))


def train_and_test(key, images, labels, test_images, test_labels, preprocessing, *, model, spec):
    """Trains one fresh network with the full schedule in one compiled loop; returns test correct.

    This is the fused form used on accelerators; `evaluate_synthetic` drives the same pieces
    epoch by epoch from Python on CPU (see EvalSpec.fuse_epochs).
    """
    init_key, train_key = jax.random.split(key)
    state = init_eval_state(init_key, model, spec)
    epoch = 0
    for num_epochs, factor in lr_phases(spec.epochs):
        if num_epochs == 0:
            continue
        state = _reset_momentum(state)
        state = jax.lax.fori_loop(
            epoch, epoch + num_epochs,
            lambda e, s, f=factor: _train_epoch(
                s, jax.random.fold_in(train_key, e), spec.lr * f, images, labels,
                model=model, spec=spec,
            ),
            state,
        )
        epoch += num_epochs
    return count_correct(state, test_images, test_labels, preprocessing, model=model, spec=spec)


def _over_nets(fn, spec, num_replicated):
    """shard_map of a per-device function whose first argument is split over the networks."""
    mesh = parallel.resolve(spec.mesh)
    return parallel.shard(
        fn, mesh, in_specs=(parallel.split,) + (parallel.replicated,) * num_replicated,
        out_specs=parallel.split,
    )


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _fused(keys, images, labels, test_images, test_labels, preprocessing, model, spec):
    def local(keys, images, labels, test_images, test_labels, preprocessing):
        return jax.vmap(
            lambda k: train_and_test(
                k, images, labels, test_images, test_labels, preprocessing, model=model, spec=spec
            )
        )(keys)

    return _over_nets(local, spec, 5)(keys, images, labels, test_images, test_labels,
                                      preprocessing)


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _init_many(keys, model, spec):
    local = lambda keys: jax.vmap(lambda k: init_eval_state(k, model, spec))(keys)
    return _over_nets(local, spec, 0)(keys)


@functools.partial(jax.jit, static_argnames=("model", "spec"), donate_argnums=0)
def _epoch_many(states, keys, epoch, lr, images, labels, model, spec):
    def local(states, keys, epoch, lr, images, labels):
        return jax.vmap(
            lambda s, k: _train_epoch(
                s, jax.random.fold_in(k, epoch), lr, images, labels, model=model, spec=spec
            )
        )(states, keys)

    mesh = parallel.resolve(spec.mesh)
    return parallel.shard(
        local, mesh, in_specs=(parallel.split, parallel.split) + (parallel.replicated,) * 4,
        out_specs=parallel.split,
    )(states, keys, epoch, lr, images, labels)


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _test_many(states, test_images, test_labels, preprocessing, model, spec):
    def local(states, test_images, test_labels, preprocessing):
        return jax.vmap(
            lambda s: count_correct(s, test_images, test_labels, preprocessing, model=model,
                                    spec=spec)
        )(states)

    return _over_nets(local, spec, 3)(states, test_images, test_labels, preprocessing)


@functools.partial(jax.jit, static_argnames=("spec",))
def _reset_all_momenta(states, spec):
    # Per device like the epochs: the fresh momenta stay split over the networks (XLA would
    # replicate the zeros), so `_epoch_many` sees one placement and compiles once.
    return _over_nets(jax.vmap(_reset_momentum), spec, 0)(states)


def _stepwise(keys, images, labels, test_images, test_labels, preprocessing, model, spec):
    """The same computation as `_fused`, with the epoch loop in Python (fast on XLA:CPU)."""
    split = jax.vmap(jax.random.split)(keys)
    states = _init_many(split[:, 0], model, spec)
    train_keys = split[:, 1]
    epoch = 0
    for num_epochs, factor in lr_phases(spec.epochs):
        if num_epochs == 0:
            continue
        states = _reset_all_momenta(states, spec)
        lr = jnp.float32(spec.lr * factor)
        for e in range(epoch, epoch + num_epochs):
            states = _epoch_many(states, train_keys, e, lr, images, labels, model, spec)
        epoch += num_epochs
    return _test_many(states, test_images, test_labels, preprocessing, model, spec)


def evaluate_synthetic(key, images, labels, test_images, test_labels, preprocessing, num_eval,
                       spec):
    """Accuracies (fractions) of `num_eval` fresh networks trained on a synthetic set.

    Args:
        key: PRNG key; network j uses fold_in(key, j) for its init, shuffles and DSA.
        images: [N, H, W, C] training images in model input space (already expanded if needed).
        labels: [N] int32.
        test_images: [M, H, W, C] uint8 test images; test_labels: [M] int32.
        preprocessing: data.Preprocessing mapping uint8 test images to model input space.
        num_eval: number of networks (trained side by side, `spec.networks_per_call` per device).
        spec: EvalSpec.

    Returns:
        numpy array [num_eval] of test accuracies in [0, 1].
    """
    model = models.get_model(spec.model_name, spec.num_classes, spec.image_shape)
    # Networks are split over just enough devices; padding networks are trained and dropped.
    spec = dataclasses.replace(spec, mesh=parallel.fitted(parallel.resolve(spec.mesh), num_eval))
    num_padded = parallel.padded(num_eval, spec.mesh)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_padded))
    # The inputs may live on the distillation's (larger) mesh; replicate them onto this one.
    on_mesh = lambda tree: jax.device_put(
        tree, jax.sharding.NamedSharding(spec.mesh, parallel.replicated))
    images, labels, test_images, test_labels, preprocessing = on_mesh(
        (images, labels, test_images, test_labels, preprocessing))
    run = _fused if spec.fuse_epochs else _stepwise
    group = spec.mesh.size * spec.networks_per_call or num_padded
    correct = []
    for start in range(0, num_padded, group):
        group_keys = jax.device_put(
            keys[start:start + group], jax.sharding.NamedSharding(spec.mesh, parallel.split))
        correct.append(parallel.gather(run(group_keys, images, labels, test_images, test_labels,
                                           preprocessing, model, spec)))
    return np.concatenate(correct)[:num_eval] / test_images.shape[0]
