"""The experiment driver: distill `num_exp` synthetic sets, evaluate them, write results.

`train_and_evaluate(config, workdir)` is what `experiments/run.py` calls. Per experiment e the workdir
holds `exp{e}/checkpoints/` (Orbax, resumed automatically), `exp{e}/metrics.jsonl` (per-iteration
scalars), `exp{e}/evals.jsonl` (every evaluation), `exp{e}/synthetic/` (the final synthetic set,
un-expanded, as an Orbax pytree), its export `exp{e}/synthetic.npz` + `synthetic.png` (export.py),
`exp{e}/images_it{it}.png` (the set at every evaluation), TensorBoard event files of the scalars and
accuracies in `exp{e}/`, and `exp{e}/final.json` (its accuracies). The run writes
`config.json`, `manifest.json` (manifest.py: versions, commit, config hash, data fingerprint,
devices, wall time per phase) and `results.json` (per architecture: all accuracies, mean and
population std in percent over num_exp x num_eval networks, SPEC 8 / A9) at the top level.

With `dataset.validation_size` > 0 the held-out images never reach distillation or coreset
selection; every evaluation also scores the validation split, and validation.py keeps the
best-by-validation snapshot (`exp{e}/best_by_validation.{json,npz}`), reported in results.json
beside the final one. `method=herding|kcenter` replace the initial set by a coreset (coreset.py).

Reported accuracy is the evaluation of the state after `iterations` passes (the reference's
it == Iteration evaluation); the reference's one extra pass after it is not run (quirk 12).
"""

import functools
import json
import os
import time

from absl import logging
import jax
import numpy as np

from bacon_jax import checkpointing, config_lib, coreset, data, distill, export, manifest
from bacon_jax import models, parallel, validation
from bacon_jax import teacher as teacher_lib

# fold_in tags of an experiment's key.
_INIT, _EVAL = 0, 1


def _is_writer():
    return jax.process_index() == 0


def _append_jsonl(path, record):
    if _is_writer():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _write_json(path, obj):
    if _is_writer():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


summarize = validation.summarize  # percent, population std (SPEC 8 / A9)


def make_mesh(config):
    """The device mesh of a run: `config.num_devices` devices (0 = all of them)."""
    count = int(config.get("num_devices", 0))
    devices = jax.devices()
    if count > len(devices):
        raise ValueError(f"num_devices={count} but only {len(devices)} devices are visible.")
    return parallel.make_mesh(devices[:count] if count else devices)


def evaluate_state(state, spec, config, dataset, key):
    """Scores of the state's synthetic set on every architecture of `config.eval.models`: test,
    and validation when the dataset holds a split (validation.Scores)."""
    images, labels = distill.training_set(*distill.synthetic_set(state, spec), spec)
    return validation.evaluate(key, images, labels, config, dataset, spec.mesh)


class _Progress:
    """Rate and ETA of the distillation loop, measured after the first (compiling) iteration."""

    def __init__(self, start, total):
        self.start, self.total = start, total
        self.t0, self.it0 = None, None

    def line(self, it, metrics):
        now = time.time()
        if self.t0 is None:
            self.t0, self.it0 = now, it
        scalars = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if it <= self.it0:
            return f"it {it}/{self.total} {scalars} | rate and ETA from the next line on"
        rate = (it - self.it0) / max(now - self.t0, 1e-9)
        eta = (self.total - it) / rate
        return f"it {it}/{self.total} {scalars} | {rate:.3g} it/s, ETA {eta / 60:.1f} min"


def _flush(pending, metrics_path, progress, exp, writer):
    """Fetches the pending per-iteration metrics, stops on NaN/Inf, logs and writes them."""
    fetched = jax.device_get(pending)
    for it, metrics in fetched:
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"Experiment {exp}: non-finite {', '.join(bad)} at iteration {it} "
                f"({values}); stopping before any checkpoint is overwritten."
            )
        _append_jsonl(metrics_path, {"iteration": it, **values, "time": time.time()})
        writer.write_scalars(it, {f"train/{k}": v for k, v in values.items()})
    writer.flush()
    it, metrics = fetched[-1]
    logging.info("[exp %d] %s", exp, progress.line(it + 1, {k: float(v) for k, v in metrics.items()}))
    pending.clear()


def _record_evaluation(writer, exp_dir, it, state, spec, dataset, accuracies):
    """Evaluation accuracies to TensorBoard and the evaluated snapshot as `images_it{it}.png`.

    The grid is denormalised and clipped, one row per class, like the reference's PNGs (SPEC 5.9,
    quirk 31).
    """
    means = {f"eval/{name}": summarize(v)["mean"] for name, v in accuracies.items()}
    writer.write_scalars(it, means)
    writer.flush()
    if _is_writer():
        images, _ = distill.synthetic_set(state, spec)
        export.save_grid_png(os.path.join(exp_dir, f"images_it{it}.png"), images,
                             dataset.preprocessing, spec.ipc, spec.num_classes)


def distill_iterations(config):
    """Distillation iterations of a run: `config.iterations`, or 0 for random/coreset selection."""
    return 0 if config.method in config_lib.SELECTION_METHODS else int(config.iterations)


