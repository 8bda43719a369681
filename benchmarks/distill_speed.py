"""Distillation speed of DM, IDM and BACON: compile time, it/s, real images/s, FLOP/s, memory.

    python benchmarks/distill_speed.py --config=configs/digits.py:ipc10 --iters=3
    python benchmarks/distill_speed.py --config=configs/cifar10.py:ipc10 --methods=bacon \
        --iters=5 --override model=ConvNetW32

The engine is the library's own: the config file is loaded by path and `get_config(arg)` is called
(as `--config` does), the spec, model, RealData and state are built as `bacon_jax.train` builds
them, and the timed function is `jax.jit(distill_step, donate_argnums=0)`. When the dataset cannot
be loaded (e.g. no prepared TFDS data) random uint8 data of the dataset's shape, class count and
size is used instead, and the header says so: speed does not depend on pixel values.

Per method it prints: compile time (lower + compile), iterations/s and real images/s over `--iters`
iterations after one warm-up iteration, FLOPs per iteration from XLA's cost analysis, achieved
FLOP/s and its ratio to the device's peak (on CPU a measured matmul rate, `common.device_peak`),
and the compiled step's peak memory per device (arguments + outputs + temporaries - donated
aliases).

Target (b): one IDM/BACON iteration with all classes batched is >= 3x faster than the same math
looped class by class on the same device. The yardstick is built here: a jitted per-class function
(`class_objective` for one class + its per-class image update) called C times from Python,
between a jitted network selection and a jitted pool-training step. Both variants start from the
same state; the script prints the largest difference of their images after one iteration as a
check that the loop computes the same thing.
"""

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from bacon_jax import distill

