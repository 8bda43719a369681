"""One distillation iteration under several XLA compile options, timed interleaved.

    python benchmarks/compile_options.py [--config=configs/mnist.py:ipc10,method=bacon,model=ConvNetW32] \
        [--override k=v ...] [--options=auto --options='OPTION=VALUE;OPTION=VALUE' ...] \
        [--rounds=10] [--fake_data=auto]

Each `--options` value is a `compiler_options` config value (`auto`, `none`, or explicit XLA
debug options, `backend.compiler_options`); the first is the baseline. Every variant's
`distill_step` is compiled from the same state, then the variants run one call each per round
for `--rounds` rounds, so that all of them see the same load (a 2-core VM's timings drift by
10% within minutes). Prints per variant the first call (compile + run), the median seconds per
iteration and its ratio to the baseline, every round's time, and the largest difference of the
new images from the baseline's (0 for options that change scheduling only; float round-off for
options that change code generation). Options XLA does not know are reported and skipped.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import common


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_arguments(parser)
    parser.add_argument("--options", action="append", default=[],
                        help="a compiler_options value (repeatable; default: auto and none)")
    parser.add_argument("--rounds", type=int, default=10)
    return parser.parse_args(argv)


def compile_variant(options, args, overrides):
    """(step, state, real, images after one step, first-call seconds) for one options value."""
    config = common.load_config(args.config, overrides + [f"compiler_options={options}"])
    dataset, _ = common.load_data(config, args.fake_data)
    _, _, real, state, step = common.distill_setup(config, dataset)
    start = time.perf_counter()
    new_state, _ = jax.block_until_ready(step(state, real))
    return step, state, real, new_state.images, time.perf_counter() - start


def main(argv):
    args = parse_args(argv)
    overrides = common.overrides_of(args)
    variants = args.options or ["auto", "none"]
    common.header("compile_options " + " ".join(argv))
    print(f"config {args.config} overrides {overrides or '-'}\n")
    compiled = {}
    for options in variants:
        try:
            compiled[options] = compile_variant(options, args, overrides)
        except Exception as error:  # an option this XLA does not know: say so, time the rest
            print(f"skipped {options!r}: {type(error).__name__}: {str(error).splitlines()[0]}")
    if not compiled:
        return
    times = {options: [] for options in compiled}
    for _ in range(args.rounds):
        for options, (step, state, real, _, _) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(step(state, real))
            times[options].append(time.perf_counter() - start)
    baseline_options = next(iter(compiled))
    baseline = statistics.median(times[baseline_options])
    baseline_images = compiled[baseline_options][3]
    rows = []
    for number, (options, (_, _, _, images, first)) in enumerate(compiled.items()):
        print(f"variant {number}: compiler_options={options}")
        median = statistics.median(times[options])
        rows.append([number, f"{first:.1f}", f"{median:.3f}", f"{median / baseline:.3f}",
                     " ".join(f"{t:.2f}" for t in times[options]),
                     f"{float(jnp.max(jnp.abs(images - baseline_images))):.1e}"])
    print()
    common.print_table(["variant", "first call s", "s/iter", "vs variant 0", "rounds",
                        "max |images diff|"], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
