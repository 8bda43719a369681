"""Distill a synthetic set and evaluate it.

    python experiments/run.py --config=configs/digits.py:ipc10 --workdir=/tmp/digits
    python experiments/run.py --config=configs/mnist.py:ipc10,method=dm --workdir=/tmp/mnist_dm \
        --config.iterations=2000

Rerunning the same command with the same --workdir resumes from the latest checkpoint; a rerun
whose config would relabel the run's results is refused (README, "Rerunning into a workdir").
Errors you can fix end with one `ERROR:` line. `--help` also lists the config files, presets,
datasets, methods, architectures and fields; `--library_logs` shows the libraries' INFO logs.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bacon_jax import errors, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset, e.g. configs/mnist.py:ipc10.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first: one process per host of a TPU pod slice or of a "
    "multi-node GPU job (the coordinator is discovered from the environment).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --multihost, when the environment does not provide it (a manual multi-node GPU or CPU "
    "launch): host:port of process 0. Needs --num_processes and --process_id.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed():
    """jax.distributed.initialize(), from the flags when given, else from the environment."""
    if _COORDINATOR.value is None:
        jax.distributed.initialize()
        return
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _MULTIHOST.value:
        initialize_distributed()
        if jax.process_index() != 0:  # process 0 logs progress; the others only warnings
            logging.set_verbosity(logging.WARNING)
    logging.info("JAX %s, process %d/%d, local devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.local_devices())
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    errors.run_script(main)
