"""CMI teachers: pretraining on the real training set, Orbax storage, and the CMI term (SPEC 7).

`pretrain_teachers(config, workdir)` (what `experiments/pretrain.py` calls) trains
`config.cmi.num_teachers` networks `config.cmi.teacher_model` (the instance-norm ResNet18 of SPEC 7.1
by default) on the real training set of `config.dataset`, in the same preprocessed space as the
distillation: SGD lr 0.01, momentum 0.9, coupled weight decay 1e-3, batch 256 reshuffled every epoch
(the partial last batch kept), 40 epochs at a constant learning rate, no augmentation, cross-entropy.
Each teacher is written atomically by Orbax to `workdir/teacher_{i}` with two items: `variables`
(the flax variables, `{'params': ...}` plus `batch_stats` for BatchNorm nets) and `meta` (JSON:
dataset, image shape, classes, model, training settings, test accuracy). A rerun skips the teachers
already written, so an interrupted pretraining resumes teacher by teacher.

At distillation time `load_teachers` restores every teacher into one stacked pytree [T, ...], and
`cmi_term` draws one teacher uniformly from a key (the reference draws a new teacher file every
iteration, SPEC 7.1) and returns `losses.cmi_loss` of its embeddings. Teacher weights are constants;
gradients flow through the teacher into the images.
"""

import functools
import math
import os
import re

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bacon_jax import data, errors, losses, models, sgd

# Separates the teachers' keys from the distillation's (which fold the experiment index into the
# same PRNGKey(config.seed)).
_PRETRAIN_TAG = 0x7EAC
# fold_in tags of one teacher's key.
_INIT, _SHUFFLE = 0, 1

_TEACHER_DIR = re.compile(r"^teacher_(\d+)$")
_EVAL_CHUNK = 1024


def teacher_path(workdir, index):
    """The Orbax directory of teacher `index` inside `workdir`."""
    return os.path.join(os.path.abspath(workdir), f"teacher_{index}")


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _read_meta(path):
    restored = _checkpointer().restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]


def teacher_metadata(config, dataset_spec, index):
    """The JSON metadata written beside teacher `index` (test accuracy is added after training)."""
    return {
        "dataset": config.dataset.name,
        "image_shape": [int(s) for s in dataset_spec.image_shape],
        "num_classes": int(dataset_spec.num_classes),
        "zca": bool(config.dataset.get("zca", False)),
        "model": config.cmi.teacher_model,
        "epochs": int(config.cmi.epochs),
        "lr": float(config.cmi.lr),
        "momentum": float(config.cmi.momentum),
        "weight_decay": float(config.cmi.weight_decay),
        "batch_size": int(config.cmi.batch_size),
        "seed": int(config.seed),
        "index": int(index),
    }


# --------------------------------------------------------------------------------------------
# Pretraining.


@functools.partial(
    jax.jit, static_argnames=("model", "lr", "beta", "weight_decay"), donate_argnums=(0, 1)
)
def _train_step(variables, momentum, indices, x_train, y_train, preprocessing, *, model, lr, beta,
                weight_decay):
    """One SGD step on the batch `indices` of the (uint8, on-device) training set."""
    images = preprocessing.preprocess(x_train[indices])
    labels = y_train[indices]

    def loss_fn(params):
        _, logits, new_vars = models.apply_features_and_logits(
            model, {**variables, "params": params}, images, train=True
        )
        loss = losses.cross_entropy(logits, labels)
        return loss, (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"]
    )
    params, momentum = sgd.sgd_step(
        variables["params"], momentum, grads, lr, beta=beta, weight_decay=weight_decay
    )
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return {**new_vars, "params": params}, momentum, {"loss_sum": loss * labels.shape[0],
                                                       "correct": correct}


@functools.partial(jax.jit, static_argnames=("model",))
def _test_chunk(variables, images_uint8, labels, mask, preprocessing, *, model):
    """Correct predictions among the valid rows of one padded test chunk."""
    logits = model.apply(variables, preprocessing.preprocess(images_uint8), train=False)
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)


def _check_embedding_varies(model, variables, images, model_name, spec):
    """Refuses a network whose embedding is the same for every input (useless for CMI, coresets).

    The instance-norm ResNet18 on 8x8 images (digits) reaches a 1x1 map in its last stage, where
    instance norm outputs exactly its bias: the embedding is identically 0, so CMI would be 0 with
    zero gradient, and a coreset selected in it arbitrary. Checked at initialisation, before any
    epoch is spent.
    """
    if models.ignores_input(model, variables, images, method="embed"):
        raise ValueError(
            f"{model_name!r} gives the same embedding for every {spec.name!r} image of "
            f"shape {spec.image_shape} (e.g. instance norm on a 1x1 final map), so the CMI term "
            "would be identically 0 and a coreset selected in it arbitrary. Choose another "
            "architecture for this dataset (cmi.teacher_model, or eval.models[0] for coresets), "
            "e.g. ConvNetW32 or ConvNet."
        )


