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

from bacon_jax import augment, backend, data, loops, losses, models, parallel, sgd


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
    # Fused ConvNet blocks and XLA compile options, as DistillSpec (backend.py).
    fused_blocks: bool = False
    compiler_options: tuple = ()
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
        fuse_epochs=not backend.unroll_loops(config),
        unroll_loops=backend.unroll_loops(config),
        networks_per_call=1 if backend.unroll_loops(config) else 0,
        fused_blocks=backend.fused_blocks(config),
        compiler_options=backend.compiler_options(config),
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
    order = data.permutation(perm_key, num)
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


def train_network(key, images, labels, *, model, spec):
    """Trains one fresh network with the full schedule in one compiled loop; returns its EvalState.

    This is the fused form used on accelerators; `train_networks` drives the same pieces epoch by
    epoch from Python on CPU (see EvalSpec.fuse_epochs).
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
    return state


def _over_nets(fn, spec, num_replicated):
    """shard_map of a per-device function whose first argument is split over the networks."""
    mesh = parallel.resolve(spec.mesh)
    return parallel.shard(
        fn, mesh, in_specs=(parallel.split,) + (parallel.replicated,) * num_replicated,
        out_specs=parallel.split,
    )


def _map_nets(fn, *stacked):
    """`jax.vmap(fn)(*stacked)` over a device's networks, or a plain call when it holds one.

    The same maths either way. Unbatched, the DSA family choice (`lax.switch`) stays a
    conditional; vmapped over networks it becomes a select that runs all of them.
    """
    if jax.tree.leaves(stacked)[0].shape[0] != 1:
        return jax.vmap(fn)(*stacked)
    out = fn(*jax.tree.map(lambda x: x[0], stacked))
    return jax.tree.map(lambda x: x[None], out)


@backend.jit_by_spec(static_argnames=("model", "spec"))
def _fused(keys, images, labels, model, spec):
    def local(keys, images, labels):
        return _map_nets(
            lambda k: train_network(k, images, labels, model=model, spec=spec), keys)

    return _over_nets(local, spec, 2)(keys, images, labels)


@backend.jit_by_spec(static_argnames=("model", "spec"))
def _init_many(keys, model, spec):
    local = lambda keys: _map_nets(lambda k: init_eval_state(k, model, spec), keys)
    return _over_nets(local, spec, 0)(keys)


@backend.jit_by_spec(static_argnames=("model", "spec"), donate_argnums=0)
def _epoch_many(states, keys, epoch, lr, images, labels, model, spec):
    def local(states, keys, epoch, lr, images, labels):
        return _map_nets(
            lambda s, k: _train_epoch(
                s, jax.random.fold_in(k, epoch), lr, images, labels, model=model, spec=spec
            ),
            states, keys,
        )

    mesh = parallel.resolve(spec.mesh)
    return parallel.shard(
        local, mesh, in_specs=(parallel.split, parallel.split) + (parallel.replicated,) * 4,
        out_specs=parallel.split,
    )(states, keys, epoch, lr, images, labels)


@backend.jit_by_spec(static_argnames=("model", "spec"))
def _test_many(states, test_images, test_labels, preprocessing, model, spec):
    def local(states, test_images, test_labels, preprocessing):
        return _map_nets(
            lambda s: count_correct(s, test_images, test_labels, preprocessing, model=model,
                                    spec=spec),
            states,
        )

    return _over_nets(local, spec, 3)(states, test_images, test_labels, preprocessing)


@backend.jit_by_spec(static_argnames=("spec",))
def _reset_all_momenta(states, spec):
    # Per device like the epochs: the fresh momenta stay split over the networks (XLA would
    # replicate the zeros), so `_epoch_many` sees one placement and compiles once.
    return _over_nets(lambda states: _map_nets(_reset_momentum, states), spec, 0)(states)


def _stepwise(keys, images, labels, model, spec, progress=None):
    """The same training as `_fused`, with the epoch loop in Python (fast on XLA:CPU).

    `progress(epochs)` is called after every epoch with the number of epochs just run.
    """
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
            if progress is not None:
                progress(1)
        epoch += num_epochs
    return states


@dataclasses.dataclass(frozen=True)
class TrainedNetworks:
    """`num_eval` evaluation networks trained on one synthetic set (`train_networks`).

    Attributes:
        groups: the trained EvalStates, one stacked pytree per group of networks trained together
            (split over `spec.mesh`), padding networks included.
        num_eval: how many of the networks are real (the rest pad the last group).
        model: the networks' module.
        spec: the EvalSpec they were trained with (its mesh fitted to `num_eval`).
    """

    groups: tuple
    num_eval: int
    model: Any
    spec: EvalSpec


def _on_mesh(tree, mesh, partition):
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, partition))


def train_networks(key, images, labels, num_eval, spec, *, progress=None):
    """Trains `num_eval` fresh networks on a synthetic set with the protocol of SPEC 8.

    Args:
        key: PRNG key; network j uses fold_in(key, j) for its init, shuffles and DSA.
        images: [N, H, W, C] training images in model input space (already expanded if needed).
        labels: [N] int32.
        num_eval: number of networks (trained side by side, `spec.networks_per_call` per device).
        spec: EvalSpec.
        progress: optional callable, called on the host with a number of network-epochs just
            completed (they add up to `num_eval x (spec.epochs + 1)` over the call, padding
            networks excluded); for progress lines and ETAs.

    Returns:
        TrainedNetworks, to score with `accuracy`.
    """
    model = models.get_model(spec.model_name, spec.num_classes, spec.image_shape,
                             fused=spec.fused_blocks)
    # Networks are split over just enough devices; padding networks are trained and dropped.
    spec = dataclasses.replace(spec, mesh=parallel.fitted(parallel.resolve(spec.mesh), num_eval))
    num_padded = parallel.padded(num_eval, spec.mesh)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_padded))
    # The inputs may live on the distillation's (larger) mesh; replicate them onto this one.
    images, labels = _on_mesh((images, labels), spec.mesh, parallel.replicated)
    group = spec.mesh.size * spec.networks_per_call or num_padded
    groups = []
    for start in range(0, num_padded, group):
        real_in_group = max(0, min(num_eval - start, group))
        group_keys = _on_mesh(keys[start:start + group], spec.mesh, parallel.split)
        if spec.fuse_epochs:
            groups.append(_fused(group_keys, images, labels, model, spec))
            if progress is not None:
                progress(real_in_group * (spec.epochs + 1))
        else:
            report = None
            if progress is not None:
                report = lambda epochs, n=real_in_group: progress(epochs * n)
            groups.append(_stepwise(group_keys, images, labels, model, spec, report))
    return TrainedNetworks(groups=tuple(groups), num_eval=num_eval, model=model, spec=spec)


def accuracy(trained, test_images, test_labels, preprocessing):
    """Test accuracies (fractions) of trained networks: one pass over the whole set, nothing dropped.

    Args:
        trained: TrainedNetworks from `train_networks`.
        test_images: [M, H, W, C] uint8 images; test_labels: [M] int32.
        preprocessing: data.Preprocessing mapping the uint8 images to model input space.

    Returns:
        numpy array [num_eval] of accuracies in [0, 1].
    """
    mesh = trained.spec.mesh
    test_images, test_labels, preprocessing = _on_mesh(
        (test_images, test_labels, preprocessing), mesh, parallel.replicated)
    correct = [
        parallel.gather(_test_many(states, test_images, test_labels, preprocessing,
                                   trained.model, trained.spec))
        for states in trained.groups
    ]
    return np.concatenate(correct)[:trained.num_eval] / test_images.shape[0]


def evaluate_synthetic(key, images, labels, test_images, test_labels, preprocessing, num_eval,
                       spec, *, progress=None):
    """Accuracies (fractions) of `num_eval` fresh networks trained on a synthetic set.

    `train_networks` then `accuracy` on the test set (see them for the arguments).

    Returns:
        numpy array [num_eval] of test accuracies in [0, 1].
    """
    trained = train_networks(key, images, labels, num_eval, spec, progress=progress)
    return accuracy(trained, test_images, test_labels, preprocessing)
