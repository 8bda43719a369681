"""The experiment driver: distill `num_exp` synthetic sets, evaluate them, write results.

`train_and_evaluate(config, workdir)` is what `experiments/run.py` calls. Per experiment e the workdir
holds `exp{e}/checkpoints/` (Orbax, resumed automatically), `exp{e}/metrics.jsonl` (per-iteration
scalars), `exp{e}/evals.jsonl` (every evaluation), `exp{e}/synthetic/` (the final synthetic set,
un-expanded, as an Orbax pytree), its export `exp{e}/synthetic.npz` + `synthetic.png` (export.py),
`exp{e}/images_it{it}.png` (the set at every evaluation), one TensorBoard event file of the scalars
and accuracies in `exp{e}/`, and `exp{e}/final.json` (its accuracies). The run writes
`config.json`, `manifest.json` (manifest.py: versions, commit, config hash, data fingerprint,
devices, wall time per phase) and `results.json` (per architecture: all accuracies, mean and
population std over num_exp x num_eval networks, SPEC 8 / A9) at the top level. Accuracies are in
percent everywhere.

A rerun into the same workdir resumes, and is refused (before anything is written) when its config
differs from the workdir's config.json where that would relabel results
(`config_lib.check_rerun`). While a run writes, it holds the workdir's lock (`workdir.locked`). A
resumed experiment drops the rows of `metrics.jsonl` and `evals.jsonl` from the restored iteration
on and rewrites its event file from the rows kept, so no step is logged twice.

With `dataset.validation_size` > 0 the held-out images never reach distillation or coreset
selection; every evaluation also scores the validation split, and validation.py keeps the
best-by-validation snapshot (`exp{e}/best_by_validation.{json,npz}`), reported in results.json
beside the final one. `method=herding|kcenter` replace the initial set by a coreset (coreset.py).

Reported accuracy is the evaluation of the state after `iterations` passes (the reference's
it == Iteration evaluation); the reference's one extra pass after it is not run (quirk 12).
"""

import functools
import glob
import json
import os
import time

from absl import logging
import jax
import numpy as np

from bacon_jax import backend, checkpointing, config_lib, coreset, data, distill, errors, export
from bacon_jax import manifest, models, parallel, progress, validation
from bacon_jax import teacher as teacher_lib
from bacon_jax import workdir as workdir_lib

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


percent = validation.percent  # fractions (what `evaluation` returns) -> percent, float64
summarize = validation.summarize  # of accuracies in percent; population std (SPEC 8 / A9)


def make_mesh(config):
    """The device mesh of a run: `config.num_devices` devices (0 = all of them)."""
    count = int(config.get("num_devices", 0))
    devices = jax.devices()
    if count > len(devices):
        raise errors.UserError(
            f"num_devices={count} but only {len(devices)} devices are visible; use "
            f"num_devices=0 (all) or at most {len(devices)}.")
    return parallel.make_mesh(devices[:count] if count else devices)


def evaluate_state(state, spec, config, dataset, key, progress_for=None):
    """Evaluates the state's synthetic set on every architecture of `config.eval.models`.

    Args:
        state, spec: the DistillState and its DistillSpec.
        config: the run's ConfigDict.
        dataset: the data.Dataset (its test split is scored, and its validation split if held out).
        key: PRNG key; architecture i uses fold_in(key, i).
        progress_for: optional `(name, later_names) -> callback` giving each architecture's
            `evaluation.train_networks` progress callback.

    Returns:
        validation.Scores in percent: test, and validation when the dataset holds a split.
    """
    images, labels = distill.training_set(*distill.synthetic_set(state, spec), spec)
    return validation.evaluate(key, images, labels, config, dataset, spec.mesh, progress_for)


def _flush(pending, metrics_path, line, exp, writer):
    """Fetches the pending per-iteration metrics, stops on NaN/Inf, logs and writes them."""
    fetched = jax.device_get(pending)
    for it, metrics in fetched:
        values = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if bad:
            raise errors.UserError(
                f"Experiment {exp} diverged: non-finite {', '.join(bad)} at iteration {it} "
                f"({values}); stopped before any checkpoint is overwritten. Try a lower lr_img "
                f"(or lr_net) in a new --workdir."
            )
        _append_jsonl(metrics_path, {"iteration": it, **values, "time": time.time()})
        writer.write_scalars(it, _train_scalars(values))
    writer.flush()
    it, metrics = fetched[-1]
    logging.info("%s", line(it + 1, {k: float(v) for k, v in metrics.items()}))
    pending.clear()


