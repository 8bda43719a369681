"""The distillation engine: one pure `distill_step` for DM, IDM and BACON.

The methods differ only by options of one engine (SPEC 5, 6):

| method | network per iteration             | expansion | matching loss | synthetic CE | image update |
|--------|-----------------------------------|-----------|---------------|--------------|--------------|
| dm     | a fresh random ConvNet            | no        | mmd           | no           | joint        |
| idm    | one net drawn from the model pool | x4        | mmd           | yes          | per class    |
| bacon  | one net drawn from the model pool | x4        | bacon         | yes          | per class    |

Every class's gradient is computed in one batched pass (vmap over classes, chunked with
`classes_per_chunk` for memory). The reference instead steps the image optimizer
once per class with one momentum buffer; `per_class_image_update` applies the exactly equivalent
per-class momentum SGD to the "evaluation-time" positions and `snapshot_images` recovers the tensor
the reference would hold at the start of an iteration (SPEC 5.7, A2).

Randomness: the state carries the experiment's distillation key; iteration `it` uses
`fold_in(key, it)`, then per-purpose and per-class keys by `fold_in` (SPEC A3).
"""

import dataclasses
import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from bacon_jax import augment, backend, config_lib, data, loops, losses, models, parallel, sgd

# fold_in tags of the per-iteration key, one per purpose.
_NEW_NET, _PICK_NET, _CLASSES, _POOL_PICK, _POOL_TRAIN, _FRESH_NET, _TEACHER = range(7)


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """Static (hashable) settings of the engine, derived from the config by `spec_from_config`."""

    method: str
    num_classes: int
    ipc: int
    image_shape: tuple
    model_name: str
    lr_img: float
    batch_real: int
    expand: bool
    dsa_families: Optional[tuple]
    image_update: str
    classes_per_chunk: int
    syn_ce: bool
    ce_weight: float
    net_num: int
    initial_nets: int
    net_generate_interval: int
    fetch_net_num: int
    model_train_steps: int
    trained_bs: int
    lr_net: float
    net_momentum: float
    net_weight_decay: float
    meter_reset_every: int
    # Unroll the short inner loops (pool-training steps, class chunks). XLA:CPU runs convolutions
    # inside while-loop bodies ~20x slower than outside (jax-ml/jax#12868); accelerators do not
    # need it. The maths is the same either way.
    unroll_loops: bool = False
    # Train the fetched pool nets one after another (unrolled) instead of vmapped. XLA:CPU runs
    # convolutions vmapped over per-net weights as grouped convolutions, ~2x slower per net at
    # real batch sizes; for tiny batches the vmapped form compiles faster. Same maths either way.
    pool_nets_one_by_one: bool = False
    # Build the ConvNet's instance-norm blocks from fused.py (same parameters and maths; faster
    # on XLA:CPU) and jit with these XLA compile options (backend.py).
    fused_blocks: bool = False
    compiler_options: tuple = ()
    # Devices the step is mapped over (parallel.py); None = all devices.
    mesh: Optional[Any] = None
    # CMI regularizer weight (SPEC 7, A8); 0 = off. Needs a teacher passed to distill_step.
    cmi_weight: float = 0.0

    def __post_init__(self):
        # A misspelt method would otherwise run as DM (no pool, the mmd loss) without a word.
        config_lib.choose("method", self.method, config_lib.METHODS)
        config_lib.choose("image_update", self.image_update, config_lib.IMAGE_UPDATES)
        if self.batch_real < 1:
            raise ValueError(f"batch_real must be >= 1, got {self.batch_real}.")

    @property
    def uses_pool(self):
        return self.method in ("idm", "bacon")

    @property
    def matching_loss(self):
        return "bacon" if self.method == "bacon" else "mmd"

    @property
    def steps_between_class_updates(self):
        """K of SPEC 5.7: optimizer steps between two steps of one class (1 for a joint step)."""
        return self.num_classes if self.image_update == "per_class" else 1


