"""Compiled per-device peak memory of one `distill_step`, and host memory of an MNIST-sized run.

    python benchmarks/memory.py
    python benchmarks/memory.py --configs=configs/tiny_imagenet.py:ipc10 --devices=8 --chunks=0,5,1

Device memory: for each config (default BACON `tiny_imagenet:ipc10` and `cifar10:ipc50`), device
count (1, 8, 32) and `classes_per_chunk` (0 = all local classes at once, 5, 1), one `distill_step`
is lowered and compiled WITHOUT data: the state and the real training set are
`jax.ShapeDtypeStruct`s (RealData with the real sizes: Tiny ImageNet 100k x 64x64x3 uint8 with
500 images per class, CIFAR-10 50k x 32x32x3 uint8 with 5000), replicated over a mesh of the first
n devices (`parallel.make_mesh(jax.devices()[:n])`, `DistillSpec.mesh`), and
`compiled.memory_analysis()` gives the per-device arguments, outputs, temporaries and donated
aliases; peak = arguments + outputs + temporaries - aliases. As in `bacon_jax.train`, the state
is donated and the outputs are pinned to the inputs' replicated placement.

The 8 and 32 devices are fake CPU devices: this script sets
`XLA_FLAGS=--xla_force_host_platform_device_count=32` before importing jax (added to any XLA_FLAGS
already set, unless they already force a device count). The figures are therefore XLA:CPU's buffer
assignment of the accelerator-shaped program (inner loops kept as loops, `--unroll_loops=false`,
as on GPU/TPU); a GPU or TPU compile assigns buffers differently, so read them as estimates. On a
host with enough accelerators, `--backend=gpu` (or tpu) compiles for them instead.

Target: Tiny ImageNet IPC10 fits a 16 GiB device at 8 and at 32 devices with some chunk size.

Host memory, target (d): the process's peak RSS (`resource.getrusage`) after building an
MNIST-sized RealData (60k x 28x28x1; the real MNIST file when present, else random), measured
first, before any compile; target < 8 GB. `--host_step_model=ConvNetW32` also compiles and runs
one BACON ipc10 step on it (1 device, CPU loop settings) and reports the RSS after that.
"""

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must precede the first jax import: XLA reads the flag once, when the CPU backend starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=32").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from bacon_jax import data, distill, models, parallel  # noqa: E402

import common  # noqa: E402

DEVICE_BYTES = 16 * common.GiB


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs",
                        default="configs/tiny_imagenet.py:ipc10,configs/cifar10.py:ipc50",
                        help="comma-separated config:preset (presets may not contain commas)")
    parser.add_argument("--devices", default="1,8,32", help="device counts")
    parser.add_argument("--chunks", default="0,5,1",
                        help="classes_per_chunk values (0 = all local classes)")
    parser.add_argument("--backend", default="cpu", help="platform whose devices form the mesh")
    parser.add_argument("--unroll_loops", choices=("true", "false"), default="false",
                        help="false = the accelerator program (loops kept)")
    parser.add_argument("--max_minutes", type=float, default=30.0,
                        help="skip the remaining compiles once this much time has passed")
    parser.add_argument("--host", choices=("true", "false"), default="true",
                        help="measure host memory (target d) first")
    parser.add_argument("--host_step_model", default="",
                        help="also run one BACON ipc10 step on MNIST with this model (e.g. "
                             "ConvNetW32); empty = skip")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Host memory (target d).


def host_memory(args):
    config = common.load_config("configs/mnist.py:ipc10")
    dataset, source = common.load_data(config, "auto")
    real = distill.real_data_from_dataset(dataset)
    jax.block_until_ready(real)
    rows = [["MNIST RealData built", f"{dataset.num_train} x {dataset.spec.image_shape} ({source})",
             common.fmt_bytes(common.peak_rss_bytes())]]
    if args.host_step_model:
        config = common.load_config("configs/mnist.py:ipc10", [f"model={args.host_step_model}"])
        spec = distill.spec_from_config(config, dataset.spec, dataset.max_class_size,
                                        mesh=parallel.make_mesh(jax.devices()[:1]))
        spec = dataclasses.replace(spec, unroll_loops=jax.devices()[0].platform == "cpu")
        model = common.model_for(config.model, dataset.spec, spec)
        state = common.jit(functools.partial(distill.init_state, model=model, spec=spec), spec)(
            jax.random.PRNGKey(0), real)
        step = common.jit(functools.partial(distill.distill_step, model=model, spec=spec), spec,
                          donate_argnums=0)
        with common.Timer() as t:
            state, _ = step(state, real)
            jax.block_until_ready(state)
        rows.append([f"+ one BACON ipc10 step ({config.model})",
                     f"compile + run {t.seconds:.0f} s", common.fmt_bytes(common.peak_rss_bytes())])
    print("Host memory (peak RSS of this process, before any large compile):")
    common.print_table(["after", "data", "peak RSS"], rows)
    rss = common.peak_rss_bytes()
    common.target("d", rss < 8e9, f"peak RSS {common.fmt_bytes(rss)} (target < 8 GB)")
    print()


# --------------------------------------------------------------------------------------------
# Compiled device memory.