def _train_scalars(metrics):
    """TensorBoard tags of a metrics.jsonl row (its iteration and time are not scalars)."""
    return {f"train/{k}": v for k, v in metrics.items() if k not in ("iteration", "time")}


def _eval_scalars(rows):
    """TensorBoard tags of evals.jsonl rows of one iteration: each architecture's mean."""
    return {f"eval/{row['model']}": row["mean"] for row in rows}


# Event files being replaced by `_rewind`; a name without "tfevents", which TensorBoard ignores.
_SUPERSEDED = "superseded_events_"


def _rewind(exp_dir, start):
    """Rewinds an experiment's logs to iteration `start`; returns its TensorBoard writer.

    Rows of `metrics.jsonl` and `evals.jsonl` from `start` on (work redone after a resume) are
    dropped, and the experiment's event files are replaced by one rebuilt from the rows kept:
    TensorBoard then shows one stream per experiment with no step twice. The old files are moved
    out of TensorBoard's sight before the new one is written and removed after, so a crash in
    between loses nothing that the JSON-lines rows do not hold.
    """
    if not _is_writer():
        return export.create_summary_writer(exp_dir, just_logging=True)
    metrics = workdir_lib.truncate_jsonl(os.path.join(exp_dir, "metrics.jsonl"), start)
    evals = workdir_lib.truncate_jsonl(os.path.join(exp_dir, "evals.jsonl"), start)
    old = sorted(glob.glob(os.path.join(exp_dir, _SUPERSEDED + "*")))  # left by a crash
    moved = {}
    for index, path in enumerate(sorted(glob.glob(os.path.join(exp_dir, "events.out.tfevents.*")))):
        moved[path] = os.path.join(exp_dir, f"{_SUPERSEDED}{os.getpid()}_{index}")
        os.rename(path, moved[path])
    writer = export.create_summary_writer(exp_dir)
    if not writer.active:  # no tensorboardX: leave the files as they were
        for path, aside in moved.items():
            os.rename(aside, path)
        return writer
    old += list(moved.values())
    for row in metrics:
        writer.write_scalars(row["iteration"], _train_scalars(row))
    for it in sorted({row["iteration"] for row in evals}):
        writer.write_scalars(it, _eval_scalars([row for row in evals if row["iteration"] == it]))
    writer.flush()
    for path in old:
        os.remove(path)
    return writer


