"""Evaluation of saved synthetic sets, ours or anyone's, with the protocol of our runs (SPEC 8).

* `reevaluate`: the reference never evaluates during distillation under eval modes other than
  S/SS (quirk 15); its cross-architecture numbers come from loading a saved set, applying the x4
  expansion and calling the evaluation protocol per architecture. `reevaluate` does that for every
  finished experiment of a workdir (`exp{e}/synthetic`, the un-expanded final snapshot) and
  appends one entry per architecture to the run's `results.json` under "reevaluations".
* `evaluate_external`: a set another program wrote (an image folder, `.npz`, safetensors, a
  PyTorch `.pt` or pickle; interop.py reads them), or one of our exports, converted into the
  networks' input space of the config's dataset and evaluated the same way; one entry per
  architecture is appended to `<output>/results.json` under "imports".

Keys: network j of architecture `name` on experiment e uses
`fold_in(fold_in(fold_in(fold_in(PRNGKey(seed), e), _REEVAL), crc32(name)), j)`, so a
re-evaluation is a deterministic function of (config, saved set), independent of the order of the
architectures and distinct from the run's own evaluations. An imported file's set s (a DC/DM
`res_*.pt` holds one per experiment) uses `fold_in(PRNGKey(seed), _IMPORTED)` in place of the
experiment's key, with s in place of e.
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

from bacon_jax import augment, checkpointing, config_lib, data, distill, errors, evaluation
from bacon_jax import interop, models, train
from bacon_jax import workdir as workdir_lib

# fold_in tag of an experiment's key; train.py uses 0 (init) and 1 (its own evaluations).
_REEVAL = 2
# fold_in tag of imported sets' keys, in place of an experiment index (train.py folds 0, 1, ...).
_IMPORTED = 0x1A7

RESULTS_NAME = "results.json"
REEVALUATIONS_KEY = "reevaluations"
IMPORTS_KEY = "imports"

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


def _architecture_key(key, name):
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def model_key(seed, exp, name):
    """The re-evaluation key of architecture `name` on experiment `exp` (see module docstring)."""
    exp_key = jax.random.fold_in(jax.random.PRNGKey(seed), exp)
    return _architecture_key(jax.random.fold_in(exp_key, _REEVAL), name)


def import_key(seed, index, name):
    """The key of architecture `name` on set `index` of an imported file (see module docstring)."""
    imported = jax.random.fold_in(jax.random.PRNGKey(seed), _IMPORTED)
    return _architecture_key(jax.random.fold_in(imported, index), name)


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


def _append_results(directory, key, entries, new_file):
    """Appends `entries` to `directory/results.json[key]`; a missing file starts as `new_file`."""
    path = os.path.join(directory, RESULTS_NAME)
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    else:
        results = dict(new_file)
    results.setdefault(key, []).extend(entries)
    interop.write_json(path, results)
    return results


def _timestamp():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _protocol(config, eval_mode=None):
    """The evaluation settings an entry's accuracies depend on (besides the set and the seed)."""
    return {
        "eval_epochs": int(config.eval.epochs),
        "num_eval": int(config.eval.num_eval),
        "dsa": bool(config.eval.dsa),
        "eval_mode": eval_mode,
        "seed": int(config.seed),
    }


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
    timestamp = _timestamp()
    entries = []
    for name in names:
        summary = train.summarize(accuracies[name])  # in percent
        entries.append({
            "model": name,
            **summary,
            "experiments": [exp for exp, _ in experiments],
            **_protocol(config, eval_mode),
            "expand": bool(config.expand),
            "timestamp": timestamp,
            "command": command,
        })
        logging.info("%s %s ipc%d %s: %.2f +- %.2f (%d runs)", config.dataset.name, config.method,
                     config.ipc, name, summary["mean"], summary["std"], summary["num_runs"])
    if jax.process_index() == 0:
        # A run still in progress: train.py writes results.json only when every experiment is done.
        _append_results(workdir, REEVALUATIONS_KEY, entries, {
            "dataset": config.dataset.name, "method": config.method, "ipc": int(config.ipc)})
    return entries