def abstract_inputs(config, mesh, spec, model):
    """(state, real) as replicated ShapeDtypeStructs with the dataset's real sizes."""
    dataset_spec = data.DATASETS[config.dataset.name]
    num_train = common.DATASET_SIZES[config.dataset.name][0]
    max_class = -(-num_train // dataset_spec.num_classes)
    replicated = NamedSharding(mesh, PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    real = distill.RealData(
        images=sds((num_train,) + tuple(dataset_spec.image_shape), jnp.uint8),
        labels=sds((num_train,), jnp.int32),
        class_index=sds((dataset_spec.num_classes, max_class), jnp.int32),
        class_count=sds((dataset_spec.num_classes,), jnp.int32),
        preprocessing=data.Preprocessing(dataset_spec.mean, dataset_spec.std),
    )
    state = jax.eval_shape(functools.partial(distill.init_state, model=model, spec=spec),
                           sds((2,), jnp.uint32), real)
    state = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
    return state, real


def compile_memory(config, mesh, chunk, unroll):
    dataset_spec = data.DATASETS[config.dataset.name]
    num_train = common.DATASET_SIZES[config.dataset.name][0]
    max_class = -(-num_train // dataset_spec.num_classes)
    spec = distill.spec_from_config(config, dataset_spec, max_class, mesh=mesh)
    spec = dataclasses.replace(spec, classes_per_chunk=chunk, unroll_loops=unroll)
    model = models.get_model(config.model, dataset_spec.num_classes, dataset_spec.image_shape)
    state, real = abstract_inputs(config, mesh, spec, model)
    # As bacon_jax.train: state donated, outputs pinned to the replicated placement of the inputs.
    step = jax.jit(functools.partial(distill.distill_step, model=model, spec=spec),
                   donate_argnums=0, out_shardings=NamedSharding(mesh, PartitionSpec()))
    with common.Timer() as t:
        compiled = step.lower(state, real).compile()
    return common.memory(compiled), t.seconds


def device_memory(args):
    devices = jax.devices(args.backend)
    counts = [int(n) for n in args.devices.split(",") if n.strip()]
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    deadline = time.time() + 60 * args.max_minutes
    unroll = args.unroll_loops == "true"
    rows, fits = [], {}
    for config_flag in [c for c in args.configs.split(",") if c.strip()]:
        config = common.load_config(config_flag)
        dataset_spec = data.DATASETS[config.dataset.name]
        name = f"{config.dataset.name} {config.method} ipc{config.ipc}"
        for n in counts:
            if n > len(devices):
                rows.append([name, n, "-", "-"] + ["-"] * 6 + [f"only {len(devices)} devices"])
                continue
            mesh = parallel.make_mesh(devices[:n])
            local = parallel.padded(dataset_spec.num_classes, mesh) // n
            done = {}
            for chunk in chunks:
                effective = min(chunk or local, local)
                label = "all" if chunk == 0 else str(chunk)
                prefix = [name, n, local, label]
                if local % effective:
                    rows.append(prefix + ["-"] * 6 + [f"does not divide {local} local classes"])
                    continue
                if effective in done:
                    rows.append(prefix + ["-"] * 6
                                + [f"same program as chunk {done[effective]}"])
                    continue
                done[effective] = label
                if time.time() > deadline:
                    rows.append(prefix + ["-"] * 6 + ["not measured (--max_minutes spent)"])
                    continue
                try:
                    mem, seconds = compile_memory(config, mesh, chunk, unroll)
                except Exception as e:  # Report the failure (e.g. host OOM) and go on.
                    rows.append(prefix + ["-"] * 6
                                + [f"failed: {type(e).__name__}: {str(e)[:60]}"])
                    continue
                fit = mem.peak <= DEVICE_BYTES if mem else None
                fits[(config.dataset.name, config.ipc, n, label)] = (fit, mem)
                rows.append(prefix + [
                    f"{seconds:.0f}",
                    common.fmt_bytes(mem.peak if mem else None),
                    common.fmt_bytes(mem.argument if mem else None),
                    common.fmt_bytes(mem.output if mem else None),
                    common.fmt_bytes(mem.temp if mem else None),
                    common.fmt_bytes(mem.alias if mem else None),
                    "yes" if fit else ("no" if fit is False else "n/a"),
                ])
                print(f"[{name} on {n} device(s), chunk {label}] compiled in {seconds:.0f} s, "
                      f"peak {common.fmt_bytes(mem.peak if mem else None)}", flush=True)
    print()
    print(f"Compiled per-device memory of one distill_step ({args.backend} backend, loops "
          f"{'unrolled' if unroll else 'kept (accelerator form)'}; fits = peak <= 16 GiB):")
    common.print_table(["config", "devices", "local classes", "classes/chunk", "compile s",
                        "peak", "arguments", "outputs", "temp", "aliased", "fits 16 GiB"], rows)

    tiny = {key: value for key, value in fits.items()
            if key[0] == "tiny_imagenet" and key[1] == 10 and key[2] >= 8}
    if not tiny:
        common.target("Tiny ImageNet IPC10 fits 16 GiB at 8+ devices",
                      "n/a (no Tiny ImageNet ipc10 compile at 8+ devices was measured)")
        return
    # The largest chunk that fits is the fastest choice ('all' = no chunking).
    rank = lambda label: float("inf") if label == "all" else int(label)
    measured = sorted({key[2] for key in tiny})
    best = {}
    for n in measured:
        fitting = [(label, mem.peak) for (_, _, m, label), (fit, mem) in tiny.items()
                   if m == n and fit]
        best[n] = max(fitting, key=lambda item: rank(item[0]), default=None)
    met = all(best[n] for n in measured)
    detail = "; ".join(
        f"{n} devices: " + (f"chunk {best[n][0]} ({common.fmt_bytes(best[n][1])})"
                            if best[n] else "no measured chunk fits")
        for n in measured)
    common.target("Tiny ImageNet IPC10 fits 16 GiB at 8+ devices", met, detail)


def main(argv):
    args = parse_args(argv)
    common.header("memory " + " ".join(argv))
    if args.host == "true":
        host_memory(args)
    device_memory(args)
    print(f"\npeak RSS of this whole process (compiles included): "
          f"{common.fmt_bytes(common.peak_rss_bytes())}")


if __name__ == "__main__":
    main(sys.argv[1:])