def spec_from_config(config, dataset_spec, max_class_size, mesh=None):
    """Builds the static engine settings from a config and a data.DatasetSpec.

    Args:
        config: a ConfigDict as the config files build it (see configs/default.py).
        dataset_spec: the dataset's `data.DatasetSpec` (classes, image shape).
        max_class_size: training images in the largest class (`data.Dataset.max_class_size`).
            The reference's real batch is the whole class when the class is smaller than
            `config.batch_real` (SPEC 1.3), so `spec.batch_real` is the smaller of the two.
        mesh: devices the step is mapped over (`parallel.make_mesh`); None = all devices.

    Returns:
        A `DistillSpec`. A ValueError names an unknown method or image update, or a `method`
        changed after the config was built (`config_lib.check_method_defaults`).
    """
    config_lib.check_method_defaults(config)
    return DistillSpec(
        method=config.method,
        num_classes=dataset_spec.num_classes,
        ipc=config.ipc,
        image_shape=tuple(dataset_spec.image_shape),
        model_name=config.model,
        lr_img=float(config.lr_img),
        # get_images(c, n) returns the whole class when n >= its size (SPEC 1.3).
        batch_real=min(int(config.batch_real), int(max_class_size)),
        expand=bool(config.expand),
        dsa_families=tuple(config.dsa_families) if config.dsa else None,
        image_update=config.image_update,
        classes_per_chunk=int(config.classes_per_chunk),
        syn_ce=bool(config.syn_ce) and config.method in ("idm", "bacon"),
        ce_weight=float(config.ce_weight),
        net_num=int(config.net_num),
        initial_nets=int(config.initial_nets),
        net_generate_interval=int(config.net_generate_interval),
        fetch_net_num=int(config.fetch_net_num),
        model_train_steps=int(config.model_train_steps),
        trained_bs=int(config.trained_bs),
        lr_net=float(config.lr_net),
        net_momentum=float(config.net_momentum),
        net_weight_decay=float(config.net_weight_decay),
        meter_reset_every=int(config.eval.every),
        unroll_loops=backend.unroll_loops(config),
        pool_nets_one_by_one=backend.unroll_loops(config) and int(config.trained_bs) >= 64,
        fused_blocks=backend.fused_blocks(config),
        compiler_options=backend.compiler_options(config),
        mesh=mesh,
        cmi_weight=float(config.cmi.weight) if "cmi" in config else 0.0,
    )