def final_evaluation_settings(config):
    """The settings the final evaluation's accuracies depend on (besides the set and the seed).

    Stored in `final.json`: a rerun of a finished experiment reuses its accuracies only when these
    are unchanged, and evaluates again otherwise.
    """
    settings = config_lib.to_dict(config.eval)
    for no_effect in ("every", "intermediate", "test_batch_size"):  # schedule and memory only
        del settings[no_effect]
    settings["dsa_families"] = config.dsa_families if config.eval.dsa else None
    return json.loads(json.dumps(settings))  # tuples as lists, as final.json reads back


def check_workdir(config, workdir, dataset_spec):
    """Raises ValueError when a checkpoint in `workdir` cannot be resumed by `config`.

    Checks every experiment before anything is written, so a refused rerun leaves the run's files
    (its `config.json` in particular) as they were. With several processes, all of them check
    before any goes on to create checkpoint directories, so all see the same ones (and open the
    same number of checkpoint managers, whose constructors are collective).
    """
    metadata = checkpointing.state_metadata(config, dataset_spec)
    for exp in range(config.num_exp):
        directory = os.path.join(workdir, f"exp{exp}", "checkpoints")
        if os.path.isdir(directory):
            manager = checkpointing.make_manager(directory)
            try:
                checkpointing.check_resumable(manager, metadata, distill_iterations(config))
            finally:
                manager.close()
    parallel.barrier("bacon_jax: workdir checked")


def run_experiment(config, exp, key, dataset, real, workdir, clock=None):
    """Distills one synthetic set (resuming from the latest checkpoint) and evaluates it.

    `clock` (a manifest.PhaseClock) is charged with the wall time of each phase.

    Returns:
        {architecture: np.ndarray of num_eval accuracies}.
    """
    exp_dir = os.path.join(workdir, f"exp{exp}")
    os.makedirs(exp_dir, exist_ok=True)
    final_path = os.path.join(exp_dir, "final.json")
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=make_mesh(config))
    model = models.get_model(config.model, dataset.spec.num_classes, dataset.spec.image_shape)
    metadata = checkpointing.state_metadata(config, dataset.spec)
    iterations = distill_iterations(config)

    init_key, eval_key = jax.random.fold_in(key, _INIT), jax.random.fold_in(key, _EVAL)
    init_fn = jax.jit(functools.partial(distill.init_state, model=model, spec=spec))
    manager = checkpointing.make_manager(os.path.join(exp_dir, "checkpoints"))
    template = jax.eval_shape(init_fn, init_key, real)
    state = checkpointing.restore_latest(manager, template, metadata, iterations)
    if state is None:
        state = init_fn(init_key, real)
        if config.method in coreset.SELECTORS:
            state = coreset.select_into_state(state, config, dataset, init_key, exp_dir)
    clock = clock or manifest.PhaseClock()
    clock.lap("init", exp)
    start = int(state.step)
    evaluation_settings = final_evaluation_settings(config)
    if os.path.exists(final_path) and start == iterations:
        with open(final_path) as f:
            done = json.load(f)
        # A final.json without "evaluation" (written before it was recorded) is evaluated again.
        if done.get("iteration") == iterations and done.get("evaluation") == evaluation_settings:
            logging.info("[exp %d] already finished; reusing %s", exp, final_path)
            return {k: np.asarray(v) for k, v in done["accuracies"].items()}
        logging.info("[exp %d] already distilled; evaluating it with this config's settings", exp)
    if start:
        logging.info("[exp %d] resumed from iteration %d", exp, start)

    # CMI teachers (SPEC 7): loaded and checked against the dataset when cmi.weight > 0.
    teachers = teacher_lib.load_teachers_from_config(config, dataset.spec)
    teacher_model, teacher_variables = teachers if teachers is not None else (None, None)
    # The canonical state and the real data are replicated over the mesh (parallel.py); pinning
    # the step's outputs to the same placement keeps it from recompiling after the first call.
    replicated = jax.sharding.NamedSharding(spec.mesh, parallel.replicated)
    state, real = jax.device_put((state, real), replicated)
    teacher_variables = jax.device_put(teacher_variables, replicated)
    step_fn = jax.jit(
        functools.partial(distill.distill_step, model=model, spec=spec,
                          teacher_model=teacher_model),
        donate_argnums=0,
        out_shardings=replicated,
    )
    progress = _Progress(start, iterations)
    metrics_path = os.path.join(exp_dir, "metrics.jsonl")
    evals_path = os.path.join(exp_dir, "evals.jsonl")
    writer = export.create_summary_writer(exp_dir, just_logging=not _is_writer())
    pending = []
    for it in range(start, iterations):
        if it > 0 and it % config.eval.every == 0 and config.eval.intermediate:
            clock.lap("distill", exp)
            scores = evaluate_state(state, spec, config, dataset, jax.random.fold_in(eval_key, it))
            validation.record(exp_dir, it, scores, *distill.synthetic_set(state, spec),
                              dataset.preprocessing, config)
            accs = scores.test
            for name, values in accs.items():
                summary = summarize(values)
                _append_jsonl(evals_path, {"iteration": it, "model": name, **summary})
                logging.info("[exp %d] it %d %s: %.2f +- %.2f", exp, it, name, summary["mean"],
                             summary["std"])
            _record_evaluation(writer, exp_dir, it, state, spec, dataset, accs)
            clock.lap("evaluate", exp)
        state, metrics = step_fn(state, real, teacher_variables)
        pending.append((it, metrics))
        done_it = it + 1
        save_now = done_it % config.checkpoint_every == 0 or manager.reached_preemption(done_it)
        if done_it % config.log_every == 0 or save_now or done_it == iterations:
            _flush(pending, metrics_path, progress, exp, writer)
        if save_now:
            checkpointing.save(manager, done_it, state, metadata)
            if manager.reached_preemption(done_it):
                raise SystemExit(f"Preempted at iteration {done_it}; checkpoint saved.")
    if manager.latest_step() != iterations:
        checkpointing.save(manager, iterations, state, metadata)
    clock.lap("distill", exp)

    images, labels = distill.synthetic_set(state, spec)
    checkpointing.save_pytree(
        os.path.join(exp_dir, "synthetic"), {"images": images, "labels": labels}
    )
    if _is_writer():
        export.export_synthetic(exp_dir, images, labels, dataset.preprocessing, config)
    clock.lap("export", exp)
    scores = evaluate_state(
        state, spec, config, dataset, jax.random.fold_in(eval_key, iterations)
    )
    validation.record(exp_dir, iterations, scores, images, labels, dataset.preprocessing, config)
    accuracies = scores.test
    for name, values in accuracies.items():
        summary = summarize(values)
        _append_jsonl(evals_path, {"iteration": iterations, "model": name, **summary})
        logging.info("[exp %d] final (it %d) %s: %.2f +- %.2f", exp, iterations, name,
                     summary["mean"], summary["std"])
    _record_evaluation(writer, exp_dir, iterations, state, spec, dataset, accuracies)
    writer.close()
    _write_json(final_path, {
        "iteration": iterations,
        "accuracies": {k: [float(x) for x in v] for k, v in accuracies.items()},
        "evaluation": evaluation_settings,
    })
    clock.lap("evaluate", exp)
    return accuracies