import common


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="config file and preset, e.g. configs/cifar10.py:ipc10")
    parser.add_argument("--methods", default="dm,idm,bacon", help="comma-separated methods")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations after compile")
    parser.add_argument("--override", action="append", nargs="+", default=[], metavar="K=V",
                        help="config overrides appended to the config argument (repeatable)")
    parser.add_argument("--fake_data", choices=("auto", "true", "false"), default="auto",
                        help="random uint8 data of the dataset's shape; auto = when loading fails")
    parser.add_argument("--num_devices", type=int, default=1,
                        help="devices the step is mapped over (0 = all); the yardstick needs 1")
    parser.add_argument("--yardstick", choices=("true", "false"), default="true",
                        help="also time the class-by-class loop (target b)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def real_images_per_iteration(spec):
    """Real images read per iteration: C x batch_real, plus the pool-training batches."""
    count = spec.num_classes * spec.batch_real
    if spec.uses_pool:
        count += spec.fetch_net_num * spec.model_train_steps * spec.trained_bs
    return count


def iteration_flops(compiled, state, real, spec, model):
    """(FLOPs per iteration, source). XLA's cost analysis counts a while-loop body once, so when
    the timed program keeps its loops (accelerators), FLOPs are counted on the same maths with the
    loops unrolled (lowered only, not compiled)."""
    if spec.unroll_loops:
        return common.cost_flops(compiled), "compiled step"
    unrolled = dataclasses.replace(spec, unroll_loops=True)
    lowered = common.jit(functools.partial(distill.distill_step, model=model, spec=unrolled),
                         spec).lower(
        state, real)
    return common.cost_flops(lowered), "lowered step, loops unrolled for counting"


def time_iterations(run_one, state, iters):
    with common.Timer() as t:
        for _ in range(iters):
            state = run_one(state)
        jax.block_until_ready(state)
    return state, t.seconds


def bench_batched(state, real, model, spec, args):
    # As bacon_jax.train: state donated, outputs pinned to the replicated placement of the inputs.
    step_fn = common.jit(functools.partial(distill.distill_step, model=model, spec=spec), spec,
                         donate_argnums=0, out_shardings=replicated(spec.mesh))
    with common.Timer() as t:
        compiled = step_fn.lower(state, real).compile()
    compile_s = t.seconds
    flops, flops_source = iteration_flops(compiled, state, real, spec, model)
    run_one = lambda s: compiled(s, real)[0]
    state, _ = time_iterations(run_one, state, args.warmup)
    state, seconds = time_iterations(run_one, state, args.iters)
    return dict(compile_s=compile_s, seconds=seconds, flops=flops, flops_source=flops_source,
                memory=common.memory(compiled), compiled=compiled)


class ClassLoop:
    """The yardstick: the same iteration with the class gradients looped class by class.

    Three jitted pieces called from Python: the network choice (with the pool's meter reset and
    growth), one class's objective + image update (called C times), the pool training. Keys are
    those of `distill_step` (SPEC A3), so one iteration gives the batched step's images.
    """

    def __init__(self, model, spec):
        self.spec = spec
        ipc = spec.ipc

        def select(state):
            it_key = jax.random.fold_in(state.key, state.step)
            params, ce_multiplier, pool = distill._select_network(state, it_key, model, spec)
            return it_key, params, ce_multiplier, pool

        def one_class(images, momentum, c, it_key, params, ce_multiplier, real):
            start = c * ipc
            class_images = jax.lax.dynamic_slice_in_dim(images, start, ipc)
            class_momentum = jax.lax.dynamic_slice_in_dim(momentum, start, ipc)
            key = jax.random.fold_in(jax.random.fold_in(it_key, distill._CLASSES), c)
            grad, metrics = distill.class_objective(
                class_images, c, key, params, ce_multiplier, real, model, spec)
            class_images, class_momentum = distill.per_class_image_update(
                class_images, class_momentum, grad, spec.lr_img, spec.steps_between_class_updates)
            images = jax.lax.dynamic_update_slice_in_dim(images, class_images, start, 0)
            momentum = jax.lax.dynamic_update_slice_in_dim(momentum, class_momentum, start, 0)
            return images, momentum, metrics

        def finish(state, images, momentum, pool, it_key, real):
            if spec.uses_pool:
                pool = distill.train_pool(
                    pool, jax.random.fold_in(it_key, distill._POOL_TRAIN), real, model, spec)
            return state.replace(step=state.step + 1, images=images, momentum=momentum, pool=pool)

        def all_classes(images, momentum, it_key, params, ce_multiplier, real):
            # The batched step's class phase alone, to time against C calls of `one_class`.
            grads, _ = distill._all_class_gradients(
                images, jax.random.fold_in(it_key, distill._CLASSES), params, ce_multiplier, real,
                model, spec)
            return distill.per_class_image_update(
                images, momentum, grads, spec.lr_img, spec.steps_between_class_updates)

        self.jitted = (common.jit(select, spec),
                       common.jit(one_class, spec, donate_argnums=(0, 1)),
                       common.jit(finish, spec, donate_argnums=0))
        self.all_classes = common.jit(all_classes, spec)
        self.compiled = None

    def compile(self, state, real):
        select, one_class, finish = self.jitted
        selected = jax.eval_shape(select, state)
        it_key, params, ce_multiplier, pool = selected
        c = jnp.int32(0)
        self.compiled = (
            select.lower(state).compile(),
            one_class.lower(state.images, state.momentum, c, it_key, params, ce_multiplier,
                            real).compile(),
            finish.lower(state, state.images, state.momentum, pool, it_key, real).compile(),
        )

    def class_phase(self, images, momentum, selected, real):
        """The C per-class calls of one iteration; returns (images, momentum)."""
        one_class = self.compiled[1]
        it_key, params, ce_multiplier, _ = selected
        # Copies: one_class donates its image buffers, and the caller still holds the originals.
        images, momentum = jnp.copy(images), jnp.copy(momentum)
        for c in range(self.spec.num_classes):
            images, momentum, _ = one_class(images, momentum, jnp.int32(c), it_key, params,
                                            ce_multiplier, real)
        return images, momentum

    def __call__(self, state, real):
        select, _, finish = self.compiled
        selected = select(state)
        images, momentum = self.class_phase(state.images, state.momentum, selected, real)
        it_key, _, _, pool = selected
        return finish(state, images, momentum, pool, it_key, real)


def bench_loop(state, real, model, spec, args):
    """Times the looped iteration, then the class phase alone: batched (the step's
    `_all_class_gradients` + image update) against C per-class calls, for one selected net."""
    loop = ClassLoop(model, spec)
    with common.Timer() as t:
        loop.compile(state, real)
    compile_s = t.seconds
    selected = loop.compiled[0](state)
    it_key, params, ce_multiplier, _ = selected
    phase = loop.all_classes.lower(state.images, state.momentum, it_key, params, ce_multiplier,
                                   real).compile()
    phase_times = {}
    for name, run in (
        ("batched", lambda: phase(state.images, state.momentum, it_key, params, ce_multiplier,
                                  real)),
        ("looped", lambda: loop.class_phase(state.images, state.momentum, selected, real)),
    ):
        jax.block_until_ready(run())  # warm-up
        with common.Timer() as t:
            for _ in range(args.iters):
                out = run()
            jax.block_until_ready(out)
        phase_times[name] = t.seconds / args.iters
    run_one = lambda s: loop(s, real)
    state, _ = time_iterations(run_one, state, args.warmup)
    state, seconds = time_iterations(run_one, state, args.iters)
    return dict(compile_s=compile_s, seconds=seconds, loop=loop, phase=phase_times)


def same_math_check(init_fn, real, batched_compiled, loop):
    """Largest |difference| of the images after one iteration of each variant from one state."""
    after_batched = batched_compiled(init_fn(), real)[0]
    after_loop = loop(init_fn(), real)
    return float(jnp.max(jnp.abs(after_batched.images - after_loop.images)))


def main(argv):
    args = parse_args(argv)
    overrides = [o for group in args.override for o in group]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    common.header("distill_speed " + " ".join(argv))

    base = common.load_config(args.config, overrides)
    dataset, data_source = common.load_data(base, args.fake_data)
    print(f"config {args.config} overrides {overrides or '-'}; dataset {dataset.spec.name}: "
          f"{dataset.num_train} training images {dataset.spec.image_shape}, "
          f"{dataset.num_classes} classes; data: {data_source}")
    mesh = common.mesh_for(args.num_devices)
    real = jax.device_put(distill.real_data_from_dataset(dataset), replicated(mesh))
    peak, peak_label = common.device_peak()
    print(f"device peak used for ratios: {peak_label}"
          + (f" = {common.fmt_flops(peak, 'FLOP/s')}" if peak else "")
          + f"; step mapped over {mesh.size} device(s)\n")

    rows, loop_rows, setup_rows, flops_sources = [], [], [], set()
    ratios, records = {}, []
    for method in methods:
        config = common.load_config(args.config, [f"method={method}", *overrides])
        spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size, mesh=mesh)
        model = common.model_for(config.model, dataset.spec, spec)
        init = common.jit(functools.partial(distill.init_state, model=model, spec=spec), spec)
        init_fn = lambda: jax.device_put(init(jax.random.PRNGKey(config.seed), real),
                                         replicated(mesh))
        setup_rows.append([method, config.model, spec.ipc, spec.batch_real,
                           spec.model_train_steps if spec.uses_pool else "-",
                           spec.trained_bs if spec.uses_pool else "-",
                           spec.classes_per_chunk or "all", spec.unroll_loops])

        result = bench_batched(init_fn(), real, model, spec, args)
        it_s = args.iters / result["seconds"]
        flops_s = result["flops"] * it_s if result["flops"] else None
        flops_sources.add(result["flops_source"])
        mem = result["memory"]
        rows.append([
            method, f"{result['compile_s']:.1f}", f"{it_s:.3g}",
            f"{real_images_per_iteration(spec) * it_s:,.0f}",
            common.fmt_flops(result["flops"]), common.fmt_flops(flops_s, "FLOP/s"),
            common.fmt_ratio(flops_s / peak if (peak and flops_s) else None),
            common.fmt_bytes(mem.peak if mem else None),
        ])
        records.append(dict(method=method, model=config.model, compile_s=result["compile_s"],
                            iteration_s=1 / it_s, flops_per_iteration=result["flops"],
                            flops_per_s=flops_s,
                            of_peak=flops_s / peak if (peak and flops_s) else None,
                            peak_mem_bytes=mem.peak if mem else None))
        print(f"[{method}] batched: compile {result['compile_s']:.1f} s, {it_s:.3g} it/s",
              flush=True)

        # Target (b) compares on one device; the loop is not mapped over devices.
        if args.yardstick == "true" and mesh.size == 1:
            looped = bench_loop(init_fn(), real, model, spec, args)
            loop_it_s = args.iters / looped["seconds"]
            diff = same_math_check(init_fn, real, result["compiled"], looped["loop"])
            ratio = it_s / loop_it_s
            ratios[method] = ratio
            phase = looped["phase"]
            loop_rows.append([method, f"{1 / it_s:.3g}", f"{1 / loop_it_s:.3g}", f"{ratio:.2f}x",
                              f"{phase['batched']:.3g}", f"{phase['looped']:.3g}",
                              f"{phase['looped'] / phase['batched']:.2f}x",
                              f"{looped['compile_s']:.1f}", f"{diff:.2g}"])
            print(f"[{method}] class loop: compile {looped['compile_s']:.1f} s, "
                  f"{loop_it_s:.3g} it/s", flush=True)
    print()

    print("Setup per method (batch_real is min(config, largest class)):")
    common.print_table(["method", "model", "ipc", "batch_real", "pool steps", "trained_bs",
                        "classes/chunk", "unrolled"], setup_rows)
    print(f"Distillation step, all classes batched ({args.iters} timed iterations after "
          f"{args.warmup} warm-up):")
    common.print_table(["method", "compile s", "it/s", "real img/s", "FLOP/iter", "FLOP/s",
                        "of peak", "peak mem/device"], rows)
    print("FLOP/iter source: " + "; ".join(sorted(flops_sources)) + ". real img/s counts "
          "C x batch_real + fetch_net_num x model_train_steps x trained_bs (IDM/BACON).")
    print()
    if loop_rows:
        print("Yardstick: the same iteration with classes looped one by one from Python:")
        common.print_table(["method", "batched s/it", "looped s/it", "speed-up",
                            "classes batched s", "classes looped s", "speed-up",
                            "loop compile s", "max |images diff|"], loop_rows)
        print("Iteration = network choice + class phase + pool training (the target's figure); "
              "class phase = the C class gradients and image updates alone.\n")
    pooled = {m: r for m, r in ratios.items() if m in ("idm", "bacon")}
    if pooled:
        worst = min(pooled.values())
        detail = ", ".join(f"{m} {r:.2f}x" for m, r in pooled.items())
        common.target("b", worst >= 3.0, f"batched vs class loop speed-up >= 3x: {detail} "
                      f"on {jax.devices()[0].device_kind}")
    elif mesh.size > 1:
        common.target("b", "n/a (the yardstick runs with --num_devices=1 only)")
    else:
        common.target("b", "n/a (run idm or bacon with --yardstick=true)")
    print(f"\nhost peak RSS of this process: {common.fmt_bytes(common.peak_rss_bytes())}")
    if args.json:
        common.write_json(args.json, dict(
            benchmark="distill_speed", config=args.config, overrides=overrides, data=data_source,
            device=jax.devices()[0].device_kind, peak=peak_label, rows=records))


if __name__ == "__main__":
    main(sys.argv[1:])
