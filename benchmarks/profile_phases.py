"""Where one distillation iteration and one evaluation epoch spend their time, phase by phase.

    python benchmarks/profile_phases.py                      # refbench setting: MNIST IPC 10 BACON
    python benchmarks/profile_phases.py --config=configs/cifar10.py:ipc10 --override model=ConvNetW32

Each phase is the library's own function, jitted alone with the compile options of the run
(backend.py) and timed as the median of `--repeats` calls after a warm-up call, on the state the
step reaches after `--warm_iterations` iterations:

iteration (distill_step)
    network choice    `distill._select_network` (meter reset, pool growth, the matching net)
    class gradients   `distill._all_class_gradients`: every class's real batch, DSA, the x4
                      expansion, forward and backward through the matching net; split further by
                      timing it again without DSA and without the expansion, and by timing the
                      forward passes alone (the real batches and the expanded synthetic images
                      through `embed`, one batch)
    image update      `distill.per_class_image_update`
    pool training     `distill.train_pool`
    rest              the whole step minus the phases: what XLA fuses across phases, host dispatch
evaluation epoch (`evaluation._epoch_many`, one network, the expanded set)
    DSA               `augment.dsa` on each minibatch (mean over draws: one family per call)
    forward           the train-mode forward pass over the set's minibatches
    backward + SGD    the epoch minus DSA and forward
    test pass         `evaluation._test_many` over the test set, once per evaluation

Differences of two timings are estimates (XLA fuses differently without a phase); the table says
which rows are differences. Compile time of the whole step and of the epoch is printed too.
"""

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from bacon_jax import augment, distill, evaluation

import common


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per phase")
    parser.add_argument("--warm_iterations", type=int, default=2,
                        help="iterations run before the phases are timed")
    parser.add_argument("--eval_model", default="", help="default: config.eval.models[0]")
    return parser.parse_args(argv)


def profile_iteration(config, dataset, args):
    spec, model, real, state, step = common.distill_setup(config, dataset)
    start = time.perf_counter()
    step = step.lower(state, real).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warm_iterations):
        state, _ = step(state, real)
    timed = functools.partial(common.median_seconds, repeats=args.repeats)
    it_key = jax.random.fold_in(state.key, state.step)
    rows = [("iteration (distill_step)", timed(step, state, real), "measured")]

    select = common.jit(lambda s, k: distill._select_network(s, k, model, spec), spec)
    params, multiplier, pool = select(state, it_key)
    rows.append(("  network choice", timed(select, state, it_key), "measured"))

    def class_phase(phase_spec):
        fn = common.jit(lambda images, key, params, multiplier, real: distill._all_class_gradients(
            images, key, params, multiplier, real, model, phase_spec), spec)
        return timed(fn, state.images, it_key, params, multiplier, real)

    classes = class_phase(spec)
    rows.append(("  class gradients", classes, "measured"))
    if spec.dsa_families:
        no_dsa = class_phase(dataclasses.replace(spec, dsa_families=None))
        rows.append(("    DSA (real and synthetic)", classes - no_dsa, "difference"))
    if spec.expand:
        no_expand = class_phase(dataclasses.replace(spec, expand=False))
        rows.append(("    x4 expansion (4x the synthetic images)", classes - no_expand,
                     "difference"))
    batch_real = min(spec.batch_real, dataset.max_class_size)
    num_syn = spec.ipc * (4 if spec.expand else 1)
    images = jnp.zeros((spec.num_classes * (batch_real + num_syn),) + dataset.spec.image_shape)
    embed = common.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed), spec)
    rows.append((f"    forward passes ({images.shape[0]} images)", timed(embed, params, images),
                 "measured"))

    grads = jnp.zeros_like(state.images)
    update = common.jit(functools.partial(
        distill.per_class_image_update, lr=spec.lr_img,
        steps_between=spec.steps_between_class_updates), spec)
    rows.append(("  image update", timed(update, state.images, state.momentum, grads),
                 "measured"))
    if spec.uses_pool:
        train = common.jit(lambda pool, key, real: distill.train_pool(pool, key, real, model,
                                                                       spec), spec)
        rows.append(("  pool training", timed(train, pool, it_key, real), "measured"))
    parts = sum(seconds for name, seconds, _ in rows[1:] if not name.startswith("    "))
    rows.append(("  rest (step minus phases)", rows[0][1] - parts, "difference"))
    return rows, compile_s, spec


