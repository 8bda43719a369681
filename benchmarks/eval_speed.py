"""Evaluation speed: num_eval networks trained side by side (vmap) on a synthetic set.

    python benchmarks/eval_speed.py --config=configs/digits.py:ipc10
    python benchmarks/eval_speed.py --config=configs/cifar10.py:ipc10 --num_eval=1,5 --epochs=3

The timed function is the library's epoch function `evaluation._epoch_many` (one call = one epoch
of every network: the full minibatches plus the exact-size remainder batch, DSA on each, SGD), as
`evaluate_synthetic` drives it from Python on CPU; on accelerators the run fuses all epochs into one
program (`_fused`) of the same epoch bodies, so per-epoch figures carry over. The synthetic set
has the config's size (C x ipc images, x4 when `expand` is on); its values do not matter for speed,
so it is random.

Per num_eval it prints compile time, epochs/s, network steps/s (num_eval x minibatches per epoch),
training images/s (num_eval x set size per epoch), FLOPs per epoch call from XLA's cost analysis,
achieved FLOP/s and its ratio to the device's peak, and peak memory per device. The final test
pass (once per evaluation) is not timed.

Targets: (a) wall time of num_eval=5 <= 2x that of num_eval=1, defined on a GPU; (c) on a GPU the
evaluation loop reaches >= 25% of the device's dense fp32/TF32 peak. Elsewhere the figures are
printed with "target defined for GPU".
"""

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

from bacon_jax import augment, data, evaluation

import common


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True,
                        help="config file and preset, e.g. configs/cifar10.py:ipc10")
    parser.add_argument("--num_eval", default="1,5", help="comma-separated numbers of networks")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per num_eval")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs after compile")
    parser.add_argument("--model", default="", help="architecture (default: config.eval.models[0])")
    parser.add_argument("--override", action="append", nargs="+", default=[], metavar="K=V",
                        help="config overrides appended to the config argument (repeatable)")
    parser.add_argument("--num_devices", type=int, default=1,
                        help="devices the networks are split over (0 = all)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def synthetic_training_set(config, dataset_spec):
    """Random images of the evaluated set's size: C x ipc, expanded x4 when `expand` is on."""
    num = dataset_spec.num_classes * config.ipc
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (num,) + tuple(dataset_spec.image_shape), jnp.float32)
    labels = jnp.repeat(jnp.arange(dataset_spec.num_classes, dtype=jnp.int32), config.ipc)
    if config.expand:
        images, labels = augment.expand_quadrants(images, labels)
    return images, labels


def epoch_flops(spec, model, states, keys, epoch, lr, images, labels, compiled):
    """(FLOPs per epoch call, source); see distill_speed.iteration_flops for why loops are
    unrolled for counting when the timed program keeps them."""
    if spec.unroll_loops:
        return common.cost_flops(compiled), "compiled epoch"
    unrolled = dataclasses.replace(spec, unroll_loops=True)
    lowered = evaluation._epoch_many.lower(states, keys, epoch, lr, images, labels, model,
                                           unrolled)
    return common.cost_flops(lowered), "lowered epoch, loops unrolled for counting"


def bench(num_eval, images, labels, model, spec, args):
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(1), j))(
        jnp.arange(num_eval))
    states = evaluation._init_many(keys, model, spec)
    epoch, lr = jnp.int32(0), jnp.float32(spec.lr)
    with common.Timer() as t:
        compiled = evaluation._epoch_many.lower(states, keys, epoch, lr, images, labels, model,
                                                spec).compile()
    flops, source = epoch_flops(spec, model, states, keys, epoch, lr, images, labels, compiled)
    for e in range(args.warmup):
        states = compiled(states, keys, jnp.int32(e), lr, images, labels)
    jax.block_until_ready(states)
    with common.Timer() as timed:
        for e in range(args.warmup, args.warmup + args.epochs):
            states = compiled(states, keys, jnp.int32(e), lr, images, labels)
        jax.block_until_ready(states)
    return dict(compile_s=t.seconds, seconds=timed.seconds, flops=flops, source=source,
                memory=common.memory(compiled))