def map_in_chunks(fn, xs, chunk, unroll):
    """`jax.lax.map(fn, xs, batch_size=chunk)` with an optional unrolled outer loop.

    `fn` is vmapped over each chunk of `chunk` leading entries; chunks run one after another, so
    peak memory scales with `chunk`. The leading size must be a multiple of `chunk`.
    """
    total = jax.tree.leaves(xs)[0].shape[0]
    if chunk >= total:
        return jax.vmap(fn)(xs)
    if total % chunk:
        raise ValueError(f"classes_per_chunk={chunk} must divide the number of classes {total}.")
    chunked = jax.tree.map(lambda x: x.reshape((total // chunk, chunk) + x.shape[1:]), xs)
    _, out = loops.scan(lambda carry, x: (carry, jax.vmap(fn)(x)), None, chunked, unroll)
    return jax.tree.map(lambda y: y.reshape((total,) + y.shape[2:]), out)


@flax.struct.dataclass
class RealData:
    """The real training set on device: uint8 images plus per-class index tables (SPEC 1.3)."""

    images: jnp.ndarray  # [N, H, W, C] uint8
    labels: jnp.ndarray  # [N] int32
    class_index: jnp.ndarray  # [num_classes, max_class_size] int32, padded
    class_count: jnp.ndarray  # [num_classes] int32
    preprocessing: Any  # data.Preprocessing: uint8 -> model input space

    def take(self, indices):
        return self.preprocessing.preprocess(self.images[indices])


def check_real_data(real):
    """Raises TypeError unless `real` is RealData (a host data.Dataset must be moved first)."""
    if not isinstance(real, RealData):
        hint = (" Convert a data.Dataset with distill.real_data_from_dataset(dataset)."
                if isinstance(real, data.Dataset) else "")
        raise TypeError(f"real must be distill.RealData, got {type(real).__name__}.{hint}")


def real_data_from_dataset(dataset):
    """Moves a host data.Dataset's training split to the device as RealData."""
    index, count = data.class_index(dataset.y_train, dataset.spec.num_classes)
    return RealData(
        images=jnp.asarray(dataset.x_train),
        labels=jnp.asarray(dataset.y_train, jnp.int32),
        class_index=jnp.asarray(index),
        class_count=jnp.asarray(count),
        preprocessing=dataset.preprocessing,
    )


@flax.struct.dataclass
class PoolState:
    """The IDM/BACON model pool as a ring buffer of stacked nets with static shapes (SPEC 5.1, 5.2).

    Slots 0..size-1 hold nets while the pool fills; once full, `next_slot` is the oldest net, which
    the next new net replaces (FIFO). Each net has its own SGD momentum and accuracy meter.
    """

    params: Any  # stacked [net_num, ...]
    momentum: Any  # stacked like params
    correct: jnp.ndarray  # [net_num] int32, meter: correct pre-update predictions since reset
    seen: jnp.ndarray  # [net_num] int32, meter: samples since reset
    size: jnp.ndarray  # int32, nets alive
    next_slot: jnp.ndarray  # int32, ring position of the next net


@flax.struct.dataclass
class DistillState:
    """Everything a distillation run carries between iterations; one pytree for Orbax."""

    step: jnp.ndarray  # int32: passes done so far (the reference's `it` of the next pass)
    images: jnp.ndarray  # [C * ipc, H, W, ch], class-major; per_class mode: positions x~ (SPEC 5.7)
    labels: jnp.ndarray  # [C * ipc] int32
    momentum: jnp.ndarray  # image optimizer buffer, like images
    key: jnp.ndarray  # raw uint32[2] distillation key of this experiment
    pool: Optional[PoolState] = None


# --------------------------------------------------------------------------------------------
# Image-optimizer semantics (SPEC 5.7, A2).


def _geometric_sum(n):
    """sum_{j < n} 0.5 ** j."""
    return 2.0 * (1.0 - 0.5**n)


def per_class_image_update(images, momentum, grads, lr, steps_between):
    """Momentum-0.5 SGD with lr * S_K and momentum 0.5 ** K, K = `steps_between` (SPEC 5.7).

    With K = C this equals the reference's sequence of one full-tensor momentum step per class,
    observed at the moments each class's gradient is evaluated; with K = 1 it is plain SGD with
    momentum 0.5 (DM's joint step).

    Args:
        images: [C * ipc, ...] positions x~ at which `grads` were evaluated.
        momentum: buffer like images.
        grads: per-class gradients (class c's rows hold d loss_c / d x_c).
        lr: the image learning rate lr_img.
        steps_between: K.

    Returns:
        (new_images, new_momentum).
    """
    momentum = grads + (0.5**steps_between) * momentum
    images = images - lr * _geometric_sum(steps_between) * momentum
    return images, momentum


def snapshot_images(images, momentum, lr, num_classes, steps_between):
    """The tensor the reference holds at the start of an iteration (SPEC 5.7 snapshot correction).

    Class c's slice has not yet received the last K - c steps of its momentum tail:
    x_c = x~_c + lr * b_c * sum_{j=K-c}^{K-1} 0.5 ** j. Zero correction for K = 1.
    """
    if steps_between == 1:
        return images
    rows_per_class = images.shape[0] // num_classes
    classes = jnp.arange(num_classes)
    coef = _geometric_sum(steps_between) - _geometric_sum(steps_between - classes)
    coef = jnp.repeat(coef, rows_per_class).reshape((-1,) + (1,) * (images.ndim - 1))
    return images + lr * coef.astype(images.dtype) * momentum


def synthetic_set(state, spec):
    """The synthetic set to evaluate, save or export: (images, labels), un-expanded (SPEC 4.3)."""
    images = snapshot_images(
        state.images, state.momentum, spec.lr_img, spec.num_classes,
        spec.steps_between_class_updates,
    )
    return images, state.labels


def training_set(images, labels, spec):
    """What an evaluation network trains on: the x4 expansion for IDM/BACON (SPEC 4.3)."""
    if spec.expand:
        return augment.expand_quadrants(images, labels)
    return images, labels


# --------------------------------------------------------------------------------------------
# Initialisation.


def _sample_class_images(real, key, c, n):
    indices, _ = data.sample_class_indices(key, real.class_index[c], real.class_count[c], n)
    return real.take(indices)


def init_synthetic_images(key, real, spec):
    """Real-image init (`--init real`): ipc real images per class, or the x4 quadrant init.

    Quadrant init (SPEC 4.1): four independent draws of ipc images per class, each 2x2 average-pooled
    into one quadrant. Plain init (DM, random): one draw of ipc images per class.
    """
    def one_class(c):
        class_key = jax.random.fold_in(key, c)
        if spec.expand:
            draws = jnp.stack([
                _sample_class_images(real, jax.random.fold_in(class_key, k), c, spec.ipc)
                for k in range(4)
            ])
            return augment.quadrant_init(draws)
        return _sample_class_images(real, class_key, c, spec.ipc)

    images = jax.vmap(one_class)(jnp.arange(spec.num_classes))
    images = images.reshape((spec.num_classes * spec.ipc,) + tuple(images.shape[2:]))
    labels = jnp.repeat(jnp.arange(spec.num_classes, dtype=jnp.int32), spec.ipc)
    return images, labels


def _init_net(model, key, spec):
    return models.init_model(model, key, spec.image_shape)["params"]


def init_pool(key, model, spec):
    """A pool with `initial_nets` fresh nets in slots 0.. and zeros in the unused slots."""
    abstract = jax.eval_shape(lambda k: _init_net(model, k, spec), key)
    empty = jax.tree.map(lambda a: jnp.zeros((spec.net_num,) + a.shape, a.dtype), abstract)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(spec.initial_nets))
    initial = jax.vmap(lambda k: _init_net(model, k, spec))(keys)
    params = jax.tree.map(lambda e, i: e.at[: spec.initial_nets].set(i), empty, initial)
    zeros = jnp.zeros((spec.net_num,), jnp.int32)
    return PoolState(
        params=params,
        momentum=sgd.init_momentum(params),
        correct=zeros,
        seen=zeros,
        size=jnp.asarray(spec.initial_nets, jnp.int32),
        next_slot=jnp.asarray(spec.initial_nets % spec.net_num, jnp.int32),
    )


def init_state(key, real, model, spec):
    """The state before iteration 0: real-image init, zero momentum, and the pool for IDM/BACON.

    Args:
        key: the experiment's key; init and distillation use separate `fold_in` branches.
        real: RealData.
        model: the distillation network (flax Module).
        spec: DistillSpec.

    Returns:
        DistillState with step 0, replicated over `spec.mesh` as `distill_step`'s outputs are (so
        the jitted step does not compile a second time for its own outputs).
    """
    check_real_data(real)
    images, labels = init_synthetic_images(jax.random.fold_in(key, 0), real, spec)
    pool = init_pool(jax.random.fold_in(key, 1), model, spec) if spec.uses_pool else None
    state = DistillState(
        step=jnp.zeros((), jnp.int32),
        images=images,
        labels=labels,
        momentum=jnp.zeros_like(images),
        key=jax.random.fold_in(key, 2),
        pool=pool,
    )
    return parallel.replicate(state, spec.mesh)


# --------------------------------------------------------------------------------------------
# Model pool (SPEC 5.2 steps 1c, 2, 3, 5; 5.8).


def reset_meters(pool):
    """Empties every net's accuracy meter (done at each evaluation point, quirk 2)."""
    return pool.replace(correct=jnp.zeros_like(pool.correct), seen=jnp.zeros_like(pool.seen))


def add_net(pool, params):
    """Appends a fresh net with zero momentum and an empty meter; replaces the oldest when full."""
    slot = pool.next_slot
    put = lambda stack, value: stack.at[slot].set(value)
    return pool.replace(
        params=jax.tree.map(put, pool.params, params),
        momentum=jax.tree.map(lambda m: m.at[slot].set(0), pool.momentum),
        correct=pool.correct.at[slot].set(0),
        seen=pool.seen.at[slot].set(0),
        size=jnp.minimum(pool.size + 1, pool.correct.shape[0]),
        next_slot=(slot + 1) % pool.correct.shape[0],
    )


def meter_accuracy_percent(pool, slot):
    """The net's running training accuracy in percent; 0 for an empty meter (SPEC 5.6)."""
    seen = pool.seen[slot]
    return jnp.where(seen > 0, 100.0 * pool.correct[slot] / jnp.maximum(seen, 1), 0.0)


def _pick_distinct_slots(key, size, capacity, count):
    """`count` distinct uniformly random slots among 0..size-1 (`size` traced, `count` static)."""
    scores = jax.random.uniform(key, (capacity,))
    scores = jnp.where(jnp.arange(capacity) < size, scores, 2.0)
    return jax.lax.top_k(-scores, count)[1]


def _train_one_net(params, momentum, key, real, model, spec):
    """`model_train_steps` SGD steps on uniform real batches, no augmentation (SPEC 5.8).

    Runs per device inside shard_map: every device draws the same global batch of `trained_bs`
    indices and trains on its slice; the gradient of the global mean loss is the `pmean` of the
    slices' mean-loss gradients. Returns the new params and momentum, and the number of correct
    pre-update predictions over the global batch.
    """
    num_train = real.images.shape[0]

    def step(carry, step_index):
        params, momentum, correct = carry
        indices = data.sample_uniform_indices(
            jax.random.fold_in(key, step_index), num_train, spec.trained_bs
        )
        indices = parallel.local_slice(indices, spec.trained_bs)
        images, labels = real.take(indices), real.labels[indices]

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            return losses.cross_entropy(logits, labels), logits

        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, parallel.AXIS)
        hits = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
        correct += jax.lax.psum(hits, parallel.AXIS)
        params, momentum = sgd.sgd_step(
            params, momentum, grads, spec.lr_net,
            beta=spec.net_momentum, weight_decay=spec.net_weight_decay,
        )
        return (params, momentum, correct), None

    init = (params, momentum, jnp.zeros((), jnp.int32))
    (params, momentum, correct), _ = loops.scan(
        step, init, jnp.arange(spec.model_train_steps), spec.unroll_loops
    )
    return params, momentum, correct


def _one_after_another(fn, count, params, momentum, keys, real):
    """`vmap(fn, in_axes=(0, 0, 0, None))` as an unrolled loop over the `count` nets.

    XLA:CPU lowers convolutions vmapped over per-net weights to grouped convolutions, about twice
    as slow per net as running the nets one after another; the results are the same.
    """
    take = lambda tree, j: jax.tree.map(lambda leaf: leaf[j], tree)
    outputs = [fn(take(params, j), take(momentum, j), keys[j], real) for j in range(count)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)


def train_pool(pool, key, real, model, spec):
    """Trains `fetch_net_num` distinct pool nets and updates their meters.

    The nets train side by side (vmap), or one after another when `spec.pool_nets_one_by_one`
    (XLA:CPU at pool batches of 64 or more, where vmapped convolutions are slower); same maths.
    """
    check_real_data(real)
    capacity = pool.correct.shape[0]
    slots = _pick_distinct_slots(
        jax.random.fold_in(key, 0), pool.size, capacity, spec.fetch_net_num
    )
    take = lambda stack: stack[slots]
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, 1), j))(slots)
    mesh = parallel.resolve(spec.mesh)
    train_one = functools.partial(_train_one_net, model=model, spec=spec)
    if spec.pool_nets_one_by_one:
        train_all = functools.partial(_one_after_another, train_one, spec.fetch_net_num)
    else:
        train_all = jax.vmap(train_one, in_axes=(0, 0, 0, None))
    train = parallel.shard(
        train_all, mesh, in_specs=parallel.replicated, out_specs=parallel.replicated)
    params, momentum, correct = train(
        jax.tree.map(take, pool.params), jax.tree.map(take, pool.momentum), keys, real
    )
    put = lambda stack, value: stack.at[slots].set(value)
    return pool.replace(
        params=jax.tree.map(put, pool.params, params),
        momentum=jax.tree.map(put, pool.momentum, momentum),
        correct=pool.correct.at[slots].add(correct),
        seen=pool.seen.at[slots].add(spec.model_train_steps * spec.trained_bs),
    )