def _record_evaluation(writer, exp_dir, evals_path, exp, it, state, spec, dataset, accuracies,
                       label):
    """Logs, appends to evals.jsonl and TensorBoard an evaluation; saves the set's grid PNG.

    The grid `images_it{it}.png` is denormalised and clipped, one row per class, like the
    reference's PNGs (SPEC 5.9, quirk 31).
    """
    rows = []
    for name, values in accuracies.items():
        summary = summarize(values)
        rows.append({"iteration": it, "model": name, **summary})
        _append_jsonl(evals_path, rows[-1])
        logging.info("[exp %d] %s %s: %.2f +- %.2f", exp, label, name, summary["mean"],
                     summary["std"])
    writer.write_scalars(it, _eval_scalars(rows))
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

    The `eval.*` fields that `config_lib.RERUN_FIELDS` marks EVALUATION, and the DSA families
    when evaluation uses DSA. Stored in `final.json`: a rerun of a finished experiment reuses its
    accuracies only when these are unchanged, and evaluates again otherwise.
    """
    settings = {
        field.removeprefix("eval."): config_lib.lookup(config, field)
        for field, kind in config_lib.RERUN_FIELDS.items() if kind == config_lib.EVALUATION
    }
    settings["dsa_families"] = config.dsa_families if config.eval.dsa else None
    return json.loads(json.dumps(settings))  # tuples as lists, as final.json reads back


def check_architectures(config, dataset_spec):
    """Raises UserError when the distillation network or an evaluated one cannot take the images."""
    distilled_with = (config.model,) if distill_iterations(config) else ()
    for name in (*distilled_with, *config.eval.models):
        try:
            models.check_architecture(name, dataset_spec.num_classes, dataset_spec.image_shape)
        except ValueError as error:  # names the architecture and the image shape
            raise errors.UserError(str(error)) from None


def check_saved_config(config, workdir):
    """Raises UserError when `workdir`'s config.json records a run that `config` cannot continue.

    See `config_lib.check_rerun`. config.json is written when a run starts, so a run still in
    progress is seen too.
    """
    saved = workdir_lib.read_config(workdir)
    if saved is not None:
        config_lib.check_rerun(saved, config, workdir)


def check_workdir(config, workdir, dataset_spec):
    """Raises UserError when `workdir` holds a run that `config` cannot continue.

    The workdir's config.json must agree with `config` (`check_saved_config`), and every
    experiment's checkpoints must be resumable by it. Checks everything before anything is written, so a
    refused rerun leaves the run's files (its `config.json` in particular) as they were. With
    several processes, all of them check before any goes on to create checkpoint directories, so
    all see the same ones (and open the same number of checkpoint managers, whose constructors
    are collective).
    """
    check_saved_config(config, workdir)
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


def _read_final(final_path, iterations, evaluation_settings):
    """The accuracies (percent) of a finished experiment's final.json, if this config may reuse them.

    A final.json without "evaluation" (written before it was recorded) is evaluated again; one
    without "unit" was written in fractions and is converted.
    """
    with open(final_path) as f:
        done = json.load(f)
    if done.get("iteration") != iterations or done.get("evaluation") != evaluation_settings:
        return None
    scale = 1.0 if done.get("unit") == "percent" else 100.0
    return {k: np.asarray(v, np.float64) * scale for k, v in done["accuracies"].items()}


def _interrupted(exp, reached, iterations, manager):
    """The Interrupted error of Ctrl-C in experiment `exp`, with the resume hint."""
    latest = manager.latest_step()
    where = ("during its final evaluation" if reached == iterations
             else f"at iteration {reached} of {iterations}")
    kept = (f"the latest checkpoint is iteration {latest} in {manager.directory}"
            if latest is not None else "it has no checkpoint yet")
    return errors.Interrupted(
        f"Interrupted in experiment {exp} {where}; {kept}. Rerun the same command to resume "
        f"from there.")


def run_experiment(config, exp, key, dataset, real, workdir, estimate=None, clock=None):
    """Distills one synthetic set (resuming from the latest intact checkpoint) and evaluates it.

    Args:
        config, exp, key: the run's config, the experiment's index and its PRNG key.
        dataset, real: the data.Dataset and its device-side distill.RealData.
        workdir: the run directory.
        estimate: the run's progress.RunEstimate (default: one for this config).
        clock: the run's manifest.PhaseClock, charged with the wall time of each phase.

    Returns:
        {architecture: np.ndarray of num_eval accuracies in percent}.

    Raises:
        errors.Interrupted: on Ctrl-C, naming the iteration reached and the latest checkpoint.
    """
    exp_dir = os.path.join(workdir, f"exp{exp}")
    os.makedirs(exp_dir, exist_ok=True)
    final_path = os.path.join(exp_dir, "final.json")
    spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                    mesh=make_mesh(config))
    model = models.get_model(config.model, dataset.spec.num_classes, dataset.spec.image_shape,
                             fused=spec.fused_blocks)
    metadata = checkpointing.state_metadata(config, dataset.spec)
    iterations = distill_iterations(config)
    if estimate is None:
        estimate = progress.RunEstimate.from_config(config, iterations)

    init_key, eval_key = jax.random.fold_in(key, _INIT), jax.random.fold_in(key, _EVAL)
    compiler_options = backend.jit_options(spec.compiler_options)
    init_fn = jax.jit(functools.partial(distill.init_state, model=model, spec=spec),
                      compiler_options=compiler_options)
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
        reused = _read_final(final_path, iterations, evaluation_settings)
        if reused is not None:
            logging.info("[exp %d] already finished; reusing %s", exp, final_path)
            return reused
        logging.info("[exp %d] already distilled; evaluating it with this config's settings", exp)
    if start:
        logging.info("[exp %d] resumed from iteration %d", exp, start)
    writer = _rewind(exp_dir, start)
    reached = start
    try:
        # CMI teachers (SPEC 7): loaded and checked against the dataset when cmi.weight > 0.
        teachers = teacher_lib.load_teachers_from_config(config, dataset.spec)
        teacher_model, teacher_variables = teachers if teachers is not None else (None, None)
        # The canonical state and the real data are replicated over the mesh (parallel.py);
        # pinning the step's outputs to the same placement keeps it from recompiling after the
        # first call.
        replicated = jax.sharding.NamedSharding(spec.mesh, parallel.replicated)
        state, real = jax.device_put((state, real), replicated)
        teacher_variables = jax.device_put(teacher_variables, replicated)
        step_fn = jax.jit(
            functools.partial(distill.distill_step, model=model, spec=spec,
                              teacher_model=teacher_model),
            donate_argnums=0,
            out_shardings=replicated,
            compiler_options=compiler_options,
        )
        line = progress.DistillProgress(iterations, estimate, exp).line
        metrics_path = os.path.join(exp_dir, "metrics.jsonl")
        evals_path = os.path.join(exp_dir, "evals.jsonl")

        def evaluate(it, label):
            def progress_for(name, later):
                logging.info("[exp %d] evaluation at it %d, %s: training %d networks x %d epochs "
                             "(the first epoch compiles)", exp, it, name, config.eval.num_eval,
                             config.eval.epochs + 1)
                return progress.EvalProgress(estimate, exp, it, name, later,
                                             estimate.net_epochs)

            clock.lap("distill", exp)
            scores = evaluate_state(state, spec, config, dataset,
                                    jax.random.fold_in(eval_key, it), progress_for)
            validation.record(exp_dir, it, scores, *distill.synthetic_set(state, spec),
                              dataset.preprocessing, config)
            _record_evaluation(writer, exp_dir, evals_path, exp, it, state, spec, dataset,
                               scores.test, label)
            clock.lap("evaluate", exp)
            return scores.test

        pending = []
        for it in range(start, iterations):
            if it > 0 and it % config.eval.every == 0 and config.eval.intermediate:
                evaluate(it, f"it {it}")
            if it == start:
                logging.info("[exp %d] compiling distill_step for %s on %d device(s) (first "
                             "iteration) ...", exp, config.method, spec.mesh.size)
                began = time.monotonic()
            state, metrics = step_fn(state, real, teacher_variables)
            if it == start:
                logging.info("[exp %d] compiled in %.1f s", exp, time.monotonic() - began)
            pending.append((it, progress.shown_metrics(metrics, config)))
            reached = done_it = it + 1
            save_now = done_it % config.checkpoint_every == 0 or manager.reached_preemption(done_it)
            if done_it % config.log_every == 0 or save_now or done_it == iterations:
                _flush(pending, metrics_path, line, exp, writer)
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
        accuracies = evaluate(iterations, f"final (it {iterations})")
    except KeyboardInterrupt:
        raise _interrupted(exp, reached, iterations, manager) from None
    finally:
        writer.close()
    _write_json(final_path, {
        "iteration": iterations,
        "unit": "percent",
        "accuracies": {k: [float(x) for x in v] for k, v in accuracies.items()},
        "evaluation": evaluation_settings,
    })
    clock.lap("evaluate", exp)
    return accuracies


def train_and_evaluate(config, workdir):
    """Runs `config.num_exp` distillations into `workdir` and writes `results.json`.

    Everything that can be checked without running is checked first, before the workdir is
    touched: the config's values, the dataset (loaded, every class present), the run already in
    the workdir, the architectures, then the run in the workdir again, holding the workdir's lock
    (`check_workdir`).

    Args:
        config: a validated-on-entry ConfigDict (see configs/default.py for the fields).
        workdir: output directory; rerunning with the same workdir resumes.

    Returns:
        The results dict written to results.json.

    Raises:
        errors.UserError: anything the user can fix (see above; the message says what).
        errors.Interrupted: on Ctrl-C, with the resume hint.
    """
    config_lib.validate(config)
    clock = manifest.PhaseClock()
    dataset = data.load_dataset(config.dataset)
    train_data_sha256 = manifest.data_fingerprint(dataset)
    dataset = data.hold_out_validation(dataset, config.dataset.validation_size, config.seed)
    dataset.check_every_class_present()
    check_saved_config(config, workdir)  # quick, before the architectures compile; again below
    check_architectures(config, dataset.spec)  # before any distillation is spent
    with workdir_lib.locked(workdir):
        check_workdir(config, workdir, dataset.spec)
        return _run(config, workdir, dataset, train_data_sha256, clock)


def _run(config, workdir, dataset, train_data_sha256, clock):
    """`train_and_evaluate` once everything is checked and the workdir is locked."""
    _write_json(os.path.join(workdir, workdir_lib.CONFIG_NAME), config_lib.to_dict(config))
    real = distill.real_data_from_dataset(dataset)
    clock.lap("load")
    manifest.write_manifest(workdir, config, train_data_sha256, clock)
    logging.info("Dataset %s: %d train / %d test images of shape %s, %d classes", dataset.spec.name,
                 len(dataset.y_train), len(dataset.y_test), dataset.spec.image_shape,
                 dataset.spec.num_classes)
    root = jax.random.PRNGKey(config.seed)
    estimate = progress.RunEstimate.from_config(config, distill_iterations(config))
    per_model = {name: [] for name in config.eval.models}
    for exp in range(config.num_exp):
        accuracies = run_experiment(
            config, exp, jax.random.fold_in(root, exp), dataset, real, workdir, estimate,
            clock
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
