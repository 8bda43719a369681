"""Whole evaluations as a run does them: `evaluation.evaluate_synthetic`, wall time per call.

    python benchmarks/eval_full.py --config=configs/mnist.py:ipc10,method=bacon,model=ConvNetW32,eval.epochs=300 \
        --override dataset.path=../shared/data/mnist.npz --model=ConvNetW32 --num_eval=1,2

The set is the config's initial synthetic set (`distill.init_state`: real images of the seed, x4
expanded for IDM/BACON), trained on with the full protocol (`eval.epochs + 1` epochs, the library's
per-backend form: on CPU one network after another, the epochs driven from Python) and scored on
the test set. Each `--num_eval` value is one call in the same process, in order: the first call
includes compiling the epoch, the later ones reuse it, which is what a run's evaluations after
its first see. Prints seconds per call and per network and the accuracies. This is the figure
compared with the reference's `[refrun] eval_net` time (RESULTS.md, issue 22).
"""

import argparse
import sys
import time

import jax
import numpy as np

from bacon_jax import distill, evaluation

import common


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_config_arguments(parser, default=None)
    parser.add_argument("--model", default="", help="architecture (default: eval.models[0])")
    parser.add_argument("--num_eval", default="1,2", help="networks per call, comma-separated")
    args = parser.parse_args(argv)
    overrides = common.overrides_of(args)
    common.header("eval_full " + " ".join(argv))
    config = common.load_config(args.config, overrides)
    dataset, source = common.load_data(config, args.fake_data)
    spec, _, _, state, _ = common.distill_setup(config, dataset, num_devices=0)
    images, labels = distill.training_set(*distill.synthetic_set(state, spec), spec)
    name = args.model or config.eval.models[0]
    eval_spec = evaluation.spec_from_config(config, name, dataset.spec)
    print(f"data: {source}; {name} on the initial set {tuple(images.shape)}, "
          f"{eval_spec.epochs + 1} epochs, {jax.device_count()} device(s)")
    for num_eval in [int(n) for n in args.num_eval.split(",") if n.strip()]:
        start = time.perf_counter()
        accuracies = evaluation.evaluate_synthetic(
            jax.random.PRNGKey(num_eval), images, labels, dataset.x_test, dataset.y_test,
            dataset.preprocessing, num_eval, eval_spec)
        seconds = time.perf_counter() - start
        print(f"num_eval={num_eval}: {seconds:.1f} s, {seconds / num_eval:.1f} s per network, "
              f"accuracies {np.round(100 * accuracies, 2).tolist()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