# --------------------------------------------------------------------------------------------
# The per-class objective and the step.


def class_objective(class_images, class_id, key, params, ce_multiplier, real, model, spec,
                    teacher=None, real_batch=None):
    """One class's loss and its gradient w.r.t. the class's stored images (SPEC 5.3, 6).

    With `teacher` = (module, one teacher's variables) and `spec.cmi_weight` > 0, the class's CMI
    term is added on its expanded images before DSA (SPEC A8; IDM/BACON only, DM adds its term once
    per iteration on the raw set in `distill_step`).

    Args:
        class_images: [ipc, H, W, ch] stored images of class `class_id`.
        class_id: int32 scalar.
        key: this (iteration, class) key: real-batch sampling and the Siamese DSA draw.
        params: the matching network's parameters.
        ce_multiplier: ce_weight x meter accuracy in percent (0 disables the CE term).
        real: RealData.
        model: flax Module with `embed` and `classify`.
        spec: DistillSpec.
        teacher: see above.
        real_batch: the class's real batch (indices, mask) as `class_real_batches` draws it from
            `key`, when drawn beforehand for many classes at once; None draws it here.

    Returns:
        (grad [ipc, H, W, ch], metrics dict of scalars).
    """
    check_real_data(real)
    sample_key, dsa_key = jax.random.split(key)
    if real_batch is None:
        real_batch = data.sample_class_indices(
            sample_key, real.class_index[class_id], real.class_count[class_id], spec.batch_real)
    indices, mask = real_batch
    real_images = real.take(indices)
    if spec.dsa_families:
        real_images = augment.dsa(real_images, dsa_key, siamese=True, families=spec.dsa_families)
    real_features = jax.lax.stop_gradient(
        model.apply({"params": params}, real_images, method=model.embed)
    )
    match_fn = losses.MATCHING_LOSSES[spec.matching_loss]

    def objective(images):
        labels = jnp.full((images.shape[0],), class_id, jnp.int32)
        if spec.expand:
            images, labels = augment.expand_quadrants(images, labels)
        cmi = jnp.zeros(())
        if teacher is not None and spec.cmi_weight and spec.uses_pool:
            teacher_model, teacher_variables = teacher
            embeddings = teacher_model.apply(
                jax.lax.stop_gradient(teacher_variables), images, train=False, method="embed")
            cmi = losses.cmi_loss(embeddings, 1, images.shape[0])
        if spec.dsa_families:
            images = augment.dsa(images, dsa_key, siamese=True, families=spec.dsa_families)
        features = model.apply({"params": params}, images, method=model.embed)
        match = match_fn(features, real_features, mask) + spec.cmi_weight * cmi
        if not spec.syn_ce:
            return match, {"match_loss": match, "ce_loss": jnp.zeros(()), "cmi_loss": cmi}
        logits = model.apply({"params": params}, features, method=model.classify)
        ce = losses.cross_entropy(logits, labels)
        return match + ce_multiplier * ce, {"match_loss": match, "ce_loss": ce, "cmi_loss": cmi}

    (loss, metrics), grad = jax.value_and_grad(objective, has_aux=True)(class_images)
    return grad, dict(metrics, loss=loss)


