"""Re-evaluation of a run's saved synthetic sets on other architectures (SPEC 8, 2.3, 4.3).

The reference never evaluates during distillation under eval modes other than S/SS (quirk 15); its
cross-architecture numbers come from loading a saved set, applying the x4 expansion and calling the
evaluation protocol per architecture. `reevaluate` does that for every finished experiment of a
workdir (`exp{e}/synthetic`, the un-expanded final snapshot) and appends one entry per architecture
to the run's `results.json` under "reevaluations".

Keys: network j of architecture `name` on experiment e uses
`fold_in(fold_in(fold_in(fold_in(PRNGKey(seed), e), _REEVAL), crc32(name)), j)`, so a
re-evaluation is a deterministic function of (config, saved set), independent of the order of the
architectures and distinct from the run's own evaluations.
"""

import datetime
import json
import os
import re
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bacon_jax import checkpointing, config_lib, data, distill, errors, evaluation, models, train
from bacon_jax import workdir as workdir_lib

# fold_in tag of an experiment's key; train.py uses 0 (init) and 1 (its own evaluations).
_REEVAL = 2

RESULTS_NAME = "results.json"
REEVALUATIONS_KEY = "reevaluations"

# Fields of the run's config.json that must agree with the config used to re-evaluate it.
_MUST_MATCH = ("dataset.name", "method", "ipc", "expand", "dataset.zca")


def models_for(config, eval_mode=None):
    """The architectures to evaluate: `config.eval.models`, or an eval-mode pool (SPEC 2.3).

    Args:
        config: the run's ConfigDict.
        eval_mode: None, one of `models.EVAL_POOLS` (M/B/W/D/A/P/N/S), or 'SS' for `config.model`.

    Returns:
        Tuple of architecture names, each validated against `models.MODEL_NAMES`.
    """
    if eval_mode == "SS":
        names = (config.model,)
    elif eval_mode:
        names = models.eval_pool(eval_mode)
    else:
        names = tuple(config.eval.models)
    for name in names:
        config_lib.choose("architecture", name, models.MODEL_NAMES)
    return names


