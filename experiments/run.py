"""Distill a synthetic set and evaluate it.

    python experiments/run.py --config=configs/digits.py:ipc10 --workdir=/tmp/digits
    python experiments/run.py --config=configs/mnist.py:ipc10,method=dm --workdir=/tmp/mnist_dm \
        --config.iterations=2000

Rerunning the same command with the same --workdir resumes from the latest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bacon_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/mnist.py:ipc10.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first: one process per host of a TPU pod slice or of a "
    "multi-node GPU job (the coordinator is discovered from the environment).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        jax.distributed.initialize()
    logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