def class_real_batches(keys, class_ids, real, spec):
    """The real batches (indices, mask) that `class_objective` draws from each class's key.

    Drawn for all the classes at once (`data.sample_class_indices_batch`): the same draws as one
    call per class.
    """
    sample_keys = jax.vmap(lambda key: jax.random.split(key)[0])(keys)
    return data.sample_class_indices_batch(
        sample_keys, real.class_index[class_ids], real.class_count[class_ids], spec.batch_real)


def _all_class_gradients(images, key, params, ce_multiplier, real, model, spec, teacher=None):
    """Gradients of every class's objective, classes split over the devices of `spec.mesh`.

    Classes are padded to a multiple of the device count; a padded class reads the last real
    class's data under its own (global) id and its outputs are dropped, so it never touches a
    real class. Within a device, classes run `classes_per_chunk` at a time.
    """
    mesh = parallel.resolve(spec.mesh)
    num_padded = parallel.padded(spec.num_classes, mesh)
    per_class = images.reshape((spec.num_classes, spec.ipc) + tuple(images.shape[1:]))
    per_class = jnp.pad(per_class, [(0, num_padded - spec.num_classes)] + [(0, 0)] * 4)
    class_ids = jnp.arange(num_padded, dtype=jnp.int32)
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(class_ids)
    local_classes = num_padded // mesh.size
    # The largest chunk <= classes_per_chunk that divides this device's classes (results do not
    # depend on the chunk size; only peak memory does).
    requested = min(spec.classes_per_chunk or local_classes, local_classes)
    chunk = max(d for d in range(1, requested + 1) if local_classes % d == 0)

    teacher_model, teacher_variables = teacher if teacher is not None else (None, None)

    def local(per_class, class_ids, keys, params, ce_multiplier, real, teacher_variables):
        data_classes = jnp.minimum(class_ids, spec.num_classes - 1)
        batches = class_real_batches(keys, data_classes, real, spec)

        def one_class(args):
            class_images, data_class, class_key, real_batch = args
            return class_objective(
                class_images, data_class, class_key, params, ce_multiplier, real, model, spec,
                None if teacher_model is None else (teacher_model, teacher_variables),
                real_batch=real_batch,
            )

        return map_in_chunks(one_class, (per_class, data_classes, keys, batches), chunk,
                             spec.unroll_loops)

    sharded = parallel.shard(
        local, mesh,
        in_specs=(parallel.split, parallel.split, parallel.split, parallel.replicated,
                  parallel.replicated, parallel.replicated, parallel.replicated),
        out_specs=(parallel.split, parallel.split),
    )
    grads, metrics = sharded(per_class, class_ids, keys, params, ce_multiplier, real,
                             teacher_variables)
    drop_padding = lambda x: x[: spec.num_classes]
    grads = drop_padding(grads).reshape(images.shape)
    return grads, jax.tree.map(drop_padding, metrics)