def _padded_chunks(x, y, chunk):
    """Host-side test chunks of one static size; the tail is zero-padded and masked out."""
    n = len(y)
    size = min(chunk, n)
    padded = -(-n // size) * size
    x = np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((padded - n,), y.dtype)])
    mask = np.arange(padded) < n
    for start in range(0, padded, size):
        sl = slice(start, start + size)
        yield x[sl], y[sl], mask[sl]


def train_teacher(key, dataset, model_name, *, epochs, lr, momentum, weight_decay, batch_size,
                  log_prefix=""):
    """Trains one network on the real training set of `dataset` (SPEC 7.1; also coreset.py's).

    The Python loop over steps calls one jitted step (convolutions inside `lax.scan` are ~20x
    slower on XLA:CPU, see loops.py). Two step shapes compile: full batches and the partial last
    batch, which is kept as in the reference's DataLoader.

    Args:
        key: PRNG key (initialisation and per-epoch shuffles).
        dataset: a data.Dataset.
        model_name: a registered model name.
        epochs, lr, momentum, weight_decay, batch_size: SGD settings (constant learning rate).
        log_prefix: text put in front of the per-epoch log lines.

    Returns:
        (variables, test_accuracies): the trained flax variables and the test accuracy after every
        epoch (a list of floats in [0, 1]).
    """
    spec = dataset.spec
    model = models.get_model(model_name, spec.num_classes, spec.image_shape)
    variables = models.init_model(model, jax.random.fold_in(key, _INIT), spec.image_shape)
    opt_momentum = sgd.init_momentum(variables["params"])
    preprocessing = dataset.preprocessing
    x_train = jnp.asarray(dataset.x_train)
    y_train = jnp.asarray(dataset.y_train, jnp.int32)
    test_chunks = [
        (jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(m))
        for x, y, m in _padded_chunks(dataset.x_test, dataset.y_test, _EVAL_CHUNK)
    ]
    _check_embedding_varies(model, variables, preprocessing.preprocess(dataset.x_train[:8]),
                            model_name, spec)
    # Jitted at module level with static settings, so every teacher of a run reuses one compile.
    step = functools.partial(_train_step, model=model, lr=float(lr), beta=float(momentum),
                             weight_decay=float(weight_decay))
    test_chunk = functools.partial(_test_chunk, model=model)
    num_train = dataset.num_train
    accuracies = []
    for epoch in range(epochs):
        order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, _SHUFFLE), epoch),
                                       num_train)
        totals = []
        for start in range(0, num_train, batch_size):
            variables, opt_momentum, stats = step(
                variables, opt_momentum, order[start:start + batch_size], x_train, y_train,
                preprocessing,
            )
            totals.append(stats)
        totals = jax.device_get(jax.tree.map(lambda *s: jnp.sum(jnp.stack(s)), *totals))
        correct = sum(int(test_chunk(variables, x, y, m, preprocessing)) for x, y, m in test_chunks)
        accuracy = correct / dataset.num_test
        accuracies.append(accuracy)
        loss = float(totals["loss_sum"]) / num_train
        if not math.isfinite(loss):
            raise FloatingPointError(f"{log_prefix}non-finite training loss at epoch {epoch}.")
        logging.info("%sepoch %d/%d: train loss %.4f, train acc %.4f, test acc %.4f", log_prefix,
                     epoch + 1, epochs, loss, int(totals["correct"]) / num_train, accuracy)
    return variables, accuracies


def save_teacher(path, variables, metadata):
    """Writes one teacher (variables + JSON metadata) atomically with Orbax, replacing any old one."""
    checkpointer = _checkpointer()
    checkpointer.save(
        os.path.abspath(path),
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(metadata)
        ),
        force=True,
    )