def profile_epoch(config, dataset, distill_spec, args):
    name = args.eval_model or config.eval.models[0]
    spec = evaluation.spec_from_config(config, name, dataset.spec, mesh=common.mesh_for(1))
    model = common.model_for(name, dataset.spec, spec)
    num = dataset.num_classes * config.ipc
    images = jax.random.normal(jax.random.PRNGKey(0), (num,) + dataset.spec.image_shape)
    labels = jnp.repeat(jnp.arange(dataset.num_classes, dtype=jnp.int32), config.ipc)
    if distill_spec.expand:
        images, labels = augment.expand_quadrants(images, labels)
    keys = jax.random.split(jax.random.PRNGKey(1), 1)
    states = evaluation._init_many(keys, model, spec)
    lr = jnp.float32(spec.lr)
    timed = functools.partial(common.median_seconds, repeats=args.repeats)

    def epoch_time(epoch_spec):
        """(compile seconds, median seconds of one epoch call)."""
        start = time.perf_counter()
        compiled = evaluation._epoch_many.lower(states, keys, 0, lr, images, labels, model,
                                                epoch_spec).compile()
        compile_s = time.perf_counter() - start
        # The epoch donates its states: each call gets a fresh copy (its time is subtracted).
        return compile_s, timed(lambda: compiled(jax.tree.map(jnp.copy, states), keys, 0, lr,
                                                 images, labels))

    compile_s, epoch = epoch_time(spec)
    copy = timed(lambda: jax.tree.map(jnp.copy, states))
    epoch -= copy
    rows = [(f"epoch ({name}, {images.shape[0]} images, batch {spec.batch_size})", epoch,
             "measured")]
    batches = [images[i:i + spec.batch_size] for i in range(0, images.shape[0], spec.batch_size)]
    dsa = 0.0
    if spec.dsa_families:
        # One family per call, drawn from the key: the mean over keys 0..2F-1 of each batch.
        augment_fn = common.jit(lambda x, k: augment.dsa(x, k, siamese=False,
                                                         families=spec.dsa_families), spec)
        draws = [jax.random.PRNGKey(i) for i in range(2 * len(spec.dsa_families))]
        dsa = sum(statistics.mean(timed(augment_fn, batch, key) for key in draws)
                  for batch in batches)
        rows.append(("  DSA (mean over draws)", dsa, "measured"))
    variables = evaluation._variables(jax.tree.map(lambda x: x[0], states))
    forward = common.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0], spec)
    fwd = sum(timed(forward, variables, batch) for batch in batches)
    rows.append(("  forward (train mode)", fwd, "measured"))
    rows.append(("  backward + SGD + shuffling", epoch - dsa - fwd, "difference"))
    test_images = jnp.asarray(dataset.x_test)
    test_labels = jnp.asarray(dataset.y_test, jnp.int32)
    test = timed(evaluation._test_many, states, test_images, test_labels, dataset.preprocessing,
                 model, spec)
    rows.append((f"test pass ({test_images.shape[0]} images, once per evaluation)", test,
                 "measured"))
    network = (spec.epochs + 1) * epoch + test
    rows.append((f"one network: {spec.epochs + 1} epochs + test pass", network, "sum"))
    return rows, compile_s


def print_rows(title, rows, total):
    """Rows (name, seconds, how); names indented by two spaces per level are shown with dots,
    and their share of `total` (the first row); rows after a `sum` row get none."""
    print(title)
    table = []
    for name, seconds, how in rows:
        depth = (len(name) - len(name.lstrip(" "))) // 2
        share = "" if how == "sum" or name.startswith("test") else f"{100 * seconds / total:.0f}%"
        table.append([". " * depth + name.strip(), f"{1000 * seconds:.1f}", share, how])
    common.print_table(["phase", "ms", "share of first row", "how"], table)


def main(argv):
    args = parse_args(argv)
    overrides = common.overrides_of(args)
    common.header("profile_phases " + " ".join(argv))
    config = common.load_config(args.config, overrides)
    dataset, source = common.load_data(config, args.fake_data)
    print(f"config {args.config} overrides {overrides or '-'}; data: {source}\n")
    rows, compile_s, spec = profile_iteration(config, dataset, args)
    print_rows(f"Distillation iteration ({config.method}, {config.model}; median of "
               f"{args.repeats}; step compile {compile_s:.1f} s):", rows, rows[0][1])
    rows, compile_s = profile_epoch(config, dataset, spec, args)
    print_rows(f"Evaluation (median of {args.repeats}; epoch compile {compile_s:.1f} s):",
               rows, rows[0][1])


if __name__ == "__main__":
    main(sys.argv[1:])