def main(argv):
    args = parse_args(argv)
    overrides = [o for group in args.override for o in group]
    common.header("eval_speed " + " ".join(argv))
    config = common.load_config(args.config, overrides)
    dataset_spec = data.DATASETS[config.dataset.name]
    model_name = args.model or config.eval.models[0]
    mesh = common.mesh_for(args.num_devices)
    spec = evaluation.spec_from_config(config, model_name, dataset_spec, mesh=mesh)
    model = common.model_for(model_name, dataset_spec, spec)
    images, labels = synthetic_training_set(config, dataset_spec)
    num = images.shape[0]
    full, remainder = divmod(num, spec.batch_size)
    steps = full + (1 if remainder else 0)
    peak, peak_label = common.device_peak()
    print(f"config {args.config} overrides {overrides or '-'}; {model_name} on a random "
          f"synthetic set of {num} images {tuple(images.shape[1:])} (ipc {config.ipc}"
          f"{', x4 expansion' if config.expand else ''}); batch {spec.batch_size}: {full} full + "
          f"{remainder} remainder = {steps} steps/epoch; DSA "
          f"{'on' if spec.dsa_families else 'off'}; inner loops "
          f"{'unrolled' if spec.unroll_loops else 'scanned'}; {mesh.size} device(s)")
    print(f"device peak used for ratios: {peak_label}"
          + (f" = {common.fmt_flops(peak, 'FLOP/s')}" if peak else "") + "\n")

    rows, seconds_per_epoch, peak_ratio, sources, records = [], {}, {}, set(), []
    for num_eval in [int(n) for n in args.num_eval.split(",") if n.strip()]:
        r = bench(num_eval, images, labels, model, spec, args)
        epoch_s = r["seconds"] / args.epochs
        seconds_per_epoch[num_eval] = epoch_s
        flops_s = r["flops"] / epoch_s if r["flops"] else None
        peak_ratio[num_eval] = flops_s / peak if (peak and flops_s) else None
        sources.add(r["source"])
        rows.append([
            num_eval, f"{r['compile_s']:.1f}", f"{1 / epoch_s:.3g}",
            f"{num_eval * steps / epoch_s:.3g}", f"{num_eval * num / epoch_s:,.0f}",
            common.fmt_flops(r["flops"]), common.fmt_flops(flops_s, "FLOP/s"),
            common.fmt_ratio(peak_ratio[num_eval]),
            common.fmt_bytes(r["memory"].peak if r["memory"] else None),
        ])
        records.append(dict(num_eval=num_eval, compile_s=r["compile_s"], epoch_s=epoch_s,
                            flops_per_epoch=r["flops"], flops_per_s=flops_s,
                            of_peak=peak_ratio[num_eval],
                            peak_mem_bytes=r["memory"].peak if r["memory"] else None))
        print(f"[num_eval={num_eval}] compile {r['compile_s']:.1f} s, {epoch_s:.3g} s/epoch",
              flush=True)
    print()
    print(f"Evaluation training, one epoch per call ({args.epochs} timed epochs after "
          f"{args.warmup} warm-up):")
    common.print_table(["num_eval", "compile s", "epochs/s", "net steps/s", "images/s",
                        "FLOP/epoch", "FLOP/s", "of peak", "peak mem/device"], rows)
    print("FLOP/epoch source: " + "; ".join(sorted(sources)) + ".\n")

    gpu = common.is_gpu()
    if 1 in seconds_per_epoch and 5 in seconds_per_epoch:
        ratio = seconds_per_epoch[5] / seconds_per_epoch[1]
        detail = f"num_eval=5 / num_eval=1 wall time = {ratio:.2f}x (target <= 2x)"
        common.target("a", ratio <= 2.0 if gpu else "target defined for GPU", detail)
    else:
        common.target("a", "n/a (needs --num_eval with 1 and 5)")
    # The protocol's num_eval (config.eval.num_eval, 5 in every reference command) when measured.
    judged = config.eval.num_eval if config.eval.num_eval in peak_ratio else max(peak_ratio)
    if gpu and peak_ratio.get(judged) is not None:
        ratio = peak_ratio[judged]
        common.target("c", ratio >= 0.25, f"num_eval={judged}: {100 * ratio:.1f}% of "
                      f"{peak_label} (target >= 25%)")
    elif gpu:
        common.target("c", "n/a (device peak unknown)")
    else:
        common.target("c", "n/a (target defined for GPU)")
    print(f"\nhost peak RSS of this process: {common.fmt_bytes(common.peak_rss_bytes())}")
    if args.json:
        common.write_json(args.json, dict(
            benchmark="eval_speed", config=args.config, overrides=overrides, model=model_name,
            set_size=num, steps_per_epoch=steps, device=jax.devices()[0].device_kind,
            peak=peak_label, rows=records))


if __name__ == "__main__":
    main(sys.argv[1:])