def train_and_evaluate(config, workdir):
    """Runs `config.num_exp` distillations into `workdir` and writes `results.json`.

    Args:
        config: a validated-on-entry ConfigDict (see configs/default.py for the fields).
        workdir: output directory; rerunning with the same workdir resumes.

    Returns:
        The results dict written to results.json.
    """
    config_lib.validate(config)
    clock = manifest.PhaseClock()
    dataset = data.load_dataset(config.dataset)
    train_data_sha256 = manifest.data_fingerprint(dataset)
    dataset = data.hold_out_validation(dataset, config.dataset.validation_size, config.seed)
    distilled_with = (config.model,) if distill_iterations(config) else ()
    for name in (*distilled_with, *config.eval.models):  # before any distillation is spent
        models.check_architecture(name, dataset.spec.num_classes, dataset.spec.image_shape)
    check_workdir(config, workdir, dataset.spec)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
    real = distill.real_data_from_dataset(dataset)
    clock.lap("load")
    manifest.write_manifest(workdir, config, train_data_sha256, clock)
    logging.info("Dataset %s: %d train / %d test images of shape %s, %d classes", dataset.spec.name,
                 len(dataset.y_train), len(dataset.y_test), dataset.spec.image_shape,
                 dataset.spec.num_classes)
    root = jax.random.PRNGKey(config.seed)
    per_model = {name: [] for name in config.eval.models}
    for exp in range(config.num_exp):
        accuracies = run_experiment(
            config, exp, jax.random.fold_in(root, exp), dataset, real, workdir, clock
        )
        for name, values in accuracies.items():
            per_model[name].extend(np.asarray(values).tolist())
        manifest.write_manifest(workdir, config, train_data_sha256, clock)
    results = {
        "dataset": config.dataset.name,
        "method": config.method,
        "ipc": int(config.ipc),
        "iterations": int(config.iterations),
        "num_exp": int(config.num_exp),
        "num_eval": int(config.eval.num_eval),
        "results": {name: summarize(values) for name, values in per_model.items()},
        "config": config_lib.to_dict(config),
    }
    selected = validation.selected_results(workdir, config)
    if selected:
        results["validation_selected"] = selected
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):  # keep re-evaluations (experiments/evaluate.py) across reruns
        with open(path) as f:
            kept = json.load(f).get("reevaluations")
        if kept:
            results["reevaluations"] = kept
    _write_json(path, results)
    manifest.write_manifest(workdir, config, train_data_sha256, clock, finished=True)
    for name, summary in results["results"].items():
        logging.info("%s %s ipc%d %s: %.2f +- %.2f (%d runs)", config.dataset.name, config.method,
                     config.ipc, name, summary["mean"], summary["std"], summary["num_runs"])
    return results
