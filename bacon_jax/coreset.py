"""Coreset baselines: herding and k-center selections of real images (the DC/DM coreset rows).

Methods `herding` and `kcenter` pick `ipc` real training images per class and do not distill (like
`random`: no iterations, no expansion); the run evaluates them with the same protocol as every
other method. Both select in the embedding (`embed`, the classifier's input) of one network of
architecture `config.eval.models[0]`, trained on the real training set (minus any validation
split) with `teacher.train_teacher` and the settings of `config.coreset`. Per class, on float64
features:

* herding (Welling 2009, in the greedy form iCaRL uses): the k-th pick is the image that brings
  the mean of the k picked features closest to the class mean;
* k-center (the greedy farthest-point selection of Sener & Savarese 2018): the first pick is the
  image nearest the class mean (a deterministic start), then each pick is the image farthest
  from its nearest picked image.

Ties go to the lowest training index. The feature network is keyed by the experiment's key, so a
selection is a deterministic function of (config, seed), and experiments differ as random's draws
do.
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bacon_jax import data, errors, interop, models, teacher

# fold_in tag of the feature network's key within the experiment's init key (distill.init_state
# uses 0, 1 and 2).
_FEATURES = 3
_CHUNK = 1024
SELECTION_NAME = "coreset.json"


def herding(features, k):
    """Indices of `k` rows picked greedily so that their running mean tracks the mean of all rows.

    Args:
        features: [N, D] features of one class.
        k: rows to pick, at most N.

    Returns:
        int array [k]: pick j minimises ||mean(features) - mean(picks 0..j)|| over the rows not
        yet picked (lowest index on ties).
    """
    f = np.asarray(features, np.float64)
    target = f.mean(axis=0)
    picked, total = [], np.zeros_like(target)
    available = np.ones(f.shape[0], bool)
    for count in range(1, k + 1):
        gap = np.sum((target - (total + f) / count) ** 2, axis=1)
        gap[~available] = np.inf
        index = int(np.argmin(gap))
        picked.append(index)
        available[index] = False
        total += f[index]
    return np.asarray(picked, np.int64)


def k_center(features, k):
    """Indices of `k` rows by greedy farthest-point selection, starting nearest the mean.

    Args:
        features: [N, D] features of one class.
        k: rows to pick, at most N.

    Returns:
        int array [k]: the row nearest the mean, then repeatedly the row whose distance to its
        nearest picked row is largest (lowest index on ties).
    """
    f = np.asarray(features, np.float64)
    first = int(np.argmin(np.sum((f - f.mean(axis=0)) ** 2, axis=1)))
    picked = [first]
    nearest = np.sum((f - f[first]) ** 2, axis=1)
    nearest[first] = -np.inf
    for _ in range(k - 1):
        index = int(np.argmax(nearest))
        picked.append(index)
        nearest = np.minimum(nearest, np.sum((f - f[index]) ** 2, axis=1))
        nearest[picked] = -np.inf
    return np.asarray(picked, np.int64)


SELECTORS = {"herding": herding, "kcenter": k_center}


@functools.partial(jax.jit, static_argnames=("model",))
def _embed_chunk(variables, images_uint8, preprocessing, *, model):
    return teacher.teacher_embed(model, variables, preprocessing.preprocess(images_uint8))


def embeddings(model, variables, images_uint8, preprocessing):
    """[N, D] float32 embeddings of uint8 images, in fixed-size chunks (one compile)."""
    num = images_uint8.shape[0]
    size = min(_CHUNK, num)
    padded = -(-num // size) * size
    images = np.concatenate([images_uint8, np.zeros((padded - num,) + images_uint8.shape[1:],
                                                    images_uint8.dtype)])
    chunks = [_embed_chunk(variables, jnp.asarray(images[start:start + size]), preprocessing,
                           model=model)
              for start in range(0, padded, size)]
    return np.asarray(jnp.concatenate(chunks))[:num]


def select(key, dataset, method, ipc, model_name, coreset_config):
    """Trains the feature network and picks `ipc` training images per class with `method`.

    Args:
        key: PRNG key of the feature network (init and shuffles).
        dataset: the `data.Dataset` to select from (its `x_train`, already without validation).
        method: a key of SELECTORS.
        ipc: images per class.
        model_name: the feature network's architecture.
        coreset_config: `config.coreset` (epochs, lr, momentum, weight_decay, batch_size).

    Returns:
        (indices, test_accuracies): int [C * ipc] training indices, class-major (class c's picks
        in pick order), and the feature network's test accuracy after each epoch (logged only; it
        selects nothing).

    Raises:
        ValueError: a class with fewer than `ipc` training images.
    """
    index, counts = data.class_index(dataset.y_train, dataset.num_classes)
    small = np.flatnonzero(counts < ipc)
    if small.size:
        raise errors.UserError(f"Classes {small.tolist()} have {counts[small].tolist()} training "
                         f"images, fewer than ipc={ipc}.")
    variables, accuracies = teacher.train_teacher(
        key, dataset, model_name, epochs=int(coreset_config.epochs),
        lr=float(coreset_config.lr), momentum=float(coreset_config.momentum),
        weight_decay=float(coreset_config.weight_decay),
        batch_size=int(coreset_config.batch_size), log_prefix=f"[{method} features] ")
    model = models.get_model(model_name, dataset.num_classes, dataset.image_shape)
    features = embeddings(model, variables, dataset.x_train, dataset.preprocessing)
    picks = []
    for c in range(dataset.num_classes):
        rows = index[c, :counts[c]]
        picks.append(rows[SELECTORS[method](features[rows], ipc)])
    return np.concatenate(picks), accuracies


def select_into_state(state, config, dataset, key, exp_dir):
    """The initial state with its images replaced by the coreset of `config.method`.

    Called once per experiment when `config.method` is herding or kcenter; writes the selection
    (training indices, the feature network's per-epoch test accuracy) to `exp_dir/coreset.json`
    from process 0.

    Args:
        state: `distill.init_state`'s state (class-major labels, zero momentum).
        config: the run's ConfigDict.
        dataset: the run's `data.Dataset` (after any validation split).
        key: the experiment's init key.
        exp_dir: the experiment's directory.

    Returns:
        The state with the selected images, preprocessed like the dataset.
    """
    model_name = config.eval.models[0]
    indices, accuracies = select(jax.random.fold_in(key, _FEATURES), dataset, config.method,
                                 int(config.ipc), model_name, config.coreset)
    logging.info("%s: %d images selected with %s features (test acc %.4f)", config.method,
                 indices.size, model_name, accuracies[-1])
    if jax.process_index() == 0:
        interop.write_json(os.path.join(exp_dir, SELECTION_NAME), {
            "method": config.method,
            "feature_model": model_name,
            "feature_test_accuracy_per_epoch": [float(a) for a in accuracies],
            "train_indices": indices.tolist(),
            "note": "indices into the training set the run used (after any validation split)",
        })
    images = dataset.preprocessing.preprocess(dataset.x_train[indices])
    return state.replace(images=jnp.asarray(images, state.images.dtype))