def experiment_dirs(workdir):
    """[(e, exp_dir)] of the experiments whose final synthetic set has been saved, by e."""
    found = []
    for entry in os.listdir(workdir):
        match = re.fullmatch(r"exp(\d+)", entry)
        path = os.path.join(workdir, entry)
        if match and os.path.isdir(os.path.join(path, "synthetic")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def model_key(seed, exp, name):
    """The re-evaluation key of architecture `name` on experiment `exp` (see module docstring)."""
    exp_key = jax.random.fold_in(jax.random.PRNGKey(seed), exp)
    return jax.random.fold_in(jax.random.fold_in(exp_key, _REEVAL),
                              zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _lookup(tree, dotted):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check_run_config(config, workdir):
    """Raises UserError when `workdir/config.json` names another dataset, method, ipc or expand."""
    saved = workdir_lib.read_config(workdir)
    if saved is None:
        return
    current = config_lib.to_dict(config)
    mismatched = [
        f"{key}: run {_lookup(saved, key)!r} vs config {_lookup(current, key)!r}"
        for key in _MUST_MATCH
        if _lookup(saved, key) is not None and _lookup(saved, key) != _lookup(current, key)
    ]
    if mismatched:
        raise errors.UserError(
            f"{workdir} was written by a different config ({', '.join(mismatched)}). Pass the "
            f"--config that produced the run."
        )


def load_saved_set(exp_dir, config, dataset_spec):
    """(images, labels) of `exp_dir/synthetic`, checked against the config's shapes."""
    tree = checkpointing.load_pytree(os.path.join(exp_dir, "synthetic"))
    # Through numpy: Orbax restores arrays committed to one device, which jit refuses to mix with
    # the evaluation's arrays spread over every device.
    images = jnp.asarray(np.asarray(tree["images"]), jnp.float32)
    labels = jnp.asarray(np.asarray(tree["labels"]), jnp.int32)
    expected = (dataset_spec.num_classes * int(config.ipc),) + tuple(dataset_spec.image_shape)
    if images.shape != expected:
        raise ValueError(
            f"{exp_dir}/synthetic holds images of shape {images.shape}; the config expects "
            f"{expected} ({dataset_spec.name}, ipc {config.ipc})."
        )
    return images, labels


def _append_results(workdir, config, entries):
    """Appends `entries` to results.json["reevaluations"] (creating a minimal file if needed)."""
    path = os.path.join(workdir, RESULTS_NAME)
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    else:
        # A run still in progress: train.py writes results.json only when every experiment is done.
        results = {"dataset": config.dataset.name, "method": config.method, "ipc": int(config.ipc)}
    results.setdefault(REEVALUATIONS_KEY, []).extend(entries)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    return results


def reevaluate(config, workdir, *, eval_mode=None, command=""):
    """Evaluates every saved synthetic set of `workdir` on each architecture; appends the results.

    The SPEC 8 protocol of `config.eval` (epochs, num_eval, DSA, ...) trains `num_eval` fresh
    networks per experiment on the set, expanded x4 when `config.expand` (SPEC 4.3). Statistics are
    over all experiments' networks (mean and population std in percent, A9).

    Args:
        config: the ConfigDict that produced the run (checked against `workdir/config.json`), with
            any `eval.*` overrides for this re-evaluation.
        workdir: a finished or partly finished run directory; experiments without a saved final set
            are skipped.
        eval_mode: optional eval-mode pool that replaces `config.eval.models` (see `models_for`).
        command: the command line, recorded with the results.

    Returns:
        The list of entries appended to results.json["reevaluations"], one per architecture.

    Raises:
        errors.UserError: no experiment of `workdir` has a saved synthetic set, the config does not
            match the run, names an unknown architecture or mode, or one that cannot take the
            images; or another process holds the workdir's lock (`workdir.locked`: a run still
            writing there, or another re-evaluation).
    """
    config_lib.validate(config)
    names = models_for(config, eval_mode)
    check_run_config(config, workdir)
    dataset_spec = data.DATASETS[config.dataset.name]
    for name in names:  # before any training
        try:
            models.check_architecture(name, dataset_spec.num_classes, dataset_spec.image_shape)
        except ValueError as error:  # names the architecture and the image shape
            raise errors.UserError(str(error)) from None
    experiments = experiment_dirs(workdir) if os.path.isdir(workdir) else []
    if not experiments:
        raise errors.UserError(
            f"No saved synthetic set under {workdir} (expected exp<e>/synthetic/, written when an "
            f"experiment finishes)."
        )
    with workdir_lib.locked(workdir):
        return _reevaluate(config, workdir, names, experiments, eval_mode, command)


def _reevaluate(config, workdir, names, experiments, eval_mode, command):
    """`reevaluate` once everything is checked and the workdir is locked."""
    dataset = data.load_dataset(config.dataset)
    mesh = train.make_mesh(config)
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size, mesh=mesh)
    test_images = jnp.asarray(dataset.x_test)
    test_labels = jnp.asarray(dataset.y_test, jnp.int32)
    accuracies = {name: [] for name in names}
    for exp, exp_dir in experiments:
        images, labels = distill.training_set(*load_saved_set(exp_dir, config, dataset.spec), spec)
        for name in names:
            eval_spec = evaluation.spec_from_config(config, name, dataset.spec, mesh=mesh)
            values = evaluation.evaluate_synthetic(
                model_key(int(config.seed), exp, name), images, labels, test_images, test_labels,
                dataset.preprocessing, int(config.eval.num_eval), eval_spec,
            )
            accuracies[name].extend(train.percent(values).tolist())
            logging.info("[exp %d] %s: %.2f +- %.2f", exp, name, 100 * np.mean(values),
                         100 * np.std(values))
    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = []
    for name in names:
        summary = train.summarize(accuracies[name])  # in percent
        entries.append({
            "model": name,
            **summary,
            "experiments": [exp for exp, _ in experiments],
            "eval_epochs": int(config.eval.epochs),
            "num_eval": int(config.eval.num_eval),
            "eval_mode": eval_mode,
            "expand": bool(config.expand),
            "seed": int(config.seed),
            "timestamp": timestamp,
            "command": command,
        })
        logging.info("%s %s ipc%d %s: %.2f +- %.2f (%d runs)", config.dataset.name, config.method,
                     config.ipc, name, summary["mean"], summary["std"], summary["num_runs"])
    if jax.process_index() == 0:
        _append_results(workdir, config, entries)
    return entries