def _select_network(state, it_key, model, spec):
    """The matching net's params and CE multiplier, and the pool after reset/growth (SPEC 5.2)."""
    if not spec.uses_pool:
        params = _init_net(model, jax.random.fold_in(it_key, _FRESH_NET), spec)
        return params, jnp.zeros(()), None
    pool = state.pool
    it = state.step
    pool = jax.lax.cond(
        (it > 0) & (it % spec.meter_reset_every == 0), reset_meters, lambda p: p, pool
    )
    pool = jax.lax.cond(
        it % spec.net_generate_interval == 0,
        lambda p: add_net(p, _init_net(model, jax.random.fold_in(it_key, _NEW_NET), spec)),
        lambda p: p,
        pool,
    )
    slot = jax.random.randint(jax.random.fold_in(it_key, _PICK_NET), (), 0, pool.size)
    params = jax.tree.map(lambda stack: stack[slot], pool.params)
    multiplier = spec.ce_weight * meter_accuracy_percent(pool, slot) if spec.syn_ce else 0.0
    return params, jnp.asarray(multiplier, jnp.float32), pool


def _dm_cmi_gradient(images, teacher, spec):
    """Gradient of weight x CMI of the whole raw synthetic set (DM, SPEC 7.4), and the term."""
    teacher_model, teacher_variables = teacher

    def term(images):
        embeddings = teacher_model.apply(
            jax.lax.stop_gradient(teacher_variables), images, train=False, method="embed")
        return losses.cmi_loss(embeddings, spec.num_classes, spec.ipc)

    value, grad = jax.value_and_grad(term)(images)
    return spec.cmi_weight * grad, value