def pretrain_teachers(config, workdir):
    """Trains and saves `config.cmi.num_teachers` teachers on the real training set (SPEC 7.1).

    Teacher i uses the key fold_in(fold_in(PRNGKey(config.seed), tag), i). A teacher whose
    directory already holds a complete checkpoint written with the same settings is skipped, so a
    rerun resumes; one written with other settings is refused.

    Args:
        config: a ConfigDict with `dataset`, `seed` and the `cmi` sub-config.
        workdir: output directory; receives `teacher_0`, `teacher_1`, ...

    Returns:
        The list of the teachers' metadata dicts (with `test_accuracy`).

    Raises:
        errors.UserError: `workdir` holds a teacher written for other settings.
    """
    num_teachers = int(config.cmi.num_teachers)
    if num_teachers < 1:
        raise ValueError(f"cmi.num_teachers must be >= 1, got {num_teachers}.")
    models.get_model(config.cmi.teacher_model, 1, (1, 1, 1))  # fail early on an unknown name
    os.makedirs(workdir, exist_ok=True)
    dataset = data.load_dataset(config.dataset)
    logging.info("Pretraining %d %s teacher(s) on %s: %d train / %d test images of shape %s",
                 num_teachers, config.cmi.teacher_model, dataset.name, dataset.num_train,
                 dataset.num_test, dataset.image_shape)
    root = jax.random.fold_in(jax.random.PRNGKey(config.seed), _PRETRAIN_TAG)
    written = []
    for index in range(num_teachers):
        path = teacher_path(workdir, index)
        metadata = teacher_metadata(config, dataset.spec, index)
        if os.path.isdir(path):
            saved = _read_meta(path)
            mismatched = {k: (saved.get(k), v) for k, v in metadata.items() if saved.get(k) != v}
            if mismatched:
                details = ", ".join(f"{k}: saved {a!r} vs config {b!r}"
                                    for k, (a, b) in mismatched.items())
                raise errors.UserError(
                    f"{path} holds a teacher written with other settings ({details}); use a new "
                    "--workdir.")
            logging.info("Teacher %d already in %s (test acc %.4f); skipping", index, path,
                         saved["test_accuracy"])
            written.append(saved)
            continue
        variables, accuracies = train_teacher(
            jax.random.fold_in(root, index), dataset, config.cmi.teacher_model,
            epochs=int(config.cmi.epochs), lr=float(config.cmi.lr),
            momentum=float(config.cmi.momentum), weight_decay=float(config.cmi.weight_decay),
            batch_size=int(config.cmi.batch_size), log_prefix=f"[teacher {index}] ",
        )
        metadata["test_accuracy"] = float(accuracies[-1]) if accuracies else float("nan")
        metadata["test_accuracy_per_epoch"] = [float(a) for a in accuracies]
        save_teacher(path, variables, metadata)
        logging.info("Teacher %d: test acc %.4f, saved to %s", index, metadata["test_accuracy"],
                     path)
        written.append(metadata)
    return written


# --------------------------------------------------------------------------------------------
# Loading and use.


def _pretrain_command(dataset_name, teacher_dir):
    return (f"python experiments/pretrain.py --config=configs/{dataset_name}.py:ipc10 "
            f"--workdir={teacher_dir}")


def load_teachers(teacher_dir, dataset_name, image_shape, num_classes, zca=None):
    """Restores every teacher in `teacher_dir` as one stacked pytree.

    Args:
        teacher_dir: the `--workdir` of experiments/pretrain.py.
        dataset_name: the distillation's dataset (config.dataset.name).
        image_shape: (H, W, C) of its images.
        num_classes: its number of classes.
        zca: when not None, the distillation's config.dataset.zca; teachers must have been trained
            in the same (ZCA or mean/std) space.

    Returns:
        (model, variables): the teachers' flax module and their variables stacked on a leading axis
        of size T (`{'params': ...}`, plus `batch_stats` for BatchNorm teachers).

    Raises:
        errors.UserError: `teacher_dir` is missing or holds no teacher, a teacher was trained for
            another dataset, image shape, class count or preprocessing, or the teachers use
            different architectures.
    """
    teacher_dir = os.path.abspath(teacher_dir) if teacher_dir else ""
    if not teacher_dir or not os.path.isdir(teacher_dir):
        raise errors.UserError(
            f"CMI teacher directory {teacher_dir or '(cmi.teacher_dir is empty)'} does not exist. "
            f"Pretrain the teachers first: `{_pretrain_command(dataset_name, teacher_dir or '<dir>')}`"
            ", then set cmi.teacher_dir to that directory."
        )
    indices = sorted(
        int(m.group(1)) for m in map(_TEACHER_DIR.match, os.listdir(teacher_dir)) if m
    )
    if not indices:
        raise errors.UserError(
            f"CMI teacher directory {teacher_dir} holds no teacher (no teacher_<i> checkpoint). "
            f"Pretrain them with `{_pretrain_command(dataset_name, teacher_dir)}`."
        )
    expected = {"dataset": dataset_name, "image_shape": [int(s) for s in image_shape],
                "num_classes": int(num_classes)}
    if zca is not None:
        expected["zca"] = bool(zca)
    model, stacked, model_name = None, [], None
    for index in indices:
        path = teacher_path(teacher_dir, index)
        meta = _read_meta(path)
        found = {k: meta.get(k) for k in expected}
        if found != expected:
            raise errors.UserError(
                f"CMI teacher {path} was trained for dataset {meta.get('dataset')!r} "
                f"(image_shape {meta.get('image_shape')}, {meta.get('num_classes')} classes, "
                f"zca {meta.get('zca')}), but this run distills dataset {dataset_name!r} "
                f"(image_shape {list(expected['image_shape'])}, {num_classes} classes"
                + (f", zca {bool(zca)}" if zca is not None else "")
                + f"). Pretrain teachers for it: `{_pretrain_command(dataset_name, '<dir>')}`."
            )
        if model_name is None:
            model_name = meta["model"]
            model = models.get_model(model_name, num_classes, image_shape)
            abstract = jax.eval_shape(
                lambda: models.init_model(model, jax.random.PRNGKey(0), image_shape)
            )
        elif meta["model"] != model_name:
            raise errors.UserError(
                f"CMI teachers in {teacher_dir} mix architectures: {model_name!r} and "
                f"{meta['model']!r} ({path}); keep one architecture per directory."
            )
        restored = _checkpointer().restore(
            path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract))
        )
        stacked.append(restored["variables"])
        logging.info("Loaded CMI teacher %s (%s, test acc %.4f)", path, model_name,
                     meta.get("test_accuracy", float("nan")))
    variables = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stacked)
    return model, variables