def _expansion(requested, prepared):
    """Whether to train on the x4 expansion: as requested, else as our export records, else no."""
    if requested is not None:
        return bool(requested)
    recorded = prepared.info.get("recorded")
    return bool(recorded["expand"]) if recorded else False


def evaluate_external(config, set_path, output_dir, *, set_format="auto", preprocessing=None,
                      expand=None, allow_pickle=False, labels_path=None, method="imported",
                      eval_mode=None, command=""):
    """Evaluates a synthetic set from a file or folder with the SPEC 8 protocol of `config`.

    `eval.num_eval` fresh networks per architecture (`config.eval.models`, or an eval-mode pool)
    train on the set, expanded x4 first when `expand`, and are tested on the dataset's test set.
    Every set of a file (one per experiment in a DC/DM `res_*.pt`) is evaluated; accuracies are
    pooled over them (mean and population std in percent, A9).

    Args:
        config: a ConfigDict of the set's dataset (`dataset.*`), with the evaluation settings.
        set_path: the image folder or file (interop.read_sets).
        output_dir: where `results.json` gets the entries (created if needed).
        set_format: 'auto' or one of interop.FORMATS.
        preprocessing: the space the stored images are in (interop.PREPROCESSINGS), or None (what
            our exports record; pixels for folders and uint8; else normalized).
        expand: train on the x4 quadrant expansion (SPEC 4.3); None = what our export records,
            else False.
        allow_pickle: allow unpickling `set_path` (interop's pickle format).
        labels_path: labels for a file of images alone.
        method: the name the results table shows for the set.
        eval_mode: optional eval-mode pool replacing `config.eval.models` (see `models_for`).
        command: the command line, recorded with the results.

    Returns:
        The entries appended to results.json["imports"], one per architecture.
    """
    config_lib.validate(config)
    names = models_for(config, eval_mode)
    dataset_spec = data.DATASETS[config.dataset.name]
    for name in names:  # before any file is read or network trained
        models.check_architecture(name, dataset_spec.num_classes, dataset_spec.image_shape)
    raw_sets = interop.read_sets(set_path, dataset_spec, set_format, labels_path=labels_path,
                                 allow_pickle=allow_pickle)
    dataset = data.load_dataset(config.dataset)
    prepared = [interop.prepare(raw, dataset, preprocessing) for raw in raw_sets]
    mesh = train.make_mesh(config)
    test_images = jnp.asarray(dataset.x_test)
    test_labels = jnp.asarray(dataset.y_test, jnp.int32)
    accuracies = {name: [] for name in names}
    expansions = []
    for index, one_set in enumerate(prepared):
        images, labels = jnp.asarray(one_set.images), jnp.asarray(one_set.labels)
        expansions.append(_expansion(expand, one_set))
        if expansions[-1]:
            images, labels = augment.expand_quadrants(images, labels)
        for name in names:
            eval_spec = evaluation.spec_from_config(config, name, dataset.spec, mesh=mesh)
            values = evaluation.evaluate_synthetic(
                import_key(int(config.seed), index, name), images, labels, test_images,
                test_labels, dataset.preprocessing, int(config.eval.num_eval), eval_spec)
            values = train.percent(values)
            accuracies[name].extend(values.tolist())
            logging.info("[%s] %s: %.2f +- %.2f", one_set.info["source"], name,
                         np.mean(values), np.std(values))
    first = prepared[0].info
    described = {
        "dataset": config.dataset.name,
        "method": method,
        "ipc": first["ipc"] if all(p.info["ipc"] == first["ipc"] for p in prepared) else None,
        "source": os.path.abspath(set_path),
        "sets": [p.info for p in prepared],
        "expand": expansions[0] if len(set(expansions)) == 1 else expansions,
        "preprocessing_stated": preprocessing,
        **_protocol(config, eval_mode),
        "timestamp": _timestamp(),
        "command": command,
    }
    entries = [{"model": name, **train.summarize(accuracies[name]), **described}
               for name in names]
    for entry in entries:
        logging.info("%s (%s, ipc %s) %s: %.2f +- %.2f (%d runs)", set_path, method,
                     entry["ipc"], entry["model"], entry["mean"], entry["std"], entry["num_runs"])
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        _append_results(output_dir, IMPORTS_KEY, entries, {})
    return entries
