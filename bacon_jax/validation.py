"""Fair evaluation: score on a held-out validation split, and pick any "best" set by it, not by test.

The reference keeps a "best" synthetic set chosen by test accuracy at its intermediate
evaluations (SPEC 5.9, quirks 12 and 32): a number selected on the test set. With
`config.dataset.validation_size` > 0, `data.hold_out_validation` takes that many training images
per class out of everything the run learns from, and here:

* `evaluate` trains the `eval.num_eval` networks of each `eval.models` architecture once (SPEC 8:
  the protocol itself never picks an epoch; it tests once after the last one) and scores them on
  the test set and on the validation split (`evaluation.accuracy`, no retraining);
* `record` keeps, per experiment, every evaluation point's scores and the snapshot with the best
  mean validation accuracy of `eval.models[0]` (ties go to the later iteration) in
  `exp{e}/best_by_validation.json`, and its synthetic set as `exp{e}/best_by_validation.npz`; the
  JSON is re-read on resume;
* `selected_results` pools the selected snapshots' test accuracies for results.json, beside the
  final iteration's (the reported number, SPEC A9).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bacon_jax import evaluation, export, interop

RECORD_NAME = "best_by_validation.json"
SET_NAME = "best_by_validation.npz"


def percent(fractions):
    """Accuracies as fractions (what `evaluation` returns) in percent, float64."""
    return np.asarray(fractions, np.float64) * 100.0


def summarize(accuracies):
    """{'accuracies', 'mean', 'std', 'num_runs'} of accuracies in percent; std is the population std.

    Args:
        accuracies: accuracies in percent (`percent` of the evaluation's fractions).
    """
    values = np.asarray(accuracies, np.float64)
    return {
        "accuracies": [float(v) for v in values],
        "mean": float(values.mean()),
        "std": float(values.std()),
        "num_runs": int(values.size),
    }


@dataclasses.dataclass(frozen=True)
class Scores:
    """Accuracies (percent) of one evaluation point's networks, per architecture.

    Attributes:
        test: {architecture: [num_eval] test accuracies}.
        validation: {architecture: [num_eval] validation accuracies}; empty without a split.
    """

    test: dict
    validation: dict


def evaluate(key, images, labels, config, dataset, mesh=None, progress_for=None):
    """Trains `eval.num_eval` networks per `eval.models` architecture on a set; scores them.

    Network j of architecture i uses fold_in(fold_in(key, i), j) (evaluation.train_networks).

    Args:
        key: PRNG key of this evaluation point.
        images: [N, H, W, C] training images in model input space (expanded when needed).
        labels: [N] int32.
        config: the run's ConfigDict (`eval.*`).
        dataset: the run's `data.Dataset` (test set, and `x_val`/`y_val` when held out).
        mesh: devices the networks are split over (None: all).
        progress_for: optional `(name, later_names) -> callback` giving each architecture's
            `evaluation.train_networks` progress callback.

    Returns:
        Scores (percent) on the test set and, when the dataset holds one, the validation split.
    """
    splits = {"test": (dataset.x_test, dataset.y_test)}
    if dataset.x_val is not None:
        splits["validation"] = (dataset.x_val, dataset.y_val)
    splits = {name: (jnp.asarray(x), jnp.asarray(y, jnp.int32)) for name, (x, y) in splits.items()}
    scores = {name: {} for name in ("test", "validation")}
    names = tuple(config.eval.models)
    for index, model_name in enumerate(names):
        eval_spec = evaluation.spec_from_config(config, model_name, dataset.spec, mesh=mesh)
        callback = progress_for(model_name, names[index + 1:]) if progress_for else None
        trained = evaluation.train_networks(jax.random.fold_in(key, index), images, labels,
                                            int(config.eval.num_eval), eval_spec,
                                            progress=callback)
        for split, (x, y) in splits.items():
            scores[split][model_name] = percent(
                evaluation.accuracy(trained, x, y, dataset.preprocessing))
    return Scores(**scores)


def load_record(exp_dir):
    """The experiment's `best_by_validation.json` as a dict, or None before its first entry."""
    path = os.path.join(exp_dir, RECORD_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def record(exp_dir, iteration, scores, images, labels, preprocessing, config):
    """Adds one evaluation point to the experiment's record; saves its set when it is the best.

    Does nothing without a validation split. Process 0 writes.

    Args:
        exp_dir: the experiment's directory.
        iteration: the evaluated state's iteration.
        scores: `evaluate`'s Scores at that point.
        images, labels: the evaluated snapshot, un-expanded (`distill.synthetic_set`).
        preprocessing: the dataset's `data.Preprocessing` (stored with the set).
        config: the run's ConfigDict.

    Returns:
        The updated record, or None without a validation split.
    """
    if not scores.validation:
        return None
    selector = config.eval.models[0]
    entry = {
        "iteration": int(iteration),
        "validation": {name: summarize(v) for name, v in scores.validation.items()},
        "test": {name: summarize(v) for name, v in scores.test.items()},
    }
    previous = load_record(exp_dir) or {"history": [], "best": None}
    # A point evaluated again after a resume replaces its earlier entry.
    history = [e for e in previous["history"] if e["iteration"] != entry["iteration"]]
    best = previous["best"]
    if best is not None and best["iteration"] == entry["iteration"]:
        best = None
    if best is None or (entry["validation"][selector]["mean"]
                        >= best["validation"][selector]["mean"]):
        best = entry
        if jax.process_index() == 0:
            export.export_npz(os.path.join(exp_dir, SET_NAME), images, labels, preprocessing,
                              dataset=config.dataset.name, method=config.method,
                              ipc=int(config.ipc), expand=bool(config.expand))
    updated = {
        "selected_by": f"mean validation accuracy of {selector}; ties go to the later iteration",
        "validation_size": int(config.dataset.validation_size),
        "history": sorted(history + [entry], key=lambda e: e["iteration"]),
        "best": best,
    }
    if jax.process_index() == 0:
        interop.write_json(os.path.join(exp_dir, RECORD_NAME), updated)
    return updated


def selected_results(workdir, config):
    """results.json's "validation_selected": the best-by-validation snapshots of every experiment.

    Returns:
        None without a validation split; else {'iterations': [per experiment], 'results':
        {architecture: summary of the selected snapshots' test accuracies, pooled over
        experiments}, 'validation': the same for their validation accuracies, 'selected_by': ...}.
    """
    if not config.dataset.get("validation_size", 0):
        return None
    records = [load_record(os.path.join(workdir, f"exp{exp}")) for exp in range(config.num_exp)]
    bests = [r["best"] for r in records if r and r["best"]]
    if not bests:
        return None

    def pooled(split):
        return {name: summarize([a for b in bests for a in b[split][name]["accuracies"]])
                for name in bests[0][split]}

    return {
        "selected_by": records[0]["selected_by"],
        "iterations": [b["iteration"] for b in bests],
        "results": pooled("test"),
        "validation": pooled("validation"),
    }