def load_teachers_from_config(config, dataset_spec):
    """`load_teachers` for a distillation config: None when `config.cmi.weight` is 0.

    Args:
        config: the distillation ConfigDict (fields `cmi.weight`, `cmi.teacher_dir`, `dataset`).
        dataset_spec: the data.DatasetSpec being distilled.

    Returns:
        (model, stacked variables) from `load_teachers`, or None when CMI is off.
    """
    if float(config.cmi.weight) == 0.0:
        return None
    return load_teachers(config.cmi.teacher_dir, config.dataset.name, dataset_spec.image_shape,
                         dataset_spec.num_classes, zca=bool(config.dataset.get("zca", False)))


def num_teachers(variables):
    """T, the leading size of a stacked teacher pytree."""
    return jax.tree.leaves(variables)[0].shape[0]


def sample_teacher(variables, key):
    """One teacher's variables drawn uniformly from the stack with `key` (jittable)."""
    index = jax.random.randint(key, (), 0, num_teachers(variables))
    return jax.tree.map(lambda leaf: leaf[index], variables)


def teacher_embed(model, variables, images):
    """The teacher's embedding (512-d for ResNet18) of images in the normalised space.

    BatchNorm teachers use their running statistics (train=False). The reference puts the teacher
    in train mode, which is the same for the instance-norm ResNet18 it uses (SPEC 7.1).

    Args:
        model: the teacher module from `load_teachers`.
        variables: ONE teacher's variables (not the stack; see `sample_teacher`).
        images: [N, H, W, C].

    Returns:
        [N, D] embeddings; gradients flow to `images`, the variables are treated as constants.
    """
    variables = jax.lax.stop_gradient(variables)
    return model.apply(variables, images, train=False, method="embed")


def cmi_term(teacher_model, teacher_variables, key, images, num_classes, ipc):
    """The CMI loss of class-major `images` under one teacher drawn with `key` (SPEC 7.2, A8).

    Jittable and differentiable w.r.t. `images`. Multiply by `config.cmi.weight` yourself.

    * DM (SPEC 7.4): `images` = the whole raw synthetic set [C * ipc, ...] (no DSA, no
      expansion), num_classes = C, ipc = ipc; one term per iteration.
    * IDM/BACON (A8): per class, `images` = that class's 4 * ipc expanded images before DSA,
      num_classes = 1, ipc = 4 * ipc. Pass the same per-iteration key to every class so that one
      teacher serves the whole iteration, as in the reference.

    Args:
        teacher_model: the module from `load_teachers`.
        teacher_variables: the stacked variables [T, ...] from `load_teachers`.
        key: PRNG key choosing the teacher (uniform over T).
        images: [num_classes * ipc, H, W, C], class-major.
        num_classes: number of class blocks in `images` (static).
        ipc: images per class block (static).

    Returns:
        Scalar mean over rows of KL(p_i || q_class).
    """
    variables = sample_teacher(teacher_variables, key)
    return losses.cmi_loss(teacher_embed(teacher_model, variables, images), num_classes, ipc)