def distill_step(state, real, teachers=None, *, model, spec, teacher_model=None):
    """One distillation pass (one reference iteration `it`), pure and jittable.

    Order (SPEC 5.2): meter reset at evaluation points, pool growth, matching-net choice, all classes'
    gradients, image update, pool training. DM (SPEC 6): a fresh random net, one joint image step.

    Not jitted itself: jit it with `model` and `spec` bound (`functools.partial`), as train.py does.

    Args:
        state: DistillState before pass `state.step` (from `init_state`).
        real: RealData (`real_data_from_dataset`; device arrays, not donated).
        teachers: stacked teacher variables [T, ...] for the CMI term (one drawn per iteration),
            or None when `spec.cmi_weight` is 0.
        model: the distillation network (static).
        spec: DistillSpec (static).
        teacher_model: the teachers' module (static), with `teachers`.

    Returns:
        (new_state, metrics), metrics a dict of scalars: `loss` (the class objective),
        `match_loss`, `ce_loss` (the synthetic CE before its multiplier, also while the multiplier
        is 0; 0 for DM and with `syn_ce=False`) and `cmi_loss`, each the mean over classes;
        `ce_multiplier` (ce_weight x the matching net's meter accuracy in percent, 0 for DM);
        `image_rms` of the updated images; and for IDM/BACON `pool_size`. The images to evaluate
        are `synthetic_set(new_state, spec)`.
    """
    if spec.method in config_lib.SELECTION_METHODS:
        raise ValueError(f"method {spec.method!r} has no distillation step: its set is selected, "
                         "not distilled. Choose dm, idm or bacon to distill.")
    check_real_data(real)
    it_key = jax.random.fold_in(state.key, state.step)
    params, ce_multiplier, pool = _select_network(state, it_key, model, spec)
    teacher = None
    if spec.cmi_weight:
        if teachers is None or teacher_model is None:
            raise ValueError("spec.cmi_weight > 0 needs teachers and teacher_model.")
        index = jax.random.randint(jax.random.fold_in(it_key, _TEACHER), (), 0,
                                   jax.tree.leaves(teachers)[0].shape[0])
        teacher = (teacher_model, jax.tree.map(lambda leaf: leaf[index], teachers))
    grads, class_metrics = _all_class_gradients(
        state.images, jax.random.fold_in(it_key, _CLASSES), params, ce_multiplier, real, model,
        spec, teacher if spec.uses_pool else None,
    )
    if teacher is not None and not spec.uses_pool:
        cmi_grad, cmi_value = _dm_cmi_gradient(state.images, teacher, spec)
        grads = grads + cmi_grad
        class_metrics["cmi_loss"] = jnp.full((spec.num_classes,), cmi_value)
    images, momentum = per_class_image_update(
        state.images, state.momentum, grads, spec.lr_img, spec.steps_between_class_updates
    )
    metrics = {name: jnp.mean(value) for name, value in class_metrics.items()}
    metrics["ce_multiplier"] = ce_multiplier
    # Plot-worthy, and NaN as soon as an update diverges (the driver stops on non-finite metrics).
    metrics["image_rms"] = jnp.sqrt(jnp.mean(jnp.square(images)))
    if spec.uses_pool:
        pool = train_pool(pool, jax.random.fold_in(it_key, _POOL_TRAIN), real, model, spec)
        metrics["pool_size"] = pool.size.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, images=images, momentum=momentum, pool=pool)
    return new_state, metrics
